# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Atomic writes: a file (text, JSON, torch object) or a whole directory appears complete or not at all.

Every file the suite writes (checkpoints, datalists, tables, bundles) goes through here, so a failed or killed run
never leaves a half-written file in place of a good one.

Standard library (and torch, imported where used) only: exported bundles ship this module verbatim as
``scripts/atomic_io.py`` for their checkpoint saver (see :py:data:`medfm_ops.bundle.BUNDLE_SCRIPTS`)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "NonFiniteWeightsError",
    "OutputWriteError",
    "write_error",
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_torch_save",
    "atomic_directory",
    "non_finite_entries",
    "replace_directory",
]


class OutputWriteError(OSError):
    """The disk refused to write an output (full, file size limit, quota, read-only, I/O error). ``str()`` is one
    line: what happened, where, and whether the previous file is intact; ``errno`` is the original error's,
    ``filename`` the file being written and ``reason`` the plain words for the error."""

    def __str__(self) -> str:
        return str(self.strerror)


#: plain words for the errors of a full or limited disk (the errors :func:`atomic_write` turns into one line; others,
#: e.g. a missing or forbidden folder, already name their path)
_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file size limit exceeded (ulimit -f)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error of the disk",
}


def write_error(
    error: OSError, path: str | os.PathLike, previous_kept: bool, what: str | None = None
) -> OutputWriteError:
    """
    The one-line :class:`OutputWriteError` for ``error`` raised while writing ``path``, e.g. ``"no space left on
    device while writing /b/models/model.pt; the previous model.pt is intact"``.

    Args:
        error: the operating system's error.
        path: the file (or folder) being written.
        previous_kept: whether an earlier version of ``path`` exists and is untouched.
        what: how to call the earlier version in the message. Defaults to the file name.
    """
    if isinstance(error, OutputWriteError):
        return error
    path = Path(path)
    reason = _REASONS.get(error.errno or 0, (error.strerror or str(error)).lower())
    kept = f"the previous {what or path.name} is intact" if previous_kept else f"nothing was written in place of {path}"
    out = OutputWriteError(error.errno or errno.EIO, f"{reason} while writing {path}; {kept}")
    out.filename, out.reason = str(path), reason
    return out


#: what torch's zip writer says when the file system refuses a write (it drops the operating system's error)
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed writing")


def torch_write_failure(error: BaseException, folder: str | os.PathLike) -> OutputWriteError | None:
    """
    The one-line :class:`OutputWriteError` for a failed ``torch.save`` by code that does not go through
    :func:`atomic_torch_save` (e.g. MONAI's ``CheckpointSaver`` in a stock bundle config), or None when ``error`` is
    not one. torch's message (``[enforce fail at inline_container.cc:...] unexpected pos``) names neither the file
    nor the cause: the file is taken as the most recently modified one under ``folder``, and the cause is a full
    disk when ``folder``'s file system has no space left, else a file size limit or quota.
    """
    if not isinstance(error, RuntimeError) or not any(m in str(error) for m in _TORCH_WRITE_FAILURES):
        return None
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    newest = max(files, key=lambda p: p.stat().st_mtime_ns) if files else Path(folder)
    full = shutil.disk_usage(folder).free < (1 << 20)
    reason = "no space left on device" if full else "the file system refused the write (file size limit or quota)"
    out = OutputWriteError(errno.ENOSPC if full else errno.EFBIG, f"{reason} while writing {newest}; that file is "
                                                                  "incomplete")  # fmt: skip
    out.filename, out.reason = str(newest), reason
    return out


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """
    Open a temporary file next to ``path`` for writing; on success it is synced and renamed over ``path``
    (``os.replace``), on an exception it is removed and ``path`` is untouched.

    Yields:
        the open file object (``mode`` ``"w"`` or ``"wb"``).

    Raises:
        OutputWriteError: when the disk refuses the write (full, file size limit, quota, read-only, I/O error), in
            one line naming ``path`` (see :func:`write_error`); ``path`` is untouched.
    """
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if e.errno in _REASONS:
            raise write_error(e, path, existed) from e
        raise
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in _REASONS:
            raise write_error(e, path, existed) from e
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return Path(path)


class NonFiniteWeightsError(ValueError):
    """A model or checkpoint about to be written holds NaN or infinite values."""


def non_finite_entries(obj: Any, prefix: str = "") -> list[str]:
    """Names of the floating tensors in ``obj`` (nested dicts/lists, e.g. a checkpoint) holding NaN or inf."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [prefix or "<tensor>"] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, dict):
        return [n for k, v in obj.items() for n in non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [n for i, v in enumerate(obj) for n in non_finite_entries(v, f"{prefix}[{i}]")]
    return []


def atomic_torch_save(obj: Any, path: str | os.PathLike, check_finite: bool = True) -> Path:
    """
    ``torch.save(obj)`` to ``path`` atomically; returns the path.

    With ``check_finite`` (the default) every floating tensor in ``obj`` (nested dicts/lists, e.g. a state dict or
    a training checkpoint) must be finite: a diverged model is never written over a good one.

    Raises:
        NonFiniteWeightsError: naming the first non-finite entries; ``path`` is left untouched.
        OutputWriteError: when the disk is full (or another OS error), naming ``path``; ``path`` is left untouched.
    """
    import torch

    bad = non_finite_entries(obj) if check_finite else []
    if bad:
        raise NonFiniteWeightsError(
            f"refusing to write {path}: {len(bad)} tensor(s) hold NaN/inf values (first: {bad[:3]}); the run "
            "diverged (learning rate too high, or NaN/inf in the input images?)."
        )
    buffer = io.BytesIO()  # serialised first: a full disk then fails in write() with its own errno (torch's zip
    torch.save(obj, buffer)  # writer would only say "unexpected pos")
    with atomic_write(path, "wb") as f:
        f.write(buffer.getbuffer())
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """
    Write ``obj`` as indented JSON to ``path`` through a temporary file in the same directory and ``os.replace``,
    so readers see either the old file or the complete new one.

    Returns:
        the written path.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """
    Build a directory in a temporary sibling of ``target`` and rename it to ``target`` on success.

    On an exception the temporary directory is removed and ``target`` is untouched. When ``target`` appeared
    meanwhile (another process built it first), the new copy is discarded and the existing one kept.

    Yields:
        the temporary directory to fill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0o700
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: keep the copy that is already published
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_directory(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """
    Put the complete directory ``src`` in place of ``target`` (which may exist): ``target`` is first renamed to a
    hidden sibling, ``src`` renamed to ``target``, then the old copy removed. Both renames stay on one file system, so
    at every moment ``target`` is either the old or the new complete directory (or, between the two renames, absent
    while the old copy waits beside it).

    Returns:
        ``target``.
    """
    src, target = Path(src), Path(target)
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
        os.replace(target, old / target.name)
    try:
        os.replace(src, target)
    except BaseException:
        if old is not None:
            os.replace(old / target.name, target)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
