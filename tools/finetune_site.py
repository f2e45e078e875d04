# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fine-tune one region expert on a site's own data and write the result as a complete, versioned MONAI bundle.

    python tools/finetune_site.py --expert_bundle /path/to/brain_expert --dataset_dir /data/Task04_Hippocampus \
        --output_dir /bundles/brain_expert_site [--mode lora|sparse] [--epochs 10] [--num_train_cases 20]
        [--sparse_budget 0.01 --sparse_variant l2 --sparse_lambda 1.0]

A thin entry point: it runs the expert bundle's own ``configs/train.json`` (with ``configs/train_lora.json`` for
``--mode lora``, ``configs/train_sparse.json`` for ``--mode sparse``: SH-PEFT, only the ``--sparse_budget`` most
important weights train) through :func:`medfm_ops.finetune.finetune_expert`; see ``docs/site_finetuning.md``. Any
argument of that function can be given as ``--name value``. ``--expert_bundle`` may also be a trained medfm training
bundle (``bundles/foundation_seg``, ``bundles/lorkd_seg``) with ``--region``.
"""

from __future__ import annotations

import inspect
import logging
import sys

import fire

from medfm_ops.finetune import finetune_expert


def _booleans(kwargs: dict) -> dict:
    """Fire passes ``--verify false`` as the (truthy) string "false": read true/false words of bool options."""
    flags = {n for n, p in inspect.signature(finetune_expert).parameters.items() if p.annotation in (bool, "bool")}
    out = dict(kwargs)
    for name in flags & set(out):
        value = out[name]
        if isinstance(value, str):
            if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"--{name} must be true or false, got {value!r}.")
            out[name] = value.strip().lower() in ("true", "1", "yes")
    return out


def main(**kwargs) -> None:
    """Run :func:`~medfm_ops.finetune.finetune_expert` with ``kwargs``; exits 1 with a one-line error on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    try:
        finetune_expert(**_booleans(kwargs))
    except (ValueError, FileNotFoundError, NotImplementedError, TypeError, ArithmeticError) as e:
        print(f"\nfinetune_site: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
