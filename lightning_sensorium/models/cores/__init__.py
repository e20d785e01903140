"""Cores: shared feature extractors. Every core implements :class:`~lightning_sensorium.models.cores.base.Core`."""

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.cores.factorized3d import Factorized3dCore

__all__ = ["Core", "Factorized3dCore"]
