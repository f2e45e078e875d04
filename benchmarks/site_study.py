# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A data-efficiency study on one real data set: a saved public/site split, and N-case training draws at the site.

- :py:func:`load_or_create_study_split`: the data set's cases split once into a ``public`` part (a foundation model
  may train on it) and a disjoint site part: a fixed ``site_validation`` set (the same for every row, N and seed)
  and a ``site_pool`` of training cases. Saved to a JSON file; reused, never silently re-made.
- :py:func:`draw_training_cases`: N training cases of the pool for one seed. Draws are NESTED within a seed (the
  first N of one seeded permutation of the pool: N=5 is a subset of N=10, ...) and differ between seeds.
- :py:func:`write_draw_split`: one draw plus the site validation set as an explicit split file for
  :py:func:`~medfm_ops.finetune.finetune_expert` (``split_file``).
- :py:func:`build_pretraining_datalist`: a multi-region datalist = a base datalist (e.g. the synthetic default
  set) with the public cases added to one of its regions (their classes appended), through the mapping-file
  converter.

The population-shift study (ACDC: a pathology group held out as the site) has the same pieces, by patient:

- :py:func:`load_or_create_shift_split`: :py:func:`medfm_ops.data.split_held_out_population` saved once to a JSON
  file (pre-training cases, fixed site test set, site validation set, site pool), reused, never silently re-made.
