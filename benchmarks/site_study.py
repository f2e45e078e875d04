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
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfm_ops.data import (
    convert_msd_mapping,
    load_datalist,
    merge_datalists,
    read_msd_dataset,
    split_cases,
    write_msd_subset,
)
from medfm_ops.finetune.split import write_split
from medfm_ops.utils.atomic_io import atomic_write_json

__all__ = ["STUDY_PARTS", "build_pretraining_datalist", "draw_training_cases", "load_or_create_study_split",
           "write_draw_split"]  # fmt: skip

#: the parts of a study split, in the order the seeded permutation fills them (public first)
STUDY_PARTS = ("public", "site_validation", "site_pool")


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
    reused = path.is_file()
    if reused:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"study split {path}: invalid JSON ({e}).") from e
        asked = {k: saved.get(k) for k in settings}
        if asked != settings:
            raise ValueError(
                f"study split {path} was made with {asked} but {settings} were asked: pass the saved values, or "
                "delete the file and every run made from it (a new split changes what the foundation saw)."
            )
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
    info = {"study_split": Path(study["study_file"]).name, "num_cases": len(training),
            "all_cases": len(training) == len(study["site_pool"]), "draw_seed": int(seed), "draw": "nested"}  # fmt: skip
    return write_split(study["dataset_dir"], split_file, training, study["site_validation"], info=info)


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
