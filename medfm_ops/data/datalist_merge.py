# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Merge two multi-region datalists (schema in :py:mod:`medfm_ops.data.synthetic`) into one, region by region.

Typical use: real data sets converted by a mapping file (:py:func:`~medfm_ops.data.convert_msd_mapping`) added to
the synthetic default set, either as new regions or as more cases of a region the base already has (partial
labels: every item keeps the classes its label annotates).

Rules:

- The base's regions keep their task ids; regions only in ``extra`` get the next ids, in ``extra``'s order.
- A region in both must list the same classes up to the end of the shorter list (one class list is a prefix of the
  other); the merged region has the longer list. Label files are never rewritten: region-local values stay valid
  because the common classes keep their labels. To add classes to a base region with a mapping file, declare the
  region there with the base's classes first, e.g. ``"regions": {"brain_mri": ["ventricles", "hippocampus_left",
  "hippocampus_right", "anterior", "posterior"]}``.
- Every item gets explicit ``dataset`` and ``annotated`` (the loader's defaults of its own datalist), so an item of
  the shorter side is not taken to annotate the classes the other side added.
- Sections are concatenated (base items first); paths are rewritten relative to the merged datalist's directory.

Example::

    merge_datalists(synthetic_datalist, "runs/public/mapped.json", "runs/public/datalist.json")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medfm_ops.data.datalist import SECTIONS, load_datalist
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.json_file import read_json_object

__all__ = ["merge_datalists"]


def _relative(path: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return Path(path).as_posix()


def merge_datalists(
    base: str | os.PathLike,
    extra: str | os.PathLike,
    out_datalist: str | os.PathLike,
    name: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """
    Write the region-wise union of two datalists (rules in this module's docstring).

    Args:
        base: the datalist whose task ids are kept (e.g. the synthetic default set).
        extra: the datalist whose regions and items are added.
        out_datalist: the merged datalist JSON to write (atomically; its directory is created).
        name: the merged datalist's ``name``. Defaults to ``"<base name>+<extra name>"``.
        overwrite: replace an existing ``out_datalist``. Defaults to False.

    Returns:
        the written datalist (as a dict), with ``merged_from`` naming both inputs.

    Raises:
        FileExistsError: when ``out_datalist`` exists and ``overwrite`` is not set.
        FileNotFoundError, ValueError: from :py:func:`~medfm_ops.data.load_datalist` for either input (messages name
            it); ValueError when a region in both has class lists of which neither is a prefix of the other.

    Example::

        merged = merge_datalists("synthetic/datalist.json", "mapped.json", "merged.json")
        [r["name"] for r in merged["regions"]]  # base regions first, then the new ones
    """
    out = Path(out_datalist).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True to replace it.")
    inputs = [Path(p).expanduser().absolute() for p in (base, extra)]
    raws = [read_json_object(p, "datalist") for p in inputs]
    loaded = [load_datalist(p) for p in inputs]
    (base_table, _), (extra_table, _) = loaded

    regions = [dict(r) for r in sorted(raws[0]["regions"], key=lambda r: int(r["task_id"]))]
    by_name = {r["name"]: r for r in regions}
    task_of: list[dict[int, int]] = [{t: t for t in base_table.task_ids}, {}]
    for t in extra_table.task_ids:
        region, classes = extra_table.task_names[t], extra_table.class_names[t]
        if region not in by_name:
            raw = next(r for r in raws[1]["regions"] if int(r["task_id"]) == t)
            entry = {**raw, "task_id": len(regions)}
            regions.append(entry)
            by_name[region] = entry
        else:
            entry = by_name[region]
            mine = base_table.class_names[int(entry["task_id"])]
            short, long = sorted((mine, classes), key=len)
            if long[: len(short)] != short:
                raise ValueError(
                    f"cannot merge region '{region}': {inputs[0]} has classes {mine} and {inputs[1]} has {classes}; "
                    "one list must start with the other (label values are kept). Declare the region's classes with "
                    "the base's first (mapping file 'regions')."
                )
            entry["labels"] = {str(i): c for i, c in enumerate(long, start=1)}
        task_of[1][t] = int(entry["task_id"])

    datalist: dict[str, Any] = {
        "name": name or f"{raws[0].get('name', inputs[0].stem)}+{raws[1].get('name', inputs[1].stem)}",
        "description": f"merged by medfm_ops.data.merge_datalists from {inputs[0]} and {inputs[1]}",
        "merged_from": [{"path": str(p), "name": r.get("name"), "fingerprint": r.get("fingerprint")}
                        for p, r in zip(inputs, raws)],  # fmt: skip
        "regions": regions,
    }
    datasets = [d for r in raws for d in r.get("datasets", [])]
    if datasets:
        datalist["datasets"] = datasets
    labels = {int(r["task_id"]): r["labels"] for r in regions}
    for section in SECTIONS:
        items = []
        for (_, sections), tasks in zip(loaded, task_of):
            for item in sections.get(section, []):
                task = tasks[item["region"]]
                items.append({
                    **item,
                    "image": _relative(item["image"], out.parent),
                    "label": _relative(item["label"], out.parent),
                    "region": task,
                    "label_names": dict(labels[task]),
                })  # fmt: skip
        if items or section != "test":
            datalist[section] = items
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, datalist)
    load_datalist(out)  # the result must load (it does by construction; a cheap guard against schema drift)
    return datalist
