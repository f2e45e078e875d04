# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fine-tune one region expert on a site's own data and write the result as a complete, versioned MONAI bundle.

    python tools/finetune_site.py --expert_bundle /path/to/brain_expert --dataset_dir /data/Task04_Hippocampus \
        --output_dir /bundles/brain_expert_site [--mode lora|sparse] [--epochs 100] [--early_stop_patience 20] [--num_train_cases 20]
        [--sparse_budget 0.01 --sparse_variant l2 --sparse_lambda 1.0]

A thin entry point: it runs the expert bundle's own ``configs/train.json`` (with ``configs/train_lora.json`` for
``--mode lora``, ``configs/train_sparse.json`` for ``--mode sparse``: SH-PEFT, only the ``--sparse_budget`` most
important weights train) through :func:`medfm_ops.finetune.finetune_expert`; see ``docs/site_finetuning.md``. The
options are the fields of :class:`medfm_ops.finetune.SiteFinetuneSettings` (``--help`` lists them with their
defaults). ``--expert_bundle`` may also be a trained medfm training bundle (``bundles/foundation_seg``,
``bundles/lorkd_seg``) with ``--region``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from medfm_ops.finetune import SiteFinetuneSettings, finetune_expert
from medfm_ops.utils import OutputLockedError, OutputWriteError


def argument_parser() -> argparse.ArgumentParser:
    """The command line: the three paths, then one option per :class:`SiteFinetuneSettings` field."""
    parser = argparse.ArgumentParser(
        prog="finetune_site",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    paths = parser.add_argument_group("paths")
    paths.add_argument("--expert_bundle", required=True, default=argparse.SUPPRESS, help="expert bundle (or medfm training bundle) to start from")
    paths.add_argument("--dataset_dir", required=True, default=argparse.SUPPRESS, help="the site's MSD-style folder (dataset.json, imagesTr/, labelsTr/)")
    paths.add_argument("--output_dir", required=True, default=argparse.SUPPRESS, help="the bundle to write (replaced when the run succeeds)")
    SiteFinetuneSettings.add_arguments(parser.add_argument_group("settings (medfm_ops.finetune.SiteFinetuneSettings)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`~medfm_ops.finetune.finetune_expert`; 1 with a one-line error on bad input, a
    locked output folder or a refused write."""
    args = argument_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        finetune_expert(args.expert_bundle, args.dataset_dir, args.output_dir, SiteFinetuneSettings.from_namespace(args))
    except (ValueError, FileNotFoundError, NotImplementedError, TypeError, ArithmeticError, OutputLockedError,
            OutputWriteError) as e:  # one line naming the file / the other writer, no traceback
        print(f"\nfinetune_site: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
