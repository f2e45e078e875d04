# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Session fixtures shared by test modules."""

from __future__ import annotations

import pytest
from seg_fixture import copy_seg_bundles, train_teacher


@pytest.fixture(scope="session")
def seg_bundles(tmp_path_factory):
    """Copies of foundation_seg and lorkd_seg with a teacher trained on the tiny set (data cache ``<root>/cache``),
    trained once per session. Tests write their own outputs elsewhere (``ckpt_dir``/``output_dir``/``eval_dir``
    overrides) or in ``lorkd_seg`` only through ``test_lorkd_bundle.py``'s module fixture."""
    root = copy_seg_bundles(tmp_path_factory.mktemp("seg_bundles"))
    train_teacher(root)
    return root
