"""Callbacks any model can use from YAML (``trainer.callbacks``)."""

from lightning_sensorium.callbacks.cutmix import CutMix
from lightning_sensorium.callbacks.ema import EMA
from lightning_sensorium.callbacks.plateau import PlateauRestore

__all__ = ["EMA", "CutMix", "PlateauRestore"]
