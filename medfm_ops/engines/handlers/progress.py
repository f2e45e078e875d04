# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A progress bar shown on a terminal only: in a log file it is carriage-return noise on every iteration."""

from __future__ import annotations

import sys
from typing import TextIO

from ignite.engine import Engine
from ignite.handlers import ProgressBar

__all__ = ["TerminalProgressBar"]


class TerminalProgressBar:
    """
    Ignite's :class:`~ignite.handlers.ProgressBar` (one bar per epoch), attached only when ``stream`` is a terminal;
    when the output goes to a file or a pipe nothing is attached (the epoch's one line,
    :class:`~medfm_ops.engines.EpochSummaryHandler`, says what the bar would).

    Args:
        persist: keep each epoch's finished bar on screen. Defaults to False.
        stream: where the bar is drawn. Defaults to ``sys.stderr`` (read when attaching).

    Example (a bundle's ``train#handlers``)::

        {"_target_": "medfm_ops.engines.TerminalProgressBar"}
    """

    def __init__(self, persist: bool = False, stream: TextIO | None = None) -> None:
        self.persist = persist
        self.stream = stream
        self.bar: ProgressBar | None = None  # the attached bar, None when the stream is not a terminal

    def attach(self, engine: Engine) -> None:
        stream = sys.stderr if self.stream is None else self.stream
        isatty = getattr(stream, "isatty", None)
        if callable(isatty) and isatty():
            self.bar = ProgressBar(persist=self.persist, file=stream)
            self.bar.attach(engine)