- :py:func:`write_patient_draw_split`: N site PATIENTS (both frames) drawn from the pool, nested per seed
  (:py:func:`draw_training_cases` over the pool's patients), with the site validation set, as a split file.
- :py:func:`build_shift_pretraining_datalist`: the repository's real-region mapping file
  (``bundles/lorkd_seg/data/real_regions.json``) applied to MSD-style views of the pre-training cases only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfm_ops.data import (
    HOLDOUT_PARTS,
    convert_msd_mapping,
    load_datalist,
    merge_datalists,
    read_msd_dataset,
    split_cases,
    split_held_out_population,
    write_msd_subset,
)
from medfm_ops.finetune.split import write_split
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.json_file import read_saved_with_settings

__all__ = ["ACDC_POPULATIONS", "STUDY_PARTS", "build_pretraining_datalist", "build_shift_pretraining_datalist",
           "draw_training_cases", "load_or_create_shift_split", "load_or_create_study_split", "write_draw_split",
           "write_patient_draw_split"]  # fmt: skip

#: the parts of a study split, in the order the seeded permutation fills them (public first)
STUDY_PARTS = ("public", "site_validation", "site_pool")

#: ACDC's pathology groups by patient number (Bernard et al. 2018; ../shared/data/README.md): dilated
#: cardiomyopathy, hypertrophic cardiomyopathy, previous myocardial infarction, normal, abnormal right ventricle
ACDC_POPULATIONS = {"dcm": [1, 20], "hcm": [21, 40], "minf": [41, 60], "nor": [61, 80], "arv": [81, 100]}

#: the patient of an ACDC file name (``patient083_frame01.nii.gz``): both frames share it
ACDC_PATIENT_PATTERN = r"(patient\d+)_frame"


def _rel(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def load_or_create_study_split(
    dataset_dir: str | os.PathLike,
    study_file: str | os.PathLike,
    num_public: int = 120,
    num_validation: int = 30,
    seed: int = 0,
) -> dict[str, Any]:
    """
    The public/site split of an MSD-style data set: read from ``study_file`` when it exists, else made and saved.

    The cases (sorted by image path) are permuted with ``numpy.random.default_rng(seed)``; the first
    ``num_public`` are ``public``, the next ``num_validation`` the ``site_validation`` set, the rest the
    ``site_pool``. Each part is stored sorted by image path, relative to ``dataset_dir``.

    Args:
        dataset_dir: MSD-style directory (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        study_file: the JSON file of the split (created with its parents when missing).
        num_public: cases the foundation may see. Defaults to 120.
        num_validation: site validation cases. Defaults to 30.
        seed: permutation seed. Defaults to 0.

    Returns:
        ``{"dataset_dir", "study_file", "seed", "num_public", "num_validation", "label_names", "reused",
        "public", "site_validation", "site_pool"}``; the parts are lists of ``{"image", "label"}`` (absolute).

    Raises:
        ValueError: when the numbers leave no site training case, when an existing ``study_file`` was made with
            other settings or lists other cases than the data set now has (delete it, with the runs made from it,
            or pass its settings), or is not valid JSON.
        FileNotFoundError: when the data set or one of its files is missing.

    Example::

        study = load_or_create_study_split("../shared/data/msd_hippocampus", "runs/curve/study_split.json")
        [len(study[p]) for p in STUDY_PARTS]  # [120, 30, 50]
    """
    root = Path(dataset_dir).expanduser().resolve()
    label_names, cases, _ = read_msd_dataset(root)
    n_public, n_val = int(num_public), int(num_validation)
    if n_public < 1 or n_val < 1 or n_public + n_val >= len(cases):
        raise ValueError(
            f"num_public={num_public} and num_validation={num_validation} must be >= 1 and leave site training cases "
            f"out of the {len(cases)} cases of {root}."
        )
    settings = {"seed": int(seed), "num_public": n_public, "num_validation": n_val}
    path = Path(study_file)
    saved = read_saved_with_settings(path, settings, "study split")
    reused = saved is not None
    if reused:
        listed = sorted(c["image"] for p in STUDY_PARTS for c in saved.get(p, []))
        now = sorted(_rel(c["image"], root) for c in cases)
        if listed != now:
            raise ValueError(
                f"study split {path} lists {len(listed)} cases but {root} now has {len(now)} (or other ones): the data "
                "set changed since the split was made; delete the file and the runs made from it to split again."
            )
        parts = {p: [{k: str(root / c[k]) for k in ("image", "label")} for c in saved[p]] for p in STUDY_PARTS}
    else:
        # the one seeded split (split_cases): the permutation's first n_public cases, the next n_val, the rest
        split = split_cases(cases, val_split=n_public, test_split=n_val, seed=int(seed))
        named = {"public": split["validation"], "site_validation": split["test"], "site_pool": split["training"]}
        parts = {p: sorted(named[p], key=lambda c: c["image"]) for p in STUDY_PARTS}
        content = {
            "dataset_dir": str(root),
            **settings,
            "label_names": label_names,
            "description": "public: the foundation may train on these; site_validation: fixed validation set of "
            "every site run; site_pool: site training cases (N-case draws, nested per seed)",
            **{f"num_{p}_cases": len(parts[p]) for p in STUDY_PARTS},
            **{p: [{k: _rel(c[k], root) for k in ("image", "label")} for c in parts[p]] for p in STUDY_PARTS},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, content)
    return {"dataset_dir": str(root), "study_file": str(path.resolve()), **settings, "label_names": label_names,
            "reused": reused, **parts}  # fmt: skip


def draw_training_cases(pool: Sequence[Mapping[str, Any]], num_cases: int | str | None, seed: int) -> list[dict]:
    """
    ``num_cases`` training cases of ``pool`` for ``seed``: the first ``num_cases`` of
    ``numpy.random.default_rng(seed).permutation(len(pool))`` (nested: a smaller draw of one seed is a prefix of a
    larger one), in draw order.

    Args:
        pool: the site's training cases, in a stable order (as stored in the study split).
        num_cases: a number in ``1..len(pool)``, or ``"all"``/None for the whole pool (in the seed's order).
        seed: the draw seed (the run's training seed).

    Raises:
        ValueError: when ``num_cases`` is not in ``1..len(pool)`` (nor ``"all"``/None).

    Example::

        draw_training_cases(study["site_pool"], 5, seed=1) == draw_training_cases(study["site_pool"], 10, seed=1)[:5]
    """
    order = np.random.default_rng(int(seed)).permutation(len(pool)).tolist()
    if num_cases is None or str(num_cases).lower() == "all":
        n = len(pool)
    else:
        n = int(num_cases)
        if not 1 <= n <= len(pool):
            raise ValueError(f"num_cases={num_cases} must be in 1..{len(pool)} (the site pool) or 'all'.")
    return [dict(pool[i]) for i in order[:n]]


def write_draw_split(
    study: Mapping[str, Any], split_file: str | os.PathLike, num_cases: int | str | None, seed: int
) -> dict[str, Any]:
    """
    The explicit split of one study run: :py:func:`draw_training_cases` of the site pool for ``seed``, validated on
    the study's ``site_validation`` set, saved with :py:func:`~medfm_ops.finetune.write_split` (reused when the same,
    an error when ``split_file`` holds another draw).

    Returns:
        :py:func:`~medfm_ops.finetune.write_split`'s dict; its ``info`` records the study file, N and the seed.
    """
    training = draw_training_cases(study["site_pool"], num_cases, seed)
    return _save_draw(study, split_file, training, seed, study_split=Path(study["study_file"]).name,
                      num_cases=len(training), all_cases=len(training) == len(study["site_pool"]))  # fmt: skip


def _save_draw(
    source: Mapping[str, Any], split_file: str | os.PathLike, training: list[dict], seed: int, **info: Any
) -> dict[str, Any]:
    """Save one seed's nested draw ``training``, validated on ``source["site_validation"]``, with
    :py:func:`~medfm_ops.finetune.write_split`; its ``info`` is ``info`` plus the seed and the kind of draw."""
    info = {**info, "draw_seed": int(seed), "draw": "nested"}
    return write_split(source["dataset_dir"], split_file, training, source["site_validation"], info=info)


def build_pretraining_datalist(
    study: Mapping[str, Any],
    out_dir: str | os.PathLike,
    base_datalist: str | os.PathLike,
    region: str = "brain_mri",
    val_split: float | int = 0.2,
    seed: int = 0,
) -> Path:
    """
    A multi-region datalist = ``base_datalist`` with the study's ``public`` cases added to ``region``.

    Steps, all under ``out_dir``: ``public_data/dataset.json`` (an MSD-style view of the public cases,
    :py:func:`~medfm_ops.data.write_msd_subset`; no data copied), ``mapping.json`` (the public view -> ``region``,
    each label of the data set to a class of its own name, appended after the region's base classes),
    ``public_datalist.json`` (:py:func:`~medfm_ops.data.convert_msd_mapping`; label files rewritten with
    region-local values into ``labels/``), ``datalist.json`` (:py:func:`~medfm_ops.data.merge_datalists`: the base's
    task ids kept, the public items annotate only their own classes, the base's items only the base classes).

    Args:
        study: :py:func:`load_or_create_study_split`'s dict.
        out_dir: directory of the generated files (created; files replaced).
        base_datalist: the base datalist (e.g. :py:func:`~medfm_ops.data.ensure_synthetic_dataset`'s).
        region: the base region the public cases join (a new region when the base has none of that name).
            Defaults to ``"brain_mri"``.
        val_split: validation fraction or count of the public cases (for the foundation's own validation).
            Defaults to 0.2.
        seed: seed of that split. Defaults to 0.

    Returns:
        the path of ``datalist.json``.

    Raises:
        ValueError: when a data set label has the name of a base class of ``region`` (its cases would claim to
            annotate a class they do not), or from the converters.
    """
    out = Path(out_dir).expanduser().absolute()
    view = out / "public_data"
    write_msd_subset(study["dataset_dir"], study["public"], view, name=f"{Path(study['dataset_dir']).name}_public")
    table, _ = load_datalist(base_datalist)
    base_classes = next((table.class_names[t] for t, n in table.region_names.items() if n == region), [])
    names = [study["label_names"][str(i)] for i in range(1, len(study["label_names"]) + 1)]
    clash = sorted(set(names) & set(base_classes))
    if clash:
        raise ValueError(f"the data set's classes {clash} are already classes of region '{region}' in "
                         f"{base_datalist}: its cases would not annotate them; choose another region.")  # fmt: skip
    mapping = {
        "name": f"{Path(study['dataset_dir']).name}_public",
        "regions": {region: [*base_classes, *names]},
        "datasets": {"public_data": {"region": region, "labels": {str(i): n for i, n in enumerate(names, start=1)},
                                     "name": f"{Path(study['dataset_dir']).name}_public"}},
    }  # fmt: skip
    atomic_write_json(out / "mapping.json", mapping)
    convert_msd_mapping(out / "mapping.json", out / "public_datalist.json", val_split=val_split, seed=seed,
                        overwrite=True)  # fmt: skip
    merge_datalists(base_datalist, out / "public_datalist.json", out / "datalist.json", overwrite=True)
    return out / "datalist.json"


def load_or_create_shift_split(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    held_out: Sequence[str] = ("arv",),
    num_test: int = 5,
    num_validation: int = 2,
    seed: int = 0,
    populations: Mapping[str, Sequence[int]] | None = None,
    group_pattern: str = ACDC_PATIENT_PATTERN,
) -> dict[str, Any]:
    """
    The held-out-population split of an MSD-style data set (:py:func:`medfm_ops.data.split_held_out_population`):
    read from ``split_file`` when it exists, else made and saved (atomic write).

    Args:
        dataset_dir: MSD-style directory (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        split_file: the JSON file of the split (created with its parents when missing).
        held_out: the site's populations. Defaults to ``("arv",)`` (ACDC's abnormal right ventricle group).
        num_test, num_validation: site patients of the fixed test set / of the validation set. Default to 5, 2.
        seed: permutation seed of the site split. Defaults to 0.
        populations: ``{name: [first, last]}`` patient numbers. Defaults to :data:`ACDC_POPULATIONS`.
        group_pattern: the patient in a file name. Defaults to :data:`ACDC_PATIENT_PATTERN`.

    Returns:
        ``{"dataset_dir", "split_file", "label_names", "reused", <settings>, <parts>}``; the parts
        (:data:`~medfm_ops.data.HOLDOUT_PARTS`) are lists of ``{"image", "label", "group", "population"}``
        (absolute paths), each sorted by image path.

    Raises:
        ValueError: when an existing ``split_file`` was made with other settings or lists other cases than the data
            set now has (delete it and the runs made from it), is not valid JSON, or from the splitter.
        FileNotFoundError: when the data set or one of its files is missing.
    """
    root = Path(dataset_dir).expanduser().resolve()
    label_names, cases, _ = read_msd_dataset(root)
    settings = {"held_out": sorted(dict.fromkeys(str(h) for h in held_out)), "num_test": int(num_test),
                "num_validation": int(num_validation), "seed": int(seed),
                "populations": {k: list(v) for k, v in (populations or ACDC_POPULATIONS).items()},
                "group_pattern": group_pattern}  # fmt: skip
    path = Path(split_file)
    saved = read_saved_with_settings(path, settings, "population split")
    reused = saved is not None
    if reused:
        listed = sorted(c["image"] for p in HOLDOUT_PARTS for c in saved.get(p, []))
        if listed != sorted(_rel(c["image"], root) for c in cases):
            raise ValueError(f"population split {path} lists other cases than {root} now has: the data set changed; "
                             "delete the file and the runs made from it to split again.")  # fmt: skip
        parts = {p: [{**c, "image": str(root / c["image"]), "label": str(root / c["label"])} for c in saved[p]]
                 for p in HOLDOUT_PARTS}  # fmt: skip
    else:
        split = split_held_out_population(cases, group_pattern, settings["populations"], settings["held_out"],
                                          num_test, num_validation, seed)  # fmt: skip
        parts = {p: sorted(split[p], key=lambda c: c["image"]) for p in HOLDOUT_PARTS}
        content = {
            "dataset_dir": str(root),
            **settings,
            "label_names": label_names,
            "description": "pretraining: the populations not held out (the foundation may train on them); site_test: "
            "fixed test set of every site run (reporting only); site_validation: model selection of every site run; "
            "site_pool: site training patients (N-patient draws, nested per seed); split by patient",
            **{f"num_{p}_patients": len({c["group"] for c in parts[p]}) for p in HOLDOUT_PARTS},
            **{p: [{**c, "image": _rel(c["image"], root), "label": _rel(c["label"], root)} for c in parts[p]]
               for p in HOLDOUT_PARTS},
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, content)
    return {"dataset_dir": str(root), "split_file": str(path.resolve()), **settings, "label_names": label_names,
            "reused": reused, **parts}  # fmt: skip


def patients_of(cases: Sequence[Mapping[str, Any]]) -> list[str]:
    """The distinct ``group`` (patient) names of ``cases``, in order of first appearance."""
    return list(dict.fromkeys(c["group"] for c in cases))


def write_patient_draw_split(
    split: Mapping[str, Any], split_file: str | os.PathLike, num_patients: int | str | None, seed: int
) -> dict[str, Any]:
    """
    One run's explicit split for :py:func:`~medfm_ops.finetune.finetune_expert`: ``num_patients`` patients of the
    site pool drawn with :py:func:`draw_training_cases` over the pool's patients (nested per seed), trained on with
    all their frames, validated (model selection) on the split's ``site_validation`` set. The fixed ``site_test`` set
    is not in it: it is scored afterwards through the written bundle.

    Returns:
        :py:func:`~medfm_ops.finetune.write_split`'s dict; its ``info`` records the split file, N and the seed.
    """
    pool = split["site_pool"]
    chosen = [p["group"] for p in draw_training_cases([{"group": g} for g in patients_of(pool)], num_patients, seed)]
    training = [c for g in chosen for c in pool if c["group"] == g]
    return _save_draw(split, split_file, training, seed, population_split=Path(split["split_file"]).name,
                      num_patients=len(chosen), patients=chosen, all_patients=len(chosen) == len(patients_of(pool)))


def build_shift_pretraining_datalist(
    split: Mapping[str, Any],
    out_dir: str | os.PathLike,
    mapping_file: str | os.PathLike,
    dataset_key: str = "acdc",
    val_patients: int = 6,
    other_cases: int | None = None,
    seed: int = 0,
) -> Path:
    """
    The pre-training datalist of the population-shift study: ``mapping_file`` (e.g. the repository's
    ``bundles/lorkd_seg/data/real_regions.json``) with its ``dataset_key`` data set replaced by an MSD-style view of
    the split's ``pretraining`` cases (no held-out patient can reach the foundation), converted with
    :py:func:`~medfm_ops.data.convert_msd_mapping` (the mapping mechanism: regions, labels, partial labels).

    Files under ``out_dir``: ``<dataset_key>_pretraining/dataset.json`` (the view), ``<name>_subset/dataset.json``
    for every other data set when ``other_cases`` limits it (its first ``other_cases`` cases by path), ``mapping.json``
    and ``datalist.json``.

    Args:
        split: :py:func:`load_or_create_shift_split`'s dict.
        out_dir: directory of the generated files (created; files replaced).
        mapping_file: the mapping file whose data sets to use (relative dirs resolved as the mapping says).
        dataset_key: the mapping's entry of the split's data set (matched by directory name). Defaults to ``"acdc"``.
        val_patients: patients of the pre-training cases kept for the foundation's own validation. Defaults to 6.
        other_cases: cases of each other data set (None: all). Defaults to None.
        seed: seed of the pre-training validation split. Defaults to 0.

    Returns:
        the path of ``datalist.json``.

    Raises:
        ValueError: when the mapping has no ``dataset_key`` entry, or from the converters.
    """
    src = Path(mapping_file).expanduser().resolve()
    mapping = json.loads(src.read_text(encoding="utf-8"))
    base = (src.parent / mapping.get("data_root", ".")).resolve()
    keys = {Path(k).name: k for k in mapping.get("datasets", {})}
    if dataset_key not in keys:
        raise ValueError(f"{src}: no data set '{dataset_key}' in 'datasets' (has {sorted(keys)}).")
    out = Path(out_dir).expanduser().absolute()
    datasets = {}
    for name, key in keys.items():
        entry = dict(mapping["datasets"][key])
        directory = Path(key) if Path(key).is_absolute() else base / key
        if name == dataset_key:
            view = out / f"{name}_pretraining"
            write_msd_subset(split["dataset_dir"], split["pretraining"], view, name=f"{name} pre-training populations")
            entry["split"] = {**entry.get("split", {}), "val": int(val_patients), "test": 0}
        elif other_cases is not None:
            _, cases, _ = read_msd_dataset(directory)
            view = out / f"{name}_subset"
            write_msd_subset(directory, sorted(cases, key=lambda c: c["image"])[: int(other_cases)], view)
            entry["split"] = {**entry.get("split", {}), "test": 0}
        else:
            view = directory.resolve()
            entry["split"] = {**entry.get("split", {}), "test": 0}
        entry.setdefault("name", name)
        datasets[str(view)] = entry
    derived = {"name": f"{mapping.get('name', src.stem)}_without_{'_'.join(split['held_out'])}",
               "regions": mapping.get("regions", {}), "datasets": datasets}  # fmt: skip
    atomic_write_json(out / "mapping.json", derived)
    convert_msd_mapping(out / "mapping.json", out / "datalist.json", seed=seed, overwrite=True,
                        extra={"derived_from": str(src), "held_out": split["held_out"]})  # fmt: skip
    return out / "datalist.json"
