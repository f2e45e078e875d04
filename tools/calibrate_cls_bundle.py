# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Give a two-class classification bundle (an RD student, a LoRKD expert, a fine-tuned classifier) the decision
threshold chosen on labelled validation cases of a classification datalist, so that it predicts the minority class
where its probabilities say so (at the argmax an imbalanced task's model often predicts the majority class for almost
every case).

    python tools/calibrate_cls_bundle.py calibrate --bundle bundles/rd_cls/export/adrenalmnist3d \
        --datalist <classification datalist.json> [--section validation] [--task adrenalmnist3d] [--out_dir <copy>] \
        [--min_sensitivity 0.9]

The bundles' own exports already do this on their training run's validation split; use this for a bundle exported
without it, or to choose again on a site's own validation cases. Never choose on the cases you report scores on.
The threshold has the highest balanced accuracy on those cases, or with ``--min_sensitivity S`` the highest
specificity among those that find at least the share S of the positive cases (a screening operating point). Prints
the threshold and the balanced accuracy, sensitivity and specificity at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import fire


def calibrate(
    bundle: str, datalist: str, section: str = "validation", task: str | None = None, out_dir: str | None = None,
    min_sensitivity: float | None = None,
) -> dict:
    """
    Choose and write the decision threshold of ``bundle`` on ``section`` of ``datalist``.

    Args:
        bundle: the classification bundle (``configs/metadata.json`` with ``medfm.class_names``).
        datalist: a classification datalist (``tasks``, ``training``, ``validation`` [, ``test``]).
        section: the datalist section to choose on. Defaults to ``"validation"``.
        task: the task of the bundle in the datalist. Defaults to the bundle's ``medfm.task``.
        out_dir: write the calibrated bundle here instead of in place. Defaults to None.
        min_sensitivity: the highest specificity at a sensitivity of at least this (e.g. 0.9 for screening) instead of
            the highest balanced accuracy. Defaults to None.

    Raises:
        ValueError: for a bundle that is not a two-class classification bundle, or a task with no items of both
            classes in the section.
        KeyError: for a section the datalist does not have.
    """
    from medfm_ops.bundle import calibrate_cls_bundle
    from medfm_ops.bundle.cls_config_components import datalist_section
    from medfm_ops.data import load_cls_datalist

    meta = json.loads((Path(bundle) / "configs" / "metadata.json").read_text(encoding="utf-8"))
    task = task or (meta.get("medfm") or {}).get("task")
    if not task:
        raise ValueError(f"{bundle}/configs/metadata.json names no medfm.task; pass --task.")
    items = datalist_section(load_cls_datalist(datalist), section, task)
    where = f"the {len(items)} '{section}' cases of {task} in {datalist}"
    choice = calibrate_cls_bundle(bundle, items, out_dir=out_dir, chosen_on=where, min_sensitivity=min_sensitivity)
    print(f"{out_dir or bundle}: decision threshold {choice['threshold']:.4g} on the class-1 probability (highest "
          f"{choice['criterion']}); on those cases balanced accuracy {choice['balanced_accuracy']:.3f} (argmax "
          f"{choice['argmax_balanced_accuracy']:.3f}), sensitivity {choice['sensitivity']:.3f}, specificity "
          f"{choice['specificity']:.3f}.")
    return choice


if __name__ == "__main__":
    fire.Fire({"calibrate": calibrate})
