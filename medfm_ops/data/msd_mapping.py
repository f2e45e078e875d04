# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Several MSD-style data sets into one multi-region datalist with partial labels, driven by a small mapping file.

A region's expert may learn from several data sets that each label a different subset of the region's classes
(SAT-DS style). The mapping file says which region every data set belongs to and what each of its labels is::

    {
      "name": "abdomen_two_sources",                                  # optional: the datalist's name
      "data_root": "../data",                                         # optional: base of the data set dirs
      "regions": {"abdomen_ct": ["liver", "spleen", "kidney_left"]},  # optional: a region's classes, in order
      "datasets": {                                                   # data set dir -> its region and labels
        "Task03_Liver":  {"region": "abdomen_ct", "labels": {"1": "liver", "2": "liver"}},
        "../Task09_Spleen": {"region": "abdomen_ct", "labels": {"spleen": "spleen"}, "name": "msd_spleen",
                             "split": {"val": 0.1, "test": 0.2, "group_pattern": "(patient\\d+)_"}}
      }
    }

- ``datasets`` keys are MSD-style directories (``dataset.json``, ``imagesTr/``, ``labelsTr/``), relative to
  ``data_root`` (itself relative to the mapping file's directory; default: that directory) or absolute; ``name``
  (default: the directory's name) is the items' ``dataset``.
- ``split`` (optional) overrides the converter's ``val_split`` / ``test_split`` for one data set (``"val"``,
  ``"test"``) and may split it by group: ``group_pattern`` is a regular expression whose first group, searched in
  each image's file name, names the case's group (e.g. the patient of a two-frame cardiac study); every case of a
  group lands in one section and the fractions count groups (:py:func:`~medfm_ops.data.msd.split_cases`).
- ``labels`` maps EVERY foreground label of the data set's ``dataset.json`` (by value, ``"1"``, or by name as
  written there, case-insensitive) to a class name of its region, or to ``null``: voxels of a ``null`` label become
  background and that label is not a class (e.g. a tumour label not kept). Several labels may map to one class
  (liver + tumour -> liver). The classes a data set maps to are what its cases ``annotated``.
- ``regions`` fixes a region's class list and order; a region not listed there gets the classes its data sets map
  to, in order of first appearance. Task ids follow ``regions``, then the order in which ``datasets`` name new regions.

