# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Every bundle's configs are data (issue 20): few ``$`` expressions in train.json, no ``exec(``, no
config reading its own file again; logic is named by ``_target_`` (``medfm_ops.bundle.cls_config_components``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfm_ops.bundle.cls_config_components import datalist_section, sibling_path

REPO = Path(__file__).resolve().parents[1]
BUNDLES = ("foundation_cls", "lorkd_cls", "rd_cls", "shpeft_cls", "foundation_seg", "lorkd_seg")


@pytest.mark.parametrize("name", BUNDLES)
def test_configs_are_data(name):
    configs = sorted((REPO / "bundles" / name / "configs").rglob("*.json"))
    train = (REPO / "bundles" / name / "configs" / "train.json").read_text()
    assert train.count("$") <= 30, f"{name}/configs/train.json has {train.count('$')} '$' expressions (at most 30)"
    for f in configs:
        text = f.read_text()
        json.loads(text)
        assert "exec(" not in text, f
        assert "literal_config" not in text and "'train.json'" not in text, f"{f} reads a config file again"


def test_config_components():
    table = object()
    content = (table, {"training": [{"task": "a", "i": 0}, {"task": "b", "i": 1}, {"task": "a", "i": 2}]})
    assert [f["i"] for f in datalist_section(content, "training", "a")] == [0, 2]
    assert len(datalist_section(content, "training")) == 3
    with pytest.raises(KeyError, match="no 'test' section"):
        datalist_section(content, "test")
    with pytest.raises(ValueError, match=r"task\(s\) \['c'\].*its tasks are \['a', 'b'\]"):
        datalist_section(content, "training", ["a", "c"])
    assert sibling_path("/x/bundles/rd_cls", "foundation_cls") == "/x/bundles/foundation_cls"
    assert sibling_path("/x/rd_cls/models", "export", "adrenal") == "/x/rd_cls/export/adrenal"
