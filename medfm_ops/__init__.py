# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""medfm_ops: shared operations of the medfm MONAI bundles (LoRKD, RD, SH-PEFT, site fine-tuning)."""

__version__ = "0.1.0"
