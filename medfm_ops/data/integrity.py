# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A data set's integrity check before training: every bad case listed at once, each with what was expected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["DatasetIntegrityError", "check_datalist_cases", "check_segmentation_cases"]


class DatasetIntegrityError(ValueError):
    """A data set has cases that cannot be trained on; ``problems`` lists them (one line each)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:30])
        more = f"\n  ... and {len(self.problems) - 30} more" if len(self.problems) > 30 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found before training:\n{shown}{more}")


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
    Check every ``{"image", "label"}`` case before training: both files readable, 3D single-channel volumes of the
    same shape, integer label values that the case may hold. Reads each label fully and each image's header only.

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
    for case in cases:
        image, label = str(case["image"]), str(case["label"])
        allowed_labels, note = _allowed_labels(case, label_names)
        try:
            img_shape = _spatial(nib.load(image).shape)
            lab_img = nib.load(label)
            lab_shape = _spatial(lab_img.shape)
            values = np.unique(np.asarray(lab_img.dataobj))
        except Exception as e:  # unreadable, truncated, not NIfTI
            problems.append(f"{Path(image).name} / {Path(label).name}: cannot read ({type(e).__name__}: {e})")
            continue
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
