"""Models: cores, readouts, shifters and the Encoder that combines them. Explicit re-exports, no registry."""

from lightning_sensorium.models.cores import Core, Factorized3dCore
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.layers import ELU1
from lightning_sensorium.models.readouts import GaussianReadout, Readout
from lightning_sensorium.models.shifters import MLPShifter

__all__ = ["ELU1", "Core", "Encoder", "Factorized3dCore", "GaussianReadout", "MLPShifter", "Readout"]
