# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
A population held out of a data set as a clinical site: a real distribution shift, split by patient.

A data set whose patients fall into populations (ACDC: five pathology groups by patient number) is divided into
the cases a foundation may pre-train on (every population but the held-out ones) and a site (the held-out
populations). The site is split BY PATIENT with the one seeded splitter, :py:func:`~medfm_ops.data.msd.split_cases`
(``groups`` = the patients of :py:func:`~medfm_ops.data.msd.case_groups`), into a fixed ``site_test`` set, a
``site_validation`` set (model selection, e.g. early stopping of a site run) and a ``site_pool`` of training patients.

Example::

    _, cases, _ = read_msd_dataset("../shared/data/acdc")
    parts = split_held_out_population(cases, r"(patient(\\d+))_", {"arv": (81, 100), ...}, ["arv"], 5, 2, seed=0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from medfm_ops.data.msd import case_groups, split_cases

__all__ = ["HOLDOUT_PARTS", "case_populations", "split_held_out_population"]

#: the parts of a held-out population split (``pretraining``: the other populations)
HOLDOUT_PARTS = ("pretraining", "site_test", "site_validation", "site_pool")


def case_populations(
    groups: Sequence[str], populations: Mapping[str, Sequence[int]], where: str = "populations"
) -> list[str]:
    """
    The population of each case from the number in its group name (e.g. ``patient083`` -> 83).

    Args:
        groups: one group (patient) name per case, each holding one number (:py:func:`case_groups`).
        populations: ``{name: (first, last)}`` inclusive number ranges, disjoint.
        where: what to name in error messages. Defaults to ``"populations"``.

    Raises:
        ValueError: on a malformed or overlapping range, a group name without a number, or a number in no range.
    """
    ranges = {}
    for name, bounds in populations.items():
        if not isinstance(bounds, Sequence) or len(bounds) != 2 or not all(isinstance(b, int) for b in bounds) \
                or bounds[0] > bounds[1]:  # fmt: skip
            raise ValueError(f"{where}['{name}'] must be [first, last] patient numbers (first <= last), got {bounds!r}.")
        ranges[name] = (int(bounds[0]), int(bounds[1]))
    spans = sorted((lo, hi, n) for n, (lo, hi) in ranges.items())
    for (_, hi, a), (lo, _, b) in zip(spans, spans[1:]):
        if lo <= hi:
            raise ValueError(f"{where}: the ranges of '{a}' and '{b}' overlap.")
    out = []
    for g in groups:
        m = re.search(r"\d+", str(g))
        if m is None:
            raise ValueError(f"{where}: group '{g}' holds no patient number.")
        number = int(m.group())
        name = next((n for lo, hi, n in spans if lo <= number <= hi), None)
        if name is None:
            raise ValueError(f"{where}: patient {number} ('{g}') is in none of the ranges {ranges}.")
        out.append(name)
    return out


def split_held_out_population(
    cases: list[dict[str, Any]],
    group_pattern: str,
    populations: Mapping[str, Sequence[int]],
    held_out: Sequence[str],
    num_test: int,
    num_validation: int,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """
    Split ``cases`` into ``pretraining`` (populations not held out) and a site (the ``held_out`` populations) made of
    ``site_test`` (``num_test`` patients), ``site_validation`` (``num_validation`` patients) and ``site_pool`` (the
    other site patients); every case of a patient lands in one part.

    The site split is :py:func:`~medfm_ops.data.msd.split_cases` of the site cases with their patients as ``groups``
    (its ``validation`` section -> ``site_test``, ``test`` -> ``site_validation``, ``training`` -> ``site_pool``).

    Args:
        cases: ``[{"image", "label"}, ...]`` in a stable order (e.g. sorted by path).
        group_pattern: regular expression whose first group, searched in each image's file name, is the patient.
        populations: ``{name: (first, last)}`` patient-number ranges (:py:func:`case_populations`).
        held_out: the site's populations (one or more names of ``populations``); the others pre-train.
        num_test, num_validation: site patients in the fixed test set and in the validation set (>= 1 each).
        seed: permutation seed. Defaults to 0.

    Returns:
        ``{part: [case + {"group", "population"}, ...]}`` for every part of :data:`HOLDOUT_PARTS`, in input order.

    Raises:
        ValueError: on an unknown or empty ``held_out``, no pre-training case, or counts that leave no pool patient.
    """
    held = list(dict.fromkeys(str(h) for h in held_out))
    unknown = sorted(set(held) - set(populations))
    if not held or unknown:
        raise ValueError(f"held_out must name populations among {sorted(populations)}, got {list(held_out)!r}.")
    groups = case_groups(cases, group_pattern)
    pops = case_populations(groups, populations)
    tagged = [{**c, "group": g, "population": p} for c, g, p in zip(cases, groups, pops)]
    site = [c for c in tagged if c["population"] in held]
    pretraining = [c for c in tagged if c["population"] not in held]
    if not pretraining:
        raise ValueError(f"held_out={held} leaves no pre-training case.")
    patients = len({c["group"] for c in site})
    n_test, n_val = int(num_test), int(num_validation)
    if n_test < 1 or n_val < 1 or n_test + n_val >= patients:
        raise ValueError(f"num_test={num_test} and num_validation={num_validation} patients must be >= 1 and leave "
                         f"site pool patients out of the {patients} patients of {held}.")  # fmt: skip
    parts = split_cases(site, val_split=n_test, test_split=n_val, seed=int(seed), groups=[c["group"] for c in site])
    return {"pretraining": pretraining, "site_test": parts["validation"], "site_validation": parts["test"],
            "site_pool": parts["training"]}  # fmt: skip
