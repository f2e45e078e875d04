# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""One writer per output folder: a lock file beside the folder, naming its owner (pid and start time)."""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["OutputLockedError", "output_lock", "lock_path"]

logger = logging.getLogger("medfm.lock")


class OutputLockedError(RuntimeError):
    """Another running process is writing the same output folder; the message names it (pid, start, command)."""


def lock_path(target: str | os.PathLike) -> Path:
    """The lock file of output folder ``target``: ``.<name>.lock`` beside it (the folder itself is replaced)."""
    target = Path(target).expanduser().absolute()
    return target.parent / f".{target.name}.lock"


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _describe(owner: dict[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started_at', '?')}: "
            f"`{owner.get('command', '?')}`")  # fmt: skip


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        owner = {"command": "unreadable lock file"}
    return owner if isinstance(owner, dict) else {}


@contextmanager
def output_lock(target: str | os.PathLike) -> Iterator[Path]:
    """
    Hold the lock of output folder ``target`` for the duration of the block, so that two runs never write the same
    folder at once. The lock is ``.<name>.lock`` beside ``target`` (see :func:`lock_path`), locked with ``flock``
    (released by the kernel when its process dies, even by ``kill -9``) and holding the owner's pid, process start
    time, host, start date and command line. A lock file left by a dead owner is taken over with a warning naming
    that owner; the file is removed when the block ends.

    Raises:
        OutputLockedError: when a running process holds the lock; the message names it and the lock file.

    Example::

        with output_lock("/bundles/brain_site"):
            ...  # build and publish /bundles/brain_site
    """
    target = Path(target).expanduser().absolute()
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{target} is being written by another run ({_describe(owner)}); wait for it to finish or choose "
                f"another output folder (lock file {lock})."
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous owner removed its file between our open and flock: lock the new one
    try:
        stale = _read(fd)
        if stale:
            alive = stale.get("pid") and _process_start(int(stale["pid"])) == stale.get("process_start")
            logger.warning(
                f"taking over the stale lock {lock} of {_describe(stale)}: "
                f"{'that process no longer holds it' if alive else 'that process is no longer running'}."
            )
        me = {"pid": os.getpid(), "process_start": _process_start(os.getpid()), "host": socket.gethostname(),
              "started_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:500], "target": str(target)}  # fmt: skip
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me, indent=1) + "\n").encode("utf-8"))
        os.fsync(fd)
        yield lock
    finally:
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                os.remove(lock)
        except OSError:
            pass
        os.close(fd)
