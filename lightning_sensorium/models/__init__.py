"""Models, split by role as in neuralpredictors. Explicit re-exports: the "registry" is just these imports.

* core (:class:`Core`): shared by all mice; video (+ behaviour) ``(B, C, T, H, W)`` → features
  ``(B, C', T', H', W')`` for the last ``T'`` frames; has ``regularizer()`` and ``output_shape()``.
* readout (:class:`Readout`): one per mouse, built from ``(in_shape, NeuronInfo)``; features → ``(B, N, T')``.
* shifter (:class:`MLPShifter`): one per mouse; pupil centre → shift of the readout positions.
* :class:`Encoder`: core → (shifter) → readout → output activation (:class:`ELU1` by default).
"""

from lightning_sensorium.models.cores import Core, Factorized3dCore
from lightning_sensorium.models.encoder import Encoder
from lightning_sensorium.models.layers import ELU1, CalciumELU1, DropPath, Exp
from lightning_sensorium.models.readouts import GaussianReadout, Readout
from lightning_sensorium.models.shifters import MLPShifter

__all__ = [
    "ELU1",
    "CalciumELU1",
    "Core",
    "DropPath",
    "Exp",
    "Encoder",
    "Factorized3dCore",
    "GaussianReadout",
    "MLPShifter",
    "Readout",
]
