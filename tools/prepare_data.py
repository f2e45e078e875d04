# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Prepare datalists for the segmentation bundles.

    # synthetic multi-region set (cached under out_dir/synthetic_<fingerprint>/)
    python tools/prepare_data.py synthetic --out_dir ~/.cache/medfm/synthetic --size 32 --cases_per_region 8 --seed 0

    # an MSD-style data set as one region; --append adds it to an existing datalist as the next task id
    python tools/prepare_data.py msd --dataset_dir ../shared/data/msd_hippocampus --region_name brain_hippocampus \
        --out_datalist data/multi_region.json [--append] [--val_split 0.2] [--test_split 0] [--seed 0]

    # several MSD-style data sets into regions with partial labels, by a mapping file (format in
    # medfm_ops/data/msd_mapping.py and bundles/lorkd_seg/docs/README.md)
    python tools/prepare_data.py msd_map --mapping data/mapping.json --out_datalist data/multi_region.json \
        [--val_split 0.2] [--test_split 0] [--seed 0] [--overwrite]

    # the real multi-region set shipped as bundles/lorkd_seg/data/real_regions.json: brain_mri (MSD hippocampus)
    # and heart_mri (ACDC, split by patient); train / val / test with a fixed seed, recorded in the datalist
    python tools/prepare_data.py real_regions [--out_dir ~/.cache/medfm/real_regions] [--data_root ../shared/data] \
        [--seed 0] [--mapping bundles/lorkd_seg/data/real_regions.json]

    # a site split of an MSD-style data set with only the cases a pre-training datalist neither trains nor
    # validates on (so that data set can stand in for a site's own folder without a leak)
    python tools/prepare_data.py site_split --dataset_dir ../shared/data/msd_hippocampus \
        --datalist ~/.cache/medfm/real_regions/datalist.json --out ~/.cache/medfm/real_regions/site_split_brain_mri.json \
        [--num_validation N] [--num_training N] [--seed 0]

    # two datalists region by region (e.g. the synthetic set + real data sets converted by a mapping file whose
    # region lists the base's classes first; rules in medfm_ops/data/datalist_merge.py)
    python tools/prepare_data.py merge --base synthetic/datalist.json --extra data/multi_region.json \
        --out_datalist data/merged.json [--overwrite]

All print what they wrote. The datalist schema is documented in ``medfm_ops.data.synthetic``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import fire

from medfm_ops.bundle_paths import default_cache_dir
from medfm_ops.data import (
    convert_msd,
    convert_msd_mapping,
    ensure_mapped_datalist,
    ensure_synthetic_dataset,
    load_datalist,
    merge_datalists,
)

REAL_REGIONS_MAPPING = Path(__file__).resolve().parents[1] / "bundles" / "lorkd_seg" / "data" / "real_regions.json"


def _summary(datalist: Path) -> str:
    table, sections = load_datalist(datalist)
    lines = [f"datalist: {datalist}"]
    for t in table.task_ids:
        counts = ", ".join(f"{s} {sum(1 for i in items if i['region'] == t)}" for s, items in sections.items())
        lines.append(
            f"  task {t} {table.task_names[t]}: classes {table.class_names[t]} -> channels "
            f"{table.channels_of(t)}; {counts}"
        )
        sources: dict[str, list[str]] = {}
        for items in sections.values():
            for i in items:
                if i["region"] == t:
                    sources.setdefault(i["dataset"], i["annotated"])
        if len(sources) > 1 or any(a != table.class_names[t] for a in sources.values()):
            lines += [f"    data set {d} annotates {a}" for d, a in sources.items()]
    lines.append(f"  union classes: {table.num_classes}")
    return "\n".join(lines)


def synthetic(
    out_dir: str,
    size: int | Sequence[int] = 32,
    cases_per_region: int = 8,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_cases_per_region: int = 0,
    regions: Sequence[str] | None = None,
) -> None:
    """Generate (or reuse) the synthetic multi-region data set under ``out_dir`` and print its datalist."""
    datalist = ensure_synthetic_dataset(
        Path(out_dir).expanduser(),
        size=size,
        cases_per_region=cases_per_region,
        seed=seed,
        val_fraction=val_fraction,
        test_cases_per_region=test_cases_per_region,
        regions=regions,
    )
    print(_summary(datalist))


