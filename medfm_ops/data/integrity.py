# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A data set's integrity check before training: every bad case listed at once, each with what was expected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = ["DatasetIntegrityError", "check_segmentation_cases"]


class DatasetIntegrityError(ValueError):
    """A data set has cases that cannot be trained on; ``problems`` lists them (one line each)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = "\n".join(f"  - {p}" for p in self.problems[:30])
        more = f"\n  ... and {len(self.problems) - 30} more" if len(self.problems) > 30 else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) found before training:\n{shown}{more}")


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[:3]) if len(shape) == 4 and shape[3] == 1 else tuple(shape)


def check_segmentation_cases(
    cases: Sequence[Mapping[str, Any]], label_names: Mapping[str, str], source: str = "data set"
) -> None:
    """
    Check every ``{"image", "label"}`` case of an MSD-style set: both files readable, 3D single-channel volumes of
    the same shape, integer label values within ``0..n`` of ``label_names`` (``{"1": name, ...}``, background
    excluded). Reads each label fully and each image's header only.

    Raises:
        DatasetIntegrityError: listing every bad case (file, what was found, what was expected).
    """
    n = len(label_names)
    allowed = ", ".join(f"{k}={v}" for k, v in sorted(label_names.items(), key=lambda kv: int(kv[0])))
    problems: list[str] = []
    for case in cases:
        image, label = str(case["image"]), str(case["label"])
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
        if lab_shape != img_shape:
            problems.append(f"{label}: label shape {lab_shape} differs from its image's {img_shape}")
        if not np.all(np.equal(np.mod(values, 1), 0)):
            problems.append(f"{label}: non-integer label values (an interpolated label?)")
            continue
        bad = [int(v) for v in values if v < 0 or v > n]
        if bad:
            problems.append(f"{label}: label value(s) {bad} outside the data set's labels 0..{n} (0=background, {allowed})")
    if problems:
        raise DatasetIntegrityError(source, problems)
