# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A data set's integrity check before training: every bad case listed at once, each with what was expected."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfm_ops.bundle_paths import default_cache_dir
from medfm_ops.utils.atomic_io import atomic_write_json

__all__ = ["DatasetIntegrityError", "check_datalist_cases", "check_segmentation_cases", "read_volume_facts",
           "data_check_cache_file"]  # fmt: skip

#: bump when the facts recorded per file change
_CACHE_VERSION = 1


class DatasetIntegrityError(ValueError):
    """A data set has cases that cannot be trained on; ``problems`` lists them (one line each)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:30])
        more = f"\n  ... and {len(self.problems) - 30} more" if len(self.problems) > 30 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found before training:\n{shown}{more}")


def data_check_cache_file() -> Path:
    """Where the data check keeps its verdicts: ``data_check.json`` in medfm's cache folder (``$MEDFM_CACHE``, else
    ``~/.cache/medfm``; :func:`~medfm_ops.bundle_paths.default_cache_dir`). Data folders may be read-only, so the
    cache is never written beside the data."""
    return Path(default_cache_dir()) / "data_check.json"


def _load_cache() -> dict[str, Any]:
    try:
        cache = json.loads(data_check_cache_file().read_text(encoding="utf-8"))
        return cache["files"] if cache.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _save_cache(files: Mapping[str, Any]) -> None:
    try:
        atomic_write_json(data_check_cache_file(), {"version": _CACHE_VERSION, "files": dict(files)})
    except OSError:
        pass  # a read-only home: the check still ran, it is only not remembered


def read_volume_facts(path: str | os.PathLike, values: bool, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """
    Decode the whole NIfTI file ``path`` (a truncated or corrupt file fails here, not in training) and return its
    shape and whether every value is finite, plus its sorted distinct values when ``values`` (labels). With
    ``cache`` (a dict, see :func:`check_segmentation_cases`) a file whose path, size and modification time are
    recorded is not read again.

    Raises:
        Exception: whatever the reader raised for an unreadable file.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{'values' if values else 'image'}"
    if cache is not None and key in cache:
        return cache[key]
    data = np.asarray(nib.load(real).dataobj)
    facts: dict[str, Any] = {"shape": [int(n) for n in data.shape], "non_finite": 0}
    if np.issubdtype(data.dtype, np.floating):
        facts["non_finite"] = int(data.size - np.count_nonzero(np.isfinite(data)))
    if values:
        facts["values"] = [v.item() for v in np.unique(data[np.isfinite(data)] if facts["non_finite"] else data)]
    if cache is not None:
        cache[key] = facts
    return facts


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)


def _allowed_labels(case: Mapping[str, Any], label_names: Mapping[str, str] | None) -> tuple[dict[int, str], str]:
    """Label values a case may hold (besides 0) and a note on why: its own ``label_names``/``annotated`` first."""
    names = case.get("label_names") or label_names
    if not names:
        raise ValueError(f"case {case.get('label', case)!r} has no 'label_names' and no label_names were given.")
    labels = {int(k): str(v) for k, v in names.items() if int(k) != 0}
    annotated = case.get("annotated")
    if annotated is None or set(annotated) >= set(labels.values()):
        return labels, ""
    where = f"data set '{case['dataset']}'" if case.get("dataset") else "the case"
    region = f" of region '{case['region_name']}'" if case.get("region_name") else ""
    return {k: v for k, v in labels.items() if v in set(annotated)}, f" ({where} annotates {len(annotated)} of the " \
        f"{len(labels)} classes{region})"


def check_segmentation_cases(
    cases: Sequence[Mapping[str, Any]], label_names: Mapping[str, str] | None = None, source: str = "data set"
) -> None:
    """
    Check every ``{"image", "label"}`` case before training: both files readable (decoded in full: a truncated file
    is found here, not after an hour of training), 3D single-channel volumes of the same shape, finite image values,
    integer label values that the case may hold. The facts of each file are cached by path, size and modification
    time (:func:`data_check_cache_file`), so a large site pays the decoding once.

    The labels a case may hold are ``0`` (background) and ``1..n`` of its own ``label_names`` (``{"1": name, ...}``,
    as in the items of :py:func:`~medfm_ops.data.load_datalist`) or else of the shared ``label_names`` (an MSD-style
    site set), restricted to the classes its ``annotated`` list names when it has one (partial labels: a data set
    that does not label an organ must not hold its value).

    Args:
        cases: items with ``image`` and ``label`` paths, optionally ``label_names``, ``annotated``, ``dataset``,
            ``region_name``.
        label_names: labels of cases without their own ``label_names``. Defaults to None.
        source: what is checked (the data set folder or datalist), first in the error. Defaults to ``"data set"``.

    Raises:
        DatasetIntegrityError: listing every bad case (file, what was found, what was expected).
        ValueError: when a case has no ``label_names`` and none were given (a programming error, not a data one).
    """
    problems: list[str] = []
    cache = _load_cache()
    size = len(cache)
    for case in cases:
        image, label = str(case["image"]), str(case["label"])
        allowed_labels, note = _allowed_labels(case, label_names)
        facts = {}
        for path, is_label in ((image, False), (label, True)):
            try:
                facts[is_label] = read_volume_facts(path, is_label, cache)
            except Exception as e:  # unreadable, truncated, not NIfTI
                problems.append(f"{path}: cannot read ({type(e).__name__}: {e})")
        if len(facts) < 2:
            continue
        img_shape, lab_shape = _spatial(tuple(facts[False]["shape"])), _spatial(tuple(facts[True]["shape"]))
        values = np.asarray(facts[True]["values"])
        if facts[False]["non_finite"]:
            problems.append(f"{image}: image has NaN/inf voxels ({facts[False]['non_finite']} of "
                            f"{int(np.prod(facts[False]['shape']))}); repair or mask the file")  # fmt: skip
        if facts[True]["non_finite"]:
            problems.append(f"{label}: label has NaN/inf values")
        if len(img_shape) != 3:
            problems.append(f"{image}: image shape {img_shape}, expected a 3D single-channel volume")
        elif lab_shape != img_shape:
            problems.append(f"{label}: label shape {lab_shape} differs from its image's {img_shape}")
        if not np.all(np.equal(np.mod(values, 1), 0)):
            problems.append(f"{label}: non-integer label values (an interpolated label?)")
            continue
        bad = [int(v) for v in values if v != 0 and int(v) not in allowed_labels]
        if bad:
            allowed = ", ".join(f"{k}={v}" for k, v in sorted(allowed_labels.items()))
            if note:
                problems.append(f"{label}: label value(s) {bad} not among the labels this case annotates: "
                                f"0=background, {allowed}{note}")
            else:
                n = max(allowed_labels)
                problems.append(f"{label}: label value(s) {bad} outside the data set's labels 0..{n} "
                                f"(0=background, {allowed})")
    if len(cache) != size:
        _save_cache(cache)
    if problems:
        raise DatasetIntegrityError(source, problems)


def check_datalist_cases(sections: Mapping[str, Sequence[Mapping[str, Any]]], source: str = "datalist") -> None:
    """
    :py:func:`check_segmentation_cases` over every section of a loaded datalist (``load_datalist(...)[1]``), once,
    before training: one :py:class:`DatasetIntegrityError` lists every bad case of every section.

    Example (bundle ``initialize``)::

        "$medfm_ops.data.check_datalist_cases(@datalist_content[1], source=str(@datalist))"
    """
    check_segmentation_cases([case for items in sections.values() for case in items], source=source)