Label files whose values already equal the region-local labels are referenced as they are; the others are
rewritten once, atomically, with region-local values into ``<datalist dir>/labels/<data set name>/`` (reading every
one of them; values outside ``dataset.json``'s labels are all reported at once). Each data set is split on its own
(:py:func:`~medfm_ops.data.msd.split_cases`, same seed).

Example::

    convert_msd_mapping("data/mapping.json", "data/multi_region.json", val_split=0.2, seed=0)
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medfm_ops.data.integrity import DatasetIntegrityError
from medfm_ops.data.msd import case_groups, read_msd_dataset, split_cases
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.json_file import read_json_object

__all__ = ["convert_msd_mapping", "read_msd_mapping"]

_TOP_KEYS = {"name", "regions", "datasets", "data_root"}
_ENTRY_KEYS = {"region", "labels", "name", "split"}
_SPLIT_KEYS = {"val", "test", "group_pattern"}


def _norm(name: str) -> str:
    """A label name as :py:func:`read_msd_dataset` writes it (lower case, spaces as ``_``)."""
    return re.sub(r"\s+", "_", str(name).strip().lower())


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def read_msd_mapping(mapping_file: str | os.PathLike, data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """
    Read and validate a mapping file (format in this module's docstring) against the data sets it names.

    Args:
        mapping_file: the JSON mapping file.
        data_root: base directory of relative data set dirs, overriding the file's ``data_root``. Defaults to None.

    Returns:
        ``{"name", "regions": {region: [classes]}, "datasets": [{"name", "dir", "region", "label_names" (the
        data set's ``{"1": name}``), "value_map" ({MSD value: region class or None}), "annotated" (region order),
        "cases", "info", "split" ({"val", "test", "group_pattern"}, entries
        not given are absent)}]}`` with regions in task-id order.

    Raises:
        FileNotFoundError: when the mapping file or a data set (``dataset.json``, an image or label) is missing.
        ValueError: on a bad mapping: every message names the mapping file and the field (``datasets['X'].labels``)
            and says what was expected.
    """
    path = Path(mapping_file).expanduser().absolute()
    raw = read_json_object(path, "MSD mapping file")
    where = f"mapping file {path}"
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {unknown}; expected 'datasets' and optionally 'name', "
                         "'regions', 'data_root'.")
    root = raw.get("data_root", ".") if data_root is None else data_root
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise ValueError(f"{where}: 'data_root' must be a directory path, got {root!r}.")
    base = Path(os.path.expanduser(str(root)))
    base = base if base.is_absolute() else path.parent / base
    name = raw.get("name", path.stem)
    if not _nonempty_str(name):
        raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}.")
    declared = raw.get("regions", {})
    if not isinstance(declared, Mapping):
        raise ValueError(f"{where}: 'regions' must be an object {{region: [class names]}}, got {declared!r}.")
    regions: dict[str, list[str]] = {}
    for region, classes in declared.items():
        if (not _nonempty_str(region) or not isinstance(classes, list) or not classes
                or not all(_nonempty_str(c) for c in classes) or len(set(classes)) != len(classes)):
            raise ValueError(f"{where}: regions['{region}'] must be a non-empty list of distinct class names, "
                             f"got {classes!r}.")
        regions[region] = list(classes)
    fixed = set(regions)
    entries = raw.get("datasets")
    if not isinstance(entries, Mapping) or not entries:
        raise ValueError(f"{where}: 'datasets' must be a non-empty object {{data set dir: {{'region', 'labels'}}}}, "
                         f"got {entries!r}.")
    datasets: list[dict[str, Any]] = []
    for key, entry in entries.items():
        datasets.append(_read_entry(key, entry, base, where, regions, fixed))
    names = [d["name"] for d in datasets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: data set name(s) {dup} used more than once; give the entries distinct 'name's.")
    unused = [r for r in regions if not any(d["region"] == r for d in datasets)]
    if unused:
        raise ValueError(f"{where}: regions {unused} are declared in 'regions' but no data set maps to them.")
    for d in datasets:
        d["annotated"] = [c for c in regions[d["region"]] if c in set(d["value_map"].values())]
    return {"name": name, "regions": regions, "datasets": datasets}


def _read_split(split: Any, where: str) -> dict[str, Any]:
    if not isinstance(split, Mapping) or set(split) - _SPLIT_KEYS:
        raise ValueError(f"{where} must be an object with keys among {sorted(_SPLIT_KEYS)}, got {split!r}.")
    for k in ("val", "test"):
        v = split.get(k, 0.5)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{where}.{k} must be a fraction in (0, 1) or a case count, got {v!r}.")
    pattern = split.get("group_pattern")
    if pattern is not None and not _nonempty_str(pattern):
        raise ValueError(f"{where}.group_pattern must be a regular expression with one group, got {pattern!r}.")
    return dict(split)


def _read_entry(
    key: str, entry: Any, base: Path, where: str, regions: dict[str, list[str]], fixed: set[str]
) -> dict[str, Any]:
    field = f"datasets['{key}']"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: {field} must be an object {{'region', 'labels'[, 'name']}}, got {entry!r}.")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    missing = sorted({"region", "labels"} - set(entry))
    if unknown or missing:
        raise ValueError(f"{where}: {field} has unknown key(s) {unknown} / misses {missing}; expected 'region', "
                         "'labels' and optionally 'name', 'split'.")
    split = _read_split(entry.get("split", {}), f"{where}: {field}.split")
    region = entry["region"]
    if not _nonempty_str(region):
        raise ValueError(f"{where}: {field}.region must be a non-empty region name, got {region!r}.")
    directory = Path(os.path.expanduser(key))
    directory = directory if directory.is_absolute() else (base / directory)
    try:
        label_names, cases, info = read_msd_dataset(directory)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"{where}: {field}: {e}") from e
    name = entry.get("name", directory.resolve().name)
    if not _nonempty_str(name):
        raise ValueError(f"{where}: {field}.name must be a non-empty string, got {name!r}.")
    labels = entry["labels"]
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{where}: {field}.labels must be an object {{MSD label: region class or null}}, "
                         f"got {labels!r}.")
    by_name = {v: k for k, v in label_names.items()}
    known = ", ".join(f"{k}={v}" for k, v in label_names.items())
    value_map: dict[int, str | None] = {}
    for msd_label, cls in labels.items():
        value = msd_label if str(msd_label) in label_names else by_name.get(_norm(msd_label))
        if value is None:
            raise ValueError(f"{where}: {field}.labels['{msd_label}'] is not a label of {directory / 'dataset.json'} "
                             f"({known}); use its value or its name.")
        if int(value) in value_map:
            raise ValueError(f"{where}: {field}.labels maps MSD label {value} ({label_names[str(value)]}) twice.")
        if cls is not None and not _nonempty_str(cls):
            raise ValueError(f"{where}: {field}.labels['{msd_label}'] must be a class name of region '{region}' or "
                             f"null, got {cls!r}.")
        if cls is not None and region in fixed and cls not in regions[region]:
            raise ValueError(f"{where}: {field}.labels['{msd_label}'] maps to '{cls}', which is not a class of region "
                             f"'{region}' {regions[region]} (see 'regions').")
        value_map[int(value)] = cls
    missing_labels = [f"{k}={v}" for k, v in label_names.items() if int(k) not in value_map]
    if missing_labels:
        raise ValueError(f"{where}: {field}.labels does not map MSD label(s) {missing_labels}; map every label of "
                         f"dataset.json to a class of region '{region}' or to null (background).")
    if all(c is None for c in value_map.values()):
        raise ValueError(f"{where}: {field}.labels maps every label to null: the data set would annotate nothing.")
    classes = regions.setdefault(region, [])
    if region not in fixed:
        classes.extend(c for _, c in sorted(value_map.items()) if c is not None and c not in classes)
    return {"name": name, "dir": directory.resolve(), "region": region, "label_names": label_names,
            "value_map": value_map, "cases": cases, "info": info, "split": split}


