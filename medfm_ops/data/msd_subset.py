# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""An MSD-style view of some cases of an MSD-style data set: a ``dataset.json`` that lists them by path.

No image or label is copied: the view's ``training`` entries point at the source's files (relative to the view's
directory), so the converters (:py:func:`~medfm_ops.data.convert_msd`,
:py:func:`~medfm_ops.data.convert_msd_mapping`) and the site fine-tuning read a subset as if it were a data set of
its own (e.g. the "public" part of a data set that a foundation model may see, the rest kept for a site).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfm_ops.data.msd import read_msd_dataset
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.json_file import read_json_object

__all__ = ["write_msd_subset"]


def write_msd_subset(
    dataset_dir: str | os.PathLike,
    cases: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    name: str | None = None,
) -> Path:
    """
    Write ``{out_dir}/dataset.json``: the source's ``dataset.json`` fields (labels, modality, ...) with a
    ``training`` list of ``cases`` only, and ``subset_of`` naming the source.

    Args:
        dataset_dir: the source MSD-style directory.
        cases: ``[{"image", "label"}, ...]`` of the source (absolute paths, or relative to ``dataset_dir``); at least
            one, each one of the source's cases.
        out_dir: directory of the view (created). Its ``dataset.json`` is replaced when it exists.
        name: the view's ``name``. Defaults to ``"<source name> (subset of N)"``.

    Returns:
        the path of the written ``dataset.json``.

    Raises:
        ValueError: on no cases, a case listed twice, or a case that is not one of the source's (image and label as
            in its ``dataset.json``).
        FileNotFoundError: when the source or one of its files is missing.

    Example::

        write_msd_subset("../shared/data/msd_hippocampus", public_cases, "runs/curve/public_msd_hippocampus")
    """
    root = Path(dataset_dir).expanduser().resolve()
    _, source_cases, _ = read_msd_dataset(root)
    known = {str(Path(c["image"]).resolve()): str(Path(c["label"]).resolve()) for c in source_cases}
    if not cases:
        raise ValueError(f"write_msd_subset: no cases given for a subset of {root}.")
    out = Path(out_dir).expanduser().absolute()
    entries = []
    for case in cases:
        image, label = (str((root / os.path.normpath(str(case[k]))).resolve()) for k in ("image", "label"))
        if known.get(image) != label:
            raise ValueError(f"write_msd_subset: {case['image']} (label {case['label']}) is not a case of "
                             f"{root / 'dataset.json'}.")  # fmt: skip
        entries.append({k: Path(os.path.relpath(p, out)).as_posix() for k, p in (("image", image), ("label", label))})
    images = [e["image"] for e in entries]
    repeated = sorted({i for i in images if images.count(i) > 1})
    if repeated:
        raise ValueError(f"write_msd_subset: case(s) {repeated} listed more than once.")
    meta = read_json_object(root / "dataset.json", "MSD dataset.json")
    content = {k: v for k, v in meta.items() if k not in ("training", "test", "numTraining", "numTest")}
    content.update({
        "name": name or f"{meta.get('name', root.name)} (subset of {len(entries)})",
        "subset_of": str(root),
        "numTraining": len(entries),
        "training": entries,
    })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(out / "dataset.json", content)
