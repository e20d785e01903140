"""The original baselines' shared head, used by the factorized and GRU benchmarks: neuralpredictors'
``FullGaussian2d`` (in a ``MultiReadoutSharedParametersBase``) and ``MLPShifter`` with the benchmark notebook's
settings, and the readout half of ``VideoFiringRateEncoder.forward``:
https://github.com/ecker-lab/sensorium_2023/blob/main/notebooks/benchmarks_training.ipynb
https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/models/video_encoder.py
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo

KEY = "mouse"


def add_original_head(
    model: nn.Module, orig: types.SimpleNamespace, neurons: NeuronInfo, in_shape: tuple[int, int, int]
) -> None:
    """Set ``model.readout`` and ``model.shifter`` for features of shape ``in_shape = (C, H, W)``."""
    model.readout = orig.readout(
        in_shape_dict={KEY: in_shape},
        n_neurons_dict={KEY: neurons.num_neurons},
        mean_activity_dict={KEY: torch.as_tensor(neurons.mean_responses, dtype=torch.float32)},
        bias=True,
        init_mu_range=0.2,
        init_sigma=1.0,
        gamma_readout=0.0,
        gauss_type="full",
        grid_mean_predictor={"hidden_layers": 1, "hidden_features": 30, "final_tanh": True},
        grid_mean_predictor_type="cortex",
        source_grids={KEY: np.asarray(neurons.coordinates)[:, :2]},
        share_features=False,
        share_grid=False,
        shared_match_ids=None,
        gamma_grid_dispersion=0.0,
    )
    model.shifter = orig.shifter(data_keys=[KEY], shift_layers=3, input_channels_shifter=2, hidden_channels_shifter=5)


def original_read(model: nn.Module, x: Tensor, pupil_center: Tensor) -> Tensor:
    """Core features ``(B, T', C, H', W')`` → shifted Gaussian readout → ELU + 1 → ``(B, N, T')``, ours' layout."""
    b, time_points = x.shape[:2]
    pupil = torch.transpose(pupil_center[:, :, -time_points:], 1, 2)  # (B, T', 2)
    shift = model.shifter[KEY](pupil.reshape(-1, 2), None)  # (B·T', 2)
    x = x.reshape((-1,) + x.size()[2:])  # (B·T', C, H', W')
    x = model.readout(x, data_key=KEY, shift=shift)  # (B·T', N)
    x = nn.functional.elu(x) + 1
    return x.reshape(b, time_points, -1).transpose(1, 2)  # (B, N, T')