def _lookup(value_map: Mapping[int, str | None], classes: list[str]) -> np.ndarray:
    lut = np.zeros(max(value_map) + 1, dtype=np.uint8)
    for value, cls in value_map.items():
        lut[value] = 0 if cls is None else classes.index(cls) + 1
    return lut


def _remap_label(src: str, dst: Path, lut: np.ndarray, problems: list[str], allowed: str) -> None:
    img = nib.load(src)
    data = np.asarray(img.dataobj)
    values = np.unique(data)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        problems.append(f"{src}: non-integer label values (an interpolated label?)")
        return
    bad = [int(v) for v in values if v < 0 or v >= len(lut)]
    if bad:
        problems.append(f"{src}: label value(s) {bad} outside the data set's labels 0..{len(lut) - 1} ({allowed})")
        return
    out = nib.Nifti1Image(lut[data.astype(np.int64)], img.affine, img.header)
    out.set_data_dtype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp.nii.gz", dir=dst.parent)
    os.close(fd)
    try:
        nib.save(out, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _relative(path: str | Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return Path(path).as_posix()


def convert_msd_mapping(
    mapping_file: str | os.PathLike,
    out_datalist: str | os.PathLike,
    val_split: float | int = 0.2,
    test_split: float | int = 0,
    seed: int = 0,
    overwrite: bool = False,
    data_root: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Convert the MSD-style data sets of a mapping file into one multi-region datalist (schema in
    :py:mod:`medfm_ops.data.synthetic`) whose items carry ``dataset`` and ``annotated`` (partial labels).

    Args:
        mapping_file: the mapping JSON (format in this module's docstring).
        out_datalist: datalist JSON to write; remapped labels go to ``labels/`` beside it.
        val_split: validation fraction in (0, 1) or number of cases, per data set. Defaults to 0.2.
        test_split: test fraction or number of cases per data set; 0 writes no test cases. Defaults to 0.
        seed: split seed. Defaults to 0.
        overwrite: replace an existing ``out_datalist``. Defaults to False.
        data_root: base of the mapping's relative data set dirs, overriding its ``data_root``. Defaults to None.
        extra: top-level entries added to the datalist (e.g. how it was built). Defaults to None.

    Returns:
        the written datalist (as a dict); its ``datasets`` entry records each data set's source, region, label
        mapping, annotated classes, remapped-label folder (or null) and split.

    Raises:
        FileExistsError: when ``out_datalist`` exists and ``overwrite`` is not set.
        FileNotFoundError, ValueError: see :py:func:`read_msd_mapping`; ValueError on an impossible split.
        DatasetIntegrityError: listing every label file with values outside its ``dataset.json`` labels.
    """
    out = Path(out_datalist).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True to replace it.")
    mapping = read_msd_mapping(mapping_file, data_root=data_root)
    region_names = list(mapping["regions"])
    datalist: dict[str, Any] = {
        "name": mapping["name"],
        "description": f"converted from the MSD-style data sets of {Path(mapping_file).expanduser().absolute()}",
        "regions": [
            {"name": r, "task_id": t, "labels": {str(i): c for i, c in enumerate(mapping["regions"][r], start=1)}}
            for t, r in enumerate(region_names)
        ],
        "datasets": [],
        "training": [],
        "validation": [],
    }
    problems: list[str] = []
    for ds in mapping["datasets"]:
        task, classes = region_names.index(ds["region"]), mapping["regions"][ds["region"]]
        lut = _lookup(ds["value_map"], classes)
        identity = all(lut[v] == v for v in range(1, len(lut)))
        label_dir = None if identity else out.parent / "labels" / ds["name"]
        allowed = ", ".join(f"{k}={v}" for k, v in ds["label_names"].items())
        ds_val, ds_test = ds["split"].get("val", val_split), ds["split"].get("test", test_split)
        groups = case_groups(ds["cases"], ds["split"].get("group_pattern"))
        parts = split_cases(ds["cases"], val_split=ds_val, test_split=ds_test, seed=seed, groups=groups)
        group_of = {} if groups is None else {c["image"]: g for c, g in zip(ds["cases"], groups)}
        for section, cases in parts.items():
            for case in cases:
                label = case["label"]
                if label_dir is not None:
                    label = str(label_dir / Path(case["label"]).name)
                    _remap_label(case["label"], Path(label), lut, problems, allowed)
                datalist.setdefault(section, []).append(
                    {
                        "image": _relative(case["image"], out.parent),
                        "label": _relative(label, out.parent),
                        "region": task,
                        "region_name": ds["region"],
                        "label_names": datalist["regions"][task]["labels"],
                        "dataset": ds["name"],
                        "annotated": ds["annotated"],
                        **({} if groups is None else {"group": group_of[case["image"]]}),
                    }
                )
        datalist["datasets"].append(
            {
                "name": ds["name"],
                "source": str(ds["dir"]),
                "region": ds["region"],
                "modality": ds["info"].get("modality"),
                "msd_labels": {str(v): c for v, c in sorted(ds["value_map"].items())},
                "annotated": ds["annotated"],
                "remapped_labels": None if label_dir is None else _relative(label_dir, out.parent),
                "split": {"seed": int(seed), "val_split": ds_val, "test_split": ds_test,
                          "group_pattern": ds["split"].get("group_pattern"),
                          **{f"num_{k}": len(v) for k, v in parts.items()},
                          **{f"num_{k}_groups": len({group_of[c["image"]] for c in v}) for k, v in parts.items()
                             if groups is not None}},
            }
        )
    if problems:
        raise DatasetIntegrityError(f"MSD mapping {Path(mapping_file)}", problems)
    if not datalist.get("test"):
        datalist.pop("test", None)
    datalist.update(dict(extra or {}))
    atomic_write_json(out, datalist)
    return datalist
