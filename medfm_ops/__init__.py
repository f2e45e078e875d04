"""medfm_ops: shared operations of the medfm MONAI bundles (LoRKD, RD, SH-PEFT, site fine-tuning)."""

__version__ = "0.1.0"
