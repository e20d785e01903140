"""Batch and neuron metadata types shared by the loaders, the models and the LightningModule.

Batch keys and shapes (one vocabulary everywhere)::

    video         (B, C, T, H, W)  float32; C = 1 grey channel (+ behaviour / pupil channels if a model asks)
    behavior      (B, 2, T)        float32  [pupil size, running speed]
    pupil_center  (B, 2, T)        float32  [x, y]
    responses     (B, N, T)        float32
    mouse_id      str              one mouse per batch (or a list of str for mixed-mouse batches)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NeuronInfo:
    """What a readout needs to know about one mouse's neurons.

    Attributes:
        mouse_id: the mouse (session) name.
        unit_ids: ``(N,)`` official neuron ids, in the order of the response rows.
        coordinates: ``(N, 3)`` cortical position in microns (x, y, z).
        mean_responses: ``(N,)`` mean (normalised) response over train frames; initialises readout biases.
    """

    mouse_id: str
    unit_ids: np.ndarray
    coordinates: np.ndarray
    mean_responses: np.ndarray

    @property
    def num_neurons(self) -> int:
        return int(self.unit_ids.shape[0])
