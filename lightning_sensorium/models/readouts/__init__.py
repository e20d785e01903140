"""Readouts: one per mouse, chosen in YAML as a factory ``(in_shape, neurons) -> Readout``."""

from lightning_sensorium.models.readouts.base import Readout
from lightning_sensorium.models.readouts.gaussian import GaussianReadout

__all__ = ["GaussianReadout", "Readout"]
