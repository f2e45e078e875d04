# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Make one teacher of several trained classifiers: the mean of their logits as one network
(:class:`medfm_ops.networks.EnsembleClassifier`), written as a teacher folder that rd_cls and lorkd_cls read with
``teacher_path`` like a trained foundation_cls.

    python tools/ensemble_teacher.py build --members "['runs/foundation_s0', 'runs/foundation_s1', 'runs/foundation_s2']" \
        --out_dir runs/foundation_ensemble

The members are trained classifier folders (``models/model.pt`` + ``models/network_def.json``, e.g. foundation_cls
trained with different ``--seed``) with the same task table and input size. Prints the folder and its member count.
"""

from __future__ import annotations

import fire


def build(members: list[str], out_dir: str) -> str:
    """
    Write the ensemble of ``members`` to ``out_dir`` (:func:`medfm_ops.networks.write_ensemble_teacher`).

    Args:
        members: trained classifier folders (at least two).
        out_dir: the teacher folder to write (replaced as a whole when it holds an earlier ensemble).

    Raises:
        ValueError, FileNotFoundError: see :func:`medfm_ops.networks.write_ensemble_teacher`.
    """
    from medfm_ops.networks import write_ensemble_teacher

    if isinstance(members, str):
        members = [members]
    out = write_ensemble_teacher(list(members), out_dir)
    print(f"{out}: ensemble teacher of {len(members)} members (mean of their logits)")
    return str(out)


if __name__ == "__main__":
    fire.Fire({"build": build})