def msd(
    dataset_dir: str,
    region_name: str,
    out_datalist: str,
    val_split: float = 0.2,
    test_split: float = 0,
    seed: int = 0,
    append: bool = False,
    overwrite: bool = False,
) -> None:
    """Convert an MSD-style data set into a datalist region (``--append`` to add it to an existing datalist)."""
    convert_msd(
        dataset_dir,
        region_name,
        out_datalist,
        val_split=val_split,
        test_split=test_split,
        seed=seed,
        append=append,
        overwrite=overwrite,
    )
    print(_summary(Path(out_datalist).expanduser()))


def msd_map(
    mapping: str,
    out_datalist: str,
    val_split: float = 0.2,
    test_split: float = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> None:
    """Convert the MSD-style data sets of a mapping file into one datalist with partial labels."""
    convert_msd_mapping(mapping, out_datalist, val_split=val_split, test_split=test_split, seed=seed,
                        overwrite=overwrite)
    print(_summary(Path(out_datalist).expanduser()))


def real_regions(
    out_dir: str | None = None,
    data_root: str | None = None,
    seed: int = 0,
    mapping: str | None = None,
) -> None:
    """Build (or reuse, when mapping, data root and seed are unchanged) the real brain + heart MRI datalist.

    Args:
        out_dir: folder of ``datalist.json``. Defaults to ``$MEDFM_CACHE/real_regions`` (``~/.cache/medfm/...``).
        data_root: folder holding ``msd_hippocampus/`` and ``acdc/``. Defaults to the mapping's (``../shared/data``
            from the repository root).
        seed: split seed (per data set; ACDC split by patient). Defaults to 0.
        mapping: the mapping file. Defaults to the shipped ``bundles/lorkd_seg/data/real_regions.json``.
    """
    out = out_dir or str(Path(default_cache_dir()) / "real_regions")
    mapping = mapping or str(REAL_REGIONS_MAPPING)
    print(_summary(Path(ensure_mapped_datalist(mapping, out, seed=seed, data_root=data_root))))


def site_split(
    dataset_dir: str,
    datalist: str,
    out: str,
    num_validation: int | None = None,
    num_training: int | None = None,
    seed: int = 0,
) -> None:
    """Write an explicit site split (``tools/finetune_site.py --split_file``) of the cases of ``dataset_dir`` that
    ``datalist`` neither trains nor validates on (``medfm_ops.finetune.write_unseen_split``).

    Args:
        dataset_dir: the MSD-style data set.
        datalist: the pre-training datalist whose training/validation cases are left out.
        out: the split file to write.
        num_validation: validation cases. Defaults to 20% of the unseen cases.
        num_training: training cases. Defaults to all the others.
        seed: permutation seed. Defaults to 0.
    """
    from medfm_ops.finetune import write_unseen_split

    split = write_unseen_split(dataset_dir, datalist, out, num_validation, num_training, seed)
    print(f"site split: {out}: {len(split['training'])} training / {len(split['validation'])} validation case(s) of "
          f"{split['dataset_dir']} ({split['info']['excluded_cases']} case(s) left out: in {datalist})")


def merge(base: str, extra: str, out_datalist: str, name: str | None = None, overwrite: bool = False) -> None:
    """Merge the regions and items of ``extra`` into ``base`` (base task ids kept) and write ``out_datalist``."""
    merge_datalists(base, extra, out_datalist, name=name, overwrite=overwrite)
    print(_summary(Path(out_datalist).expanduser()))


def main() -> None:
    """Run the CLI; data errors are printed as one line (no traceback) with exit status 2."""
    try:
        fire.Fire({"synthetic": synthetic, "msd": msd, "msd_map": msd_map, "real_regions": real_regions,
                   "site_split": site_split, "merge": merge})
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
