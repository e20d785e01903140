"""Callbacks any model can use from YAML (``trainer.callbacks``)."""

from lightning_sensorium.callbacks.plateau import PlateauRestore

__all__ = ["PlateauRestore"]
