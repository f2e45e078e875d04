# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A whole output folder (a bundle) written at once: built in a hidden sibling, then swapped in when complete."""

from __future__ import annotations

import contextvars
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from medfm_ops.utils.atomic_io import OutputWriteError, replace_directory, write_error
from medfm_ops.utils.output_lock import output_lock

__all__ = ["staged_directory", "STAGE_INFIX"]

#: staging folders are ``.<name>.partial-<random>`` beside the target
STAGE_INFIX = ".partial-"

#: staging folders open in this context: a writer asked to write into one (or below) writes there directly
_open_stages: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("medfm_open_stages", default=())


def _inside_open_stage(target: Path) -> bool:
    return any(target == s or s in target.parents for s in _open_stages.get())


def _check_replaceable(target: Path, markers: Sequence[str] | None) -> None:
    if markers is None or not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder: choose another output folder.")
    if any(target.iterdir()) and not any((target / m).exists() for m in markers):
        raise FileExistsError(
            f"refusing to replace {target}: it is not empty and has none of {list(markers)} (not an output written "
            "here); choose a new or empty output folder."
        )


def _in_target(error: OutputWriteError, stage: Path, target: Path, existed: bool) -> OutputWriteError:
    try:
        where = target / Path(error.filename).relative_to(stage)
    except (TypeError, ValueError):
        return error
    kept = f"the previous {target} is intact" if existed else f"no folder was written at {target}"
    out = OutputWriteError(error.errno, f"{getattr(error, 'reason', error.strerror)} while writing {where} (staged in "
                                        f"{stage.name}, now removed); {kept}")  # fmt: skip
    out.filename, out.reason = str(where), getattr(error, "reason", None)
    return out


@contextmanager
def staged_directory(
    target: str | os.PathLike, markers: Sequence[str] | None = ("configs/metadata.json",)
) -> Iterator[Path]:
    """
    Build the folder ``target`` as a whole: the block fills a hidden staging folder ``.<name>.partial-*`` beside
    ``target``; when the block ends without error the staging folder is renamed over ``target``
    (:func:`~medfm_ops.utils.replace_directory`), otherwise it is removed and ``target`` stays as it was. A failed
    or killed writer therefore never leaves a half-new folder: ``target`` is the previous complete folder or the new
    complete one. Verify the staged folder inside the block (a failed check also keeps the previous folder).

    The folder has one writer at a time (:func:`~medfm_ops.utils.output_lock`); staging folders left by killed
    writers are removed once the lock is held. A writer that targets a folder inside a staging folder already open
    in this context (e.g. a bundle writer called by a pipeline that stages the same bundle) writes there directly.

    Args:
        target: the folder to build (replaced when it exists).
        markers: paths of which an existing non-empty ``target`` must contain one to be replaced (a folder that is
            not an earlier output is never deleted). Defaults to ``("configs/metadata.json",)`` (a bundle); None
            replaces any folder.

    Yields:
        the staging folder to fill.

    Raises:
        OutputLockedError: when another running process writes ``target``.
        FileExistsError: when ``target`` exists and is not an earlier output (see ``markers``).
        OutputWriteError: when the disk is full (or another OS error) while swapping the folder in.
    """
    target = Path(target).expanduser().absolute()
    if _inside_open_stage(target):
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    _check_replaceable(target, markers)
    with output_lock(target):
        for stale in target.parent.glob(f".{target.name}{STAGE_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed writer (we hold the lock)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGE_INFIX}", dir=target.parent))
        token = _open_stages.set(_open_stages.get() + (stage,))
        existed = target.exists()
        try:
            try:
                yield stage
            except OutputWriteError as e:  # name the file as the user knows it, and say what was kept
                raise _in_target(e, stage, target, existed) from e
            os.chmod(stage, 0o755)  # mkdtemp creates 0o700
            try:
                replace_directory(stage, target)
            except OSError as e:
                raise write_error(e, target, target.exists(), "folder") from e
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        finally:
            _open_stages.reset(token)
