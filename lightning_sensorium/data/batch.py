"""Batch and neuron metadata types shared by the loaders, the models and the LightningModule.

Batch keys and shapes (one vocabulary everywhere)::

    video         (B, C, T, H, W)  float32; C = 1 grey channel (+ behaviour / pupil channels if a model asks)
    behavior      (B, 2, T)        float32  [pupil size, running speed]
    pupil_center  (B, 2, T)        float32  [x, y]
    responses     (B, N, T)        float32
    mouse_id      str              one mouse per batch (or a list of str for mixed-mouse batches)
    length        (B,)             int64    valid frames of each sample (frames past it are zero padding)
    trial, clip_id (B,)            int64    store rows and clip ids
    response_scale (B, N, T)       float32  with ``data.response_scale`` (mixed batches: lists, as ``responses``)

Evaluation batches (one mouse, one tier) add ``tier`` (str: a tier, or ``"fold"``, the held-out fold of
``data.num_folds``), ``clip_index`` ``(B,)`` (dense clip numbers of the tier), where a store has them ``rates``
``(B, N, T)`` (the synthetic mice's noiseless rates), ``padding`` (True: a DDP rank's stand-in batch, never scored)
and, for ``data.val_windows="official"``, ``window_start`` ``(B,)``: the trial frame each sample's frame 0 is
(each sample is one random 80-frame window of its trial, not the whole trial, so repeats of a clip show different
frames).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

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


class NeuronMismatchError(ValueError):
    """Two sets of neurons that must agree (a checkpoint's and the data's, two ensemble members') differ."""


def check_same_neurons(
    reference: Mapping[str, NeuronInfo],
    other: Mapping[str, NeuronInfo],
    names: tuple[str, str] = ("the checkpoint", "the data"),
    mice: Literal["same", "covered", "shared"] = "same",
) -> None:
    """Raise :class:`NeuronMismatchError` unless every mouse compared has the same unit ids, in the same order, in
    ``reference`` and ``other`` (``names`` name them in the message).

    ``mice``: ``same``: both hold the same mice; ``covered``: every mouse of ``other`` is in ``reference``;
    ``shared``: only the mice both hold are compared.
    """
    ref_name, other_name = names
    if mice == "same" and set(reference) != set(other):
        raise NeuronMismatchError(
            f"the mice of {ref_name} {sorted(reference)} do not match the mice of {other_name} {sorted(other)}; "
            "select the same mice with data.mice"
        )
    missing = sorted(set(other) - set(reference))
    if mice == "covered" and missing:
        raise NeuronMismatchError(
            f"no readout in {ref_name} for mice {missing} of {other_name} (known: {sorted(reference)}); "
            "select mice with data.mice"
        )
    for mouse in [m for m in reference if m in other]:
        a, b = np.asarray(reference[mouse].unit_ids), np.asarray(other[mouse].unit_ids)
        if a.shape != b.shape or not np.array_equal(a, b):
            raise NeuronMismatchError(
                f"mouse {mouse}: {other_name} has other neurons than {ref_name} "
                f"({b.shape[0]} against {a.shape[0]}, or other unit_ids)"
            )
