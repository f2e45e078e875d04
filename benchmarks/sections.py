# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Marked sections of a shared markdown report (``docs/RESULTS.md``): several benchmarks write one file without
overwriting each other's results."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medfm_ops.utils.atomic_io import atomic_write_json, atomic_write_text

__all__ = ["markdown_sections", "notes_lines", "record_with_notes", "regenerate_lines", "write_markdown_section"]


def regenerate_lines(command: str, heading: str = "## Regenerate") -> list[str]:
    """The lines of a report's "Regenerate" block: ``heading``, then ``command`` in a bash code block, then a blank
    line."""
    return [heading, "", "```bash", command, "```", ""]


def _markers(key: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", key):
        raise ValueError(f"section key {key!r} must be lower-case letters, digits, '-' or '_'.")
    return f"<!-- medfm:{key}:begin -->", f"<!-- medfm:{key}:end -->"


def markdown_sections(text: str) -> dict[str, str]:
    """
    The marked sections of a markdown text (as :py:func:`write_markdown_section` writes them):
    ``{key: block}``, each block from its begin marker to its end marker inclusive, in the text's order.
    """
    found = re.finditer(r"<!-- medfm:([a-z0-9][a-z0-9_-]*):begin -->.*?<!-- medfm:\1:end -->", text, flags=re.S)
    return {m.group(1): m.group(0) for m in found}


def write_markdown_section(path: str | os.PathLike, key: str, text: str) -> Path:
    """
    Replace the section ``key`` of the markdown file ``path`` with ``text`` (atomically), leaving the rest as it is.

    A section is the text between ``<!-- medfm:KEY:begin -->`` and ``<!-- medfm:KEY:end -->``; when the file has no
    such section it is appended (the file is created when missing). Several tools can so share one report (e.g.
    ``docs/RESULTS.md``) without overwriting each other's results.

    Args:
        path: the markdown file.
        key: the section's key (lower-case letters, digits, ``-``, ``_``).
        text: the section's content (markdown, without the markers).

    Returns:
        ``path``.

    Raises:
        ValueError: on an invalid ``key``.

    Example::

        write_markdown_section("docs/RESULTS.md", "site-curve", "## Data-efficiency curve\n...")
    """
    begin, end = _markers(key)
    block = f"{begin}\n{text.strip()}\n{end}"
    target = Path(path)
    old = target.read_text(encoding="utf-8") if target.is_file() else ""
    if key in markdown_sections(old):
        new = old.replace(markdown_sections(old)[key], block)
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + block + "\n"
    return atomic_write_text(target, new)


def notes_lines(text: str | None) -> list[str]:
    """A results page's reader notes (what the numbers say, written after reading them; ``report --notes FILE``) as
    a Markdown block quote followed by a blank line; nothing for empty notes."""
    text = (text or "").strip()
    return [("> " + line).rstrip() for line in text.splitlines()] + [""] if text else []


def record_with_notes(json_path: str | os.PathLike, notes: str | os.PathLike | None = None) -> dict[str, Any]:
    """A results page's stored record (its ``.json``); with ``notes`` (a Markdown file of what the numbers say,
    written after reading them) its text is stored under the key ``notes`` first (the JSON rewritten atomically), so
    that later ``report`` calls keep it."""
    record = json.loads(Path(json_path).read_text())
    if notes is not None:
        record["notes"] = Path(notes).read_text()
        atomic_write_json(json_path, record)
    return record
