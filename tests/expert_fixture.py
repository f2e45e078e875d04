# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Shared definition of the tiny stock expert network used by the expert-bundle and MONAI Label tests."""

NET_DEF = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 6,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "INSTANCE",
}
CHANNELS = [2, 3, 4]  # network output channels of labels 1..3
SPACING = (2.0, 2.0, 2.0)
ROI = (32, 32, 32)
