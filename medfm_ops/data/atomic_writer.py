# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A NIfTI writer for ``SaveImaged`` whose files appear complete or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from monai.config import PathLike
from monai.data import NibabelWriter

__all__ = ["AtomicNibabelWriter"]


class AtomicNibabelWriter(NibabelWriter):
    """
    MONAI's :class:`~monai.data.NibabelWriter` writing to a temporary file in the target folder (same suffix, so
    ``.nii.gz`` is still compressed) and renaming it over ``filename``: a full disk or a kill during the write never
    leaves a truncated label map, and the temporary file is removed on failure. Use it as
    ``SaveImaged(..., writer="medfm_ops.data.AtomicNibabelWriter")``.
    """

    def write(self, filename: PathLike, verbose: bool = False, **obj_kwargs) -> None:
        target = Path(filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(target.suffixes[-2:]) if target.name.endswith(".nii.gz") else target.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
        os.close(fd)
        try:
            super().write(tmp, verbose=verbose, **obj_kwargs)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
