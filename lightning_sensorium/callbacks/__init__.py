"""Callbacks any model can use from YAML (``trainer.callbacks``)."""

from lightning_sensorium.callbacks.budget import BudgetDecay
from lightning_sensorium.callbacks.checkpoint import FiniteLoss, ModelCheckpoint
from lightning_sensorium.callbacks.cutmix import CutMix
from lightning_sensorium.callbacks.ema import EMA
from lightning_sensorium.callbacks.figures import FigureLogger
from lightning_sensorium.callbacks.memory import MemoryCheck
from lightning_sensorium.callbacks.plateau import PlateauRestore
from lightning_sensorium.callbacks.prediction_writer import ZarrPredictionWriter
from lightning_sensorium.callbacks.progress import ProgressBar

__all__ = [
    "BudgetDecay",
    "EMA",
    "CutMix",
    "FigureLogger",
    "FiniteLoss",
    "MemoryCheck",
    "ModelCheckpoint",
    "PlateauRestore",
    "ProgressBar",
    "ZarrPredictionWriter",
]
