# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Pictures of the classification results: Grad-CAM panels of 3D classifiers and CKA similarity matrices (PNG)."""

from medfm_ops.visualize.cka_matrix import cka_matrix, write_matrix_png
from medfm_ops.visualize.gradcam import gradcam_panel, gradcam_volume, mid_slices, overlay
from medfm_ops.visualize.png import colormap, tile_grid, write_png

__all__ = [
    "cka_matrix",
    "write_matrix_png",
    "gradcam_panel",
    "gradcam_volume",
    "mid_slices",
    "overlay",
    "colormap",
    "tile_grid",
    "write_png",
]
