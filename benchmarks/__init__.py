# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The benchmarks behind the results pages, run from the repository root: ``python -m benchmarks.<name> --help``.

Modules: ``eks`` (EKS conv speed), ``lorkd`` (LoRKD step speed), ``lorkd_ablation`` (LoRKD baselines and
ablations), ``real_regions`` (LoRKD on real brain + heart MRI), ``site_finetune``, ``site_start`` and ``site_curve``
(site fine-tuning on MSD hippocampus, which expert to start from, data-efficiency curve; ``site_shift``: the ACDC
population-shift data set of the curve),
``shpeft`` and ``classification`` (3D classification). Shared helpers: ``common`` (repository root, allocator
settings, timing, logged child runs), ``learning_curve`` (mean ± std, the 2x-spread rule, curve plot, PNG writer),
``score_bars`` (score bar chart), ``training_curves`` (per-epoch validation scalars of a run's TensorBoard events,
curve plot), ``sections`` (marked sections of a shared markdown report, a page's reader notes), ``site_study``
(the data-efficiency study's public/site split and N-case draws).
"""
