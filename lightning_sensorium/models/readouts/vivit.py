"""ViV1T's Gaussian readout: the full-Gaussian readout plus a behaviour state encoder.

Port of ``Gaussian2DReadout`` of https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/model/readout/gaussian2d.py
(``--readout=gaussian2d``, ``readout_grid_mode=1``, ``readout_bias_mode=2``, ``gaussian_type='full'``). The state
encoder and its one difference from the original: :class:`ViViTGaussianReadout`; the recipe: docs/models.md,
"ViV1T (3rd place): factorized video transformer + Gaussian readout with a behaviour state encoder".
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.models.readouts.gaussian import GaussianReadout


class ViViTGaussianReadout(GaussianReadout):
    """:class:`GaussianReadout` whose sampled features are shifted by an encoding of the behaviour.

    Everything but the state encoder is :class:`GaussianReadout`, which matches the original: μ = Linear(2, 30) →
    ELU → Linear(30, 2) → Tanh of the centred, max-normalised cortical (x, y); σ a full 2×2 per neuron, U(−1, 1);
    features ``1/C``; bias = the neuron's mean response; a fresh position sample per (batch · frame) in training, μ
    in eval; the shift added after the clamp; ``grid_sample(align_corners=True)``.

    State encoder: the 4 signals of each frame ``[pupil size, running speed, pupil x, pupil y]`` (the original's
    ``concat(behaviors, pupil_centers)`` of the last T frames) → Linear(4, C) → LayerNorm → GELU → Dropout →
    Linear(C, C) → Tanh, a C-vector per (batch · frame) that is *added to the sampled feature vector of every
    neuron* before the feature dot product::

        y[b, n, t] = Σ_c (F[b, c, t, grid_n] + s[b, t, c]) · w[c, n] + bias_n

    so behaviour modulates each neuron by ``Σ_c s_c w_cn``, through the neuron's own feature weights. With C = 112
    the encoder has 13 440 parameters per mouse. Difference from the original: the bias starts at the mean over all
    training frames (as ``GaussianReadout``), not the mean of 3 training batches.

    Args:
        in_shape: ``(C, H, W)`` of the core's features.
        neurons: the mouse's neurons: coordinates place the readout positions, mean responses set the bias.
        init_sigma: σ entries start uniform in ``[−init_sigma, init_sigma]``.
        grid_hidden_features: hidden units of the position MLP.
        bias: learn a per-neuron bias.
        feature_reg_weight: weight of the L1 (sum) penalty on the feature weights (0 in ViV1T).
        behavior_features: signals per frame fed to the state encoder (4: behaviour and pupil centre).
        state_dropout: dropout inside the state encoder (the original's ``--readout_dropout``, 0).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        neurons: NeuronInfo,
        init_sigma: float = 1.0,
        grid_hidden_features: int = 30,
        bias: bool = True,
        feature_reg_weight: float = 0.0,
        behavior_features: int = 4,
        state_dropout: float = 0.0,
    ) -> None:
        super().__init__(in_shape, neurons, init_sigma, grid_hidden_features, bias, feature_reg_weight)
        c = self.in_shape[0]
        self.behavior_features = behavior_features
        self.state_encoder = nn.Sequential(
            nn.Linear(behavior_features, c),
            nn.LayerNorm(c),
            nn.GELU(),
            nn.Dropout(state_dropout),
            nn.Linear(c, c),
            nn.Tanh(),
        )

    def forward(self, features: Tensor, shift: Tensor | None = None, behavior: Tensor | None = None) -> Tensor:
        b, _, t = features.shape[:3]
        if behavior is None or behavior.shape != (b, t, self.behavior_features):
            got = None if behavior is None else tuple(behavior.shape)
            raise ValueError(
                f"ViViTGaussianReadout needs `behavior` of shape (B, T, {self.behavior_features}) = "
                f"({b}, {t}, {self.behavior_features}) for the features' frames, got {got}"
            )
        sampled = self.sample_features(features, shift)  # (B·T, C, N)
        states = self.state_encoder(behavior.reshape(b * t, -1).to(sampled.dtype))  # (B·T, C), rows in (b, t) order
        return self.weigh(sampled + states[:, :, None], batch=b)  # (B, N, T)


__all__ = ["ViViTGaussianReadout"]
