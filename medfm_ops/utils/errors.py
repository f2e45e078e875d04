# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Errors a user can read: the cause under MONAI's wrappers, printed as the last line of a failed run.

Standard library only: exported bundles ship this module verbatim as ``scripts/errors.py`` (see
:py:data:`medfm_ops.bundle.BUNDLE_SCRIPTS`)."""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

__all__ = ["root_cause", "report_cause_last", "install_excepthook"]

#: messages of the wrappers MONAI puts around an error (config parsing, ``Compose``/``Dataset`` transforms)
_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")


def root_cause(error: BaseException) -> BaseException:
    """
    The error under MONAI's wrappers: ``RuntimeError("Failed to evaluate ConfigExpression ...")``,
    ``RuntimeError("Failed to instantiate component ...")`` and ``RuntimeError("applying transform ...")`` are
    followed down their ``__cause__`` chain; any other error is returned as is.
    """
    seen = set()
    while (
        isinstance(error, RuntimeError)
        and str(error).startswith(_WRAPPERS)
        and error.__cause__ is not None
        and id(error) not in seen
    ):
        seen.add(id(error))
        error = error.__cause__
    return error


def _hook(previous):
    def excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        previous(exc_type, exc, tb)
        cause = root_cause(exc)
        if cause is not exc:
            line = "".join(traceback.format_exception_only(type(cause), cause)).strip()
            print(f"\nERROR (cause of the failure above): {line}", file=sys.stderr, flush=True)

    excepthook.medfm = True  # type: ignore[attr-defined]
    return excepthook


def report_cause_last() -> None:
    """
    Make the last line of a failed run name its cause: after the usual traceback, the error under MONAI's wrappers
    (e.g. the corrupt file, the NaN batch) is printed again (installed as ``sys.excepthook``). Idempotent; the first
    ``initialize`` step of the medfm bundles names it as ``{"_target_": "medfm_ops.utils.report_cause_last"}``.
    """
    if not getattr(sys.excepthook, "medfm", False):
        sys.excepthook = _hook(sys.excepthook)


#: the former name of :func:`report_cause_last`
install_excepthook = report_cause_last
