# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The site fine-tuning settings, defined once: :class:`SiteFinetuneSettings` owns every default and its help text.

The same object feeds the command line (``tools/finetune_site.py`` builds its options from the fields, so ``--help``
lists them with their defaults), the pipeline (:py:func:`~medfm_ops.finetune.finetune_expert`) and the written
bundle (its ``configs/train*.json`` values and ``docs/finetune_summary.json``'s ``settings``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from medfm_ops.finetune.lora import check_mode
from medfm_ops.peft import check_sparse_settings

__all__ = ["SiteFinetuneSettings"]


def _doc(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class SiteFinetuneSettings:
    """
    Settings of one site fine-tuning run (everything but the three paths: source, data set, output).

    Each field's help text is its documentation (``SiteFinetuneSettings.help(name)``, or
    ``python tools/finetune_site.py --help``). Construct with keywords, e.g.
    ``SiteFinetuneSettings(mode="lora", epochs=4)``; :py:meth:`check` validates the values before any work.
    """

    region: str | None = _doc("region of a training bundle source; None: its only region", None)
    mode: str = _doc("full, lora (adapters fused back: a stock network) or sparse (SH-PEFT: only the "
                     "sparse_budget most important weights train)", "full")  # fmt: skip
    init: str = _doc("pretrained or scratch (same architecture, seeded random weights)", "pretrained")
    head: str = _doc("auto, keep or resize (see docs/site_finetuning.md)", "auto")
    epochs: int = _doc("training epochs (a ceiling with early_stop_patience), written into the new bundle's train.json",
                       100)
    val_interval: int = _doc("validate every N epochs; must divide epochs", 1)
    early_stop_patience: int = _doc("stop after N validations without a better validation Dice (epochs is then a "
                                    "ceiling); 0: train every epoch", 20)
    batch_size: int = _doc("training batch size", 4)
    learning_rate: float = _doc("learning rate", 1e-3)
    lr_grid: list[float] | None = _doc("learning rates to try, e.g. 2e-4,2e-3: each trains from the same start and "
                                       "the one whose bundle scores the best validation DSC is kept (its rate "
                                       "replaces learning_rate); None: learning_rate only", None)  # fmt: skip
    weight_decay: float = _doc("weight decay", 1e-5)
    seed: int = _doc("seed of the fresh weights and of training (data order, augmentation)", 0)
    split_seed: int | None = _doc("seed of the train/validation split; None: seed", None)
    val_split: float | int = _doc("validation fraction in (0, 1) or number of cases of a new split", 0.2)
    split_file: str | os.PathLike | None = _doc("a saved split to reuse (seeded or explicit case lists); None: "
                                  "{output_dir}/docs/split.json when it exists, else a new seeded split", None)  # fmt: skip
    num_train_cases: int | None = _doc("use only the first N training cases (shortened runs); None: all", None)
    num_val_cases: int | None = _doc("use only the first N validation cases; None: all", None)
    roi_size: list[int] | None = _doc("training patch and inference window, e.g. 32,32,32; None: the source's", None)
    spacing: list[float] | None = _doc("target spacing in mm; None: the source's (or the first training image's)",
                                       None)  # fmt: skip
    lora_rank: int = _doc("LoRA rank (mode lora)", 8)
    lora_alpha: float = _doc("LoRA alpha (mode lora)", 16.0)
    sparse_budget: float = _doc("SH-PEFT: fraction of all weights that train (mode sparse)", 0.01)
    sparse_variant: str = _doc("SH-PEFT importance variant, l2 or l1 (mode sparse)", "l2")
    sparse_lambda: float = _doc("SH-PEFT weight of the magnitude part of the importance (mode sparse)", 1.0)
    nsd_tolerance_mm: float = _doc("NSD tolerance in mm", 1.0)
    score_before: bool = _doc("score the starting bundle on the validation cases before training", True)
    version: str | None = _doc("version of the new bundle; None: the source's with the minor number bumped", None)
    device: str | None = _doc("e.g. cpu or cuda:0; None: the bundle's choice (CUDA when available)", None)
    verify: bool = _doc("run MONAI's verify_metadata, verify_net_in_out and ckpt_export on the result", True)
    progress: bool = _doc("show a progress bar per training epoch (on a terminal only)", True)

    def check(self) -> SiteFinetuneSettings:
        """
        Validate the values (before any file is written).

        Raises:
            ValueError: naming the setting: unknown ``mode``, ``epochs`` < 1, a ``val_interval`` that does not
                divide ``epochs`` (the last epoch must be validated so that the written model is the best one of
                this run), an empty ``lr_grid`` or one with a rate <= 0 or repeated, bad SH-PEFT settings.
        """
        check_mode(self.mode)
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}.")
        if int(self.val_interval) < 1 or int(self.epochs) % int(self.val_interval):
            raise ValueError(
                f"val_interval={self.val_interval} must divide epochs={self.epochs}: the last epoch must be validated "
                "so that the written model is the best one of THIS run."
            )
        if int(self.early_stop_patience) < 0:
            raise ValueError(f"early_stop_patience must be >= 0 (0: no early stopping), got {self.early_stop_patience}.")
        if self.lr_grid is not None:
            rates = [float(r) for r in self.lr_grid]
            if not rates or any(not math.isfinite(r) or r <= 0 for r in rates) or len(set(rates)) != len(rates):
                raise ValueError(f"lr_grid must list distinct learning rates > 0 (or be None), got {self.lr_grid}.")
        check_sparse_settings(self.sparse_budget, self.sparse_variant, self.sparse_lambda)
        return self

    @property
    def effective_split_seed(self) -> int:
        """``split_seed``, or ``seed`` when it is None."""
        return int(self.seed if self.split_seed is None else self.split_seed)

    def train_settings(self) -> dict[str, Any]:
        """The values written into the new bundle's ``configs/train.json`` (and recorded in the summary)."""
        return {"epochs": int(self.epochs), "val_interval": int(self.val_interval),
                "early_stop_patience": int(self.early_stop_patience), "batch_size": int(self.batch_size),
                "learning_rate": float(self.learning_rate), "weight_decay": float(self.weight_decay),
                "seed": int(self.seed), "val_split": self.val_split}  # fmt: skip

    def config_values(self) -> dict[str, dict[str, Any]]:
        """Literal values per config file of the written bundle (``write_expert_bundle(config_values=...)``)."""
        return {
            "train.json": self.train_settings(),
            "train_lora.json": {"lora_rank": int(self.lora_rank), "lora_alpha": float(self.lora_alpha)},
            "train_sparse.json": {"sparse_budget": float(self.sparse_budget), "sparse_variant": str(self.sparse_variant),
                                  "sparse_lambda": float(self.sparse_lambda)},
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain JSON values (recorded in ``docs/finetune_summary.json``; a path as a string)."""
        return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of field ``name``."""
        return {f.name: f.metadata["help"] for f in dataclasses.fields(cls)}[name]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one ``--name`` option per field (type, default and help from the field) to ``parser``."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            parser.add_argument(f"--{f.name}", type=_parser_for(hints[f.name], f.name), default=f.default,
                                help=f.metadata["help"], metavar=_metavar(hints[f.name]))  # fmt: skip
        return parser

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> SiteFinetuneSettings:
        """The settings held by parsed ``args`` (options added by :py:meth:`add_arguments`)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _parts(hint: Any) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = str if str in args else args[0] if len(args) == 1 else tuple(args)  # a path: its string
        return base, len(args) < len(typing.get_args(hint))
    return hint, False


def _metavar(hint: Any) -> str:
    base, _ = _parts(hint)
    if typing.get_origin(base) is list:
        return "A,B,C"
    if base is bool:
        return "true|false"
    return {int: "INT", float: "FLOAT", str: "STR"}.get(base, "NUMBER")


def _parser_for(hint: Any, name: str):
    """A function reading one command-line word as a value of ``hint`` (``none`` for an optional value)."""
    base, optional = _parts(hint)

    def parse(text: str) -> Any:
        word = text.strip()
        if optional and word.lower() in ("none", "null", ""):
            return None
        if base is bool:
            if word.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise argparse.ArgumentTypeError(f"--{name} must be true or false, got {text!r}")
            return word.lower() in ("true", "1", "yes")
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            items = word.strip("[]()").replace(" ", "").split(",")
            try:
                return [item(v) for v in items if v]
            except ValueError:
                raise argparse.ArgumentTypeError(f"--{name} must be a comma-separated list of {item.__name__}, "
                                                 f"got {text!r}") from None  # fmt: skip
        if isinstance(base, tuple):  # float | int: the number as written
            try:
                value = ast.literal_eval(word)
            except (ValueError, SyntaxError):
                value = None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise argparse.ArgumentTypeError(f"--{name} must be a number, got {text!r}")
            return value
        try:
            return base(word)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name} must be {base.__name__}, got {text!r}") from None

    parse.__name__ = name
    return parse
