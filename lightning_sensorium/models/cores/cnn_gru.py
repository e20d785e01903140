"""Rotation-equivariant 2D Hermite CNN + convolutional GRU: the core of the SENSORIUM 2023 GRU baseline.

Port of neuralpredictors' ``RotationEquivariant2dCore`` and ``GRU_Module``
(https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/cores/conv2d.py,
https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/layers/rnn_modules/gru_module.py) as the
2023 benchmark notebook configures them. Sources, model, parameters and differences: docs/models.md, "GRU baseline
(`experiments/gru.yaml`)".
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.polynomial.polynomial import polyval
from torch import Tensor, nn

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import behavior_as_channels, laplace_l2norm

_gamma = np.vectorize(math.gamma, otypes=[np.float64])


def _hermite_coefficients(mu: float, nu: float) -> np.ndarray:
    """Polynomial coefficients (in r²) of the radial part of the 2D Hermite function of orders ``(mu, nu)``."""
    nur = np.arange(nu + 1)
    num = _gamma(mu + nu + 1) * _gamma(nu + 1) * ((-2.0) ** (nu - nur))
    denom = _gamma(mu + 1 + nur) * _gamma(1 + nur) * _gamma(nu + 1 - nur)
    return num / denom


def hermite_basis(rank: int, points: int, extent: float) -> tuple[np.ndarray, list[str], np.ndarray]:
    """2D Hermite functions of rank ``< rank`` on a ``points × points`` grid spanning about ``[−extent, extent]²``.

    Returns the unit-norm basis ``(rank(rank+1)/2, points, points)``, a descriptor per function (``'z'``:
    rotationally symmetric, ``'r'`` / ``'i'``: real / imaginary part of a quadrature pair) and its angular
    frequency ``mu``. Port of ``hermite_2d`` (neuralpredictors ``layers/hermite.py``), quirks included: the grid
    spans ``extent · (1 − 1/points)``.
    """
    extent *= 1 - 1 / points
    x = np.linspace(-extent, extent, points, endpoint=True)[..., None]  # (P, 1)
    envelope = np.exp(-(x**2) / 4)
    gaussian = envelope @ envelope.T  # (P, P)
    mu = np.array([])
    nu = np.array([])
    desc: list[str] = []
    for r in range(rank):
        mu_r = np.sort(np.abs(np.arange(-r, r + 0.1, 2)))
        mu = np.hstack([mu, mu_r])
        nu = np.hstack([nu, (r - mu_r) / 2])
        if r % 2 == 0:
            desc.append("z")
        desc += ["r", "i"] * ((r + 1) // 2)
    theta = np.arctan2(x, x.T)  # (P, P)
    radsq = x**2 + x.T**2  # (P, P)
    basis = np.zeros([mu.size, points, points])
    for i, (m, n, d) in enumerate(zip(mu, nu, desc, strict=True)):
        radial = polyval(radsq, _hermite_coefficients(m, n))
        h = gaussian * radsq ** (m / 2) * radial * np.exp(1j * m * theta)
        h /= np.sqrt(2 ** (m + 2 * n) * np.pi * math.factorial(int(m + n)) * math.factorial(int(n)))
        basis[i] = h.real / np.sqrt(2) if d == "z" else (h.real if d == "r" else h.imag)
    return basis / np.sqrt(np.sum(basis**2, axis=(1, 2), keepdims=True)), desc, mu


def hermite_rotation(desc: list[str], mu: np.ndarray, angle: float) -> np.ndarray:
    """``(n, n)`` matrix acting on Hermite coefficients that rotates the filter by ``angle`` (``rotation_matrix``)."""
    rot = np.zeros((len(desc), len(desc)))
    for i, (d, m) in enumerate(zip(desc, mu, strict=True)):
        if d == "r":
            c, s = np.cos(m * angle), np.sin(m * angle)
            rot[i : i + 2, i : i + 2] = [[c, s], [-s, c]]
        elif d == "z":
            rot[i, i] = 1.0
    return rot


class HermiteConv2d(nn.Module):
    """2D convolution whose ``k×k`` filters are Hermite expansions, applied at ``num_rotations`` angles, no bias.

    ``(N, in_channels, H, W)`` → ``(N, num_rotations · out_channels, H', W')``, output channel ``r·out + o`` being
    filter ``o`` rotated by ``2πr/R``. With ``rotate_inputs`` (hidden layers) the input is ``R`` rotation blocks and
    the filter at angle ``r`` sees them rolled by ``r`` blocks. Port of ``HermiteConv2D`` + ``RotateHermite``.

    A filter is a learned combination of the ``k(k+1)/2`` 2D Hermite functions of rank < k, sampled at
    ``upsampling``× resolution and summed back to ``k×k``. Rotating the coefficient vector (a block rotation of each
    quadrature pair by ``m·θ``) rotates the filter by ``θ``. Only the coefficients are learned; the Hermite basis and
    the rotation matrices are constant (non-persistent) buffers, rebuilt from the hyper-parameters.

    Args:
        in_channels: input channels (for ``rotate_inputs``, all rotation blocks together).
        out_channels: filters per rotation.
        kernel_size: filter size ``k``; the basis has ``k(k+1)/2`` functions.
        num_rotations: number of angles ``R``.
        upsampling: the basis is sampled at this factor and summed back to ``k×k``.
        padding: zero padding of the convolution.
        rotate_inputs: roll the input rotation blocks with the filter angle (every layer but the first).
        init_std: coefficients start ``N(0, init_std²)``.
    """

    basis: Tensor  # (n, k, k) Hermite basis summed down to k×k (buffer)
    rotations: Tensor  # (R, n, n) coefficient rotations (buffer)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_rotations: int,
        upsampling: int = 2,
        padding: int = 0,
        rotate_inputs: bool = False,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if rotate_inputs and in_channels % num_rotations:
            raise ValueError(f"rotate_inputs needs in_channels ({in_channels}) divisible by num_rotations")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.num_rotations, self.padding, self.rotate_inputs = num_rotations, padding, rotate_inputs
        self.num_coeffs = kernel_size * (kernel_size + 1) // 2
        basis, desc, mu = hermite_basis(kernel_size, kernel_size * upsampling, 2 * np.sqrt(kernel_size))
        # Sum each upsampling × upsampling block (``downsample_weights``): (n, k·u, k·u) → (n, k, k).
        basis = basis.reshape(-1, kernel_size, upsampling, kernel_size, upsampling).sum(axis=(2, 4))
        rotations = np.stack([hermite_rotation(desc, mu, 2 * np.pi * r / num_rotations) for r in range(num_rotations)])
        self.register_buffer("basis", torch.tensor(basis, dtype=torch.float32), persistent=False)
        self.register_buffer("rotations", torch.tensor(rotations, dtype=torch.float32), persistent=False)
        self.coeffs = nn.Parameter(torch.empty(self.num_coeffs, in_channels, out_channels))  # (n, in, out)
        nn.init.normal_(self.coeffs, std=init_std)

    def filters(self) -> Tensor:
        """The convolution weight ``(R · out, in, k, k)`` at all rotations (``weights_all_rotations``)."""
        coeffs = torch.einsum("rnm,mio->rnio", self.rotations, self.coeffs)  # (R, n, in, out)
        if self.rotate_inputs:
            block = self.in_channels // self.num_rotations
            coeffs = torch.stack([c.roll(r * block, dims=1) for r, c in enumerate(coeffs)])  # (R, n, in, out)
        weight = torch.einsum("nhw,rnio->roihw", self.basis, coeffs)  # (R, out, in, k, k)
        return weight.reshape(-1, self.in_channels, self.kernel_size, self.kernel_size)  # (R·out, in, k, k)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.filters(), padding=self.padding)  # (N, R·out, H', W')

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"num_rotations={self.num_rotations}, padding={self.padding}, rotate_inputs={self.rotate_inputs}"
        )


class RotationSharedBatchNorm(nn.BatchNorm1d):
    """BatchNorm over ``(N, R·F, H, W)`` with statistics and affine parameters per feature ``f``, shared by the
    ``R`` rotation blocks (``RotationEquivariantBatchNorm2D``). Momentum follows the PyTorch convention."""

    def __init__(self, num_features: int, num_rotations: int, momentum: float = 0.1) -> None:
        super().__init__(num_features, momentum=momentum)
        self.num_rotations = num_rotations

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        r, f = self.num_rotations, self.num_features
        y = x.reshape(n, r, f, h * w).transpose(1, 2).reshape(n, f, r * h * w)  # (N, F, R·H·W)
        y = super().forward(y)
        return y.reshape(n, f, r, h * w).transpose(1, 2).reshape(n, c, h, w)  # (N, R·F, H, W)


class _HermiteBlock(nn.Sequential):
    """Hermite conv → rotation-shared BatchNorm → (ELU)."""

    def __init__(self, conv: HermiteConv2d, momentum: float, nonlinearity: bool) -> None:
        super().__init__()
        self.conv = conv
        self.norm = RotationSharedBatchNorm(conv.out_channels, conv.num_rotations, momentum)
        if nonlinearity:
            self.nonlin = nn.ELU()


def _stacked(*convs: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Weights and biases of same-shaped convolutions concatenated along the output channels: one conv for all."""
    biases = [c.bias for c in convs]
    if any(bias is None for bias in biases):
        raise ValueError("ConvGRU gate convolutions need a bias")
    return torch.cat([c.weight for c in convs]), torch.cat([bias for bias in biases if bias is not None])


class ConvGRU(nn.Module):
    """Convolutional GRU over the time axis: ``(B, C, T, H, W)`` → every state ``(B, hidden, T, H, W)``, ``h₀ = 0``.

    ``u = σ(W_u x + U_u h)``, ``r = σ(W_r x + U_r h)``, ``h̃ = tanh(W_o x + U_o (r ⊙ h))``,
    ``h' = (1 − u) ⊙ h + u ⊙ h̃``; all six convolutions have a bias. The output is every state, so ``T' = T`` and
    output frame ``t`` depends on input frames ``≤ t`` only.

    The six gate convolutions keep the original ``ConvGRUCell`` names and init (xavier-normal weights, zero
    biases); "same" padding throughout. For speed the three input convolutions run as one convolution over all
    frames, and the update and reset hidden convolutions as one convolution per step.

    Args:
        in_channels: channels of the input features.
        hidden_channels: channels of the state (``rec_channels``).
        input_kernel: kernel of the input-to-gate convolutions (odd).
        rec_kernel: kernel of the state-to-gate convolutions (odd).
    """

    def __init__(self, in_channels: int, hidden_channels: int, input_kernel: int = 9, rec_kernel: int = 9) -> None:
        super().__init__()
        if input_kernel % 2 == 0 or rec_kernel % 2 == 0:
            raise ValueError(f"ConvGRU kernels must be odd, got input {input_kernel} and recurrent {rec_kernel}")
        self.hidden_channels = hidden_channels
        pad_in, pad_rec = input_kernel // 2, rec_kernel // 2
        self.update_gate_input = nn.Conv2d(in_channels, hidden_channels, input_kernel, padding=pad_in)
        self.update_gate_hidden = nn.Conv2d(hidden_channels, hidden_channels, rec_kernel, padding=pad_rec)
        self.reset_gate_input = nn.Conv2d(in_channels, hidden_channels, input_kernel, padding=pad_in)
        self.reset_gate_hidden = nn.Conv2d(hidden_channels, hidden_channels, rec_kernel, padding=pad_rec)
        self.out_gate_input = nn.Conv2d(in_channels, hidden_channels, input_kernel, padding=pad_in)
        self.out_gate_hidden = nn.Conv2d(hidden_channels, hidden_channels, rec_kernel, padding=pad_rec)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-normal weights and zero biases for each gate convolution (``RNNCore.init_conv``)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        k = self.hidden_channels
        frames = x.transpose(1, 2).reshape(b * t, -1, h, w)  # (B·T, C, H, W)
        in_weight, in_bias = _stacked(self.update_gate_input, self.reset_gate_input, self.out_gate_input)
        x_gates = F.conv2d(frames, in_weight, in_bias, padding=self.update_gate_input.padding)  # (B·T, 3·hidden, H, W)
        x_gates = x_gates.view(b, t, 3 * k, h, w)  # (B, T, 3·hidden, H, W): W_u x, W_r x, W_o x of every frame
        rec_weight, rec_bias = _stacked(self.update_gate_hidden, self.reset_gate_hidden)  # (2·hidden, hidden, k, k)
        state = x.new_zeros(b, k, h, w)  # h₀ = 0 (B, hidden, H, W)
        states = []
        # unbind, not x_gates[:, i]: its backward stacks the T gradients once instead of allocating a full-size
        # zero gradient of x_gates for every frame.
        for frame_gates in x_gates.unbind(1):
            xu, xr, xo = frame_gates.split(k, dim=1)  # 3 × (B, hidden, H, W)
            hu, hr = F.conv2d(state, rec_weight, rec_bias, padding=self.update_gate_hidden.padding).split(k, dim=1)
            update = torch.sigmoid(xu + hu)
            reset = torch.sigmoid(xr + hr)
            candidate = torch.tanh(xo + self.out_gate_hidden(state * reset))
            state = state * (1 - update) + candidate * update
            states.append(state)
        return torch.stack(states, dim=1).transpose(1, 2)  # (B, hidden, T, H, W), a view of (B, T, hidden, H, W)


class CnnGruCore(Core):
    """Rotation-equivariant Hermite CNN on each frame, then a convolutional GRU over time (the GRU baseline's core).

    Input channels are the video's, then the behaviour maps, then the pupil-centre maps, as enabled (default
    1 + 2 = 3, the baseline's). Output ``(B, gru_channels, T, H − input_kernel + 1, W − input_kernel + 1)``
    (``(B, 64, T, 28, 56)`` for 36×64 frames), aligned with the input frames (``T' = T``). With the defaults::

        video + 2 behaviour maps (B, 3, T, 36, 64) ─► per frame (B·T, 3, 36, 64)
          ─► layer 0: Hermite conv 9×9, no padding, 8 features × 8 rotations ─► shared BN ─► ELU  (B·T, 64, 28, 56)
          ─► layers 1–2: Hermite conv 7×7, padding 3 ─► BN ─► ELU; layer 3: the same without the ELU
          ─► conv GRU over time, 64 channels, 9×9 input and recurrent kernels, h₀ = 0           (B, 64, T, 28, 56)

    In hidden layers the input rotation blocks are rolled with the filter angle, so the stack is equivariant:
    rotating the input by 90° rotates every feature map by 90° and rolls the rotation blocks by ``R/4``. The
    BatchNorm shares its statistics and affine parameters across rotations, which keeps that property. The core is
    causal (output frame ``t`` sees input frames ``≤ t``); in training mode the BatchNorm batch statistics pool all
    frames of the batch, as in the original.

    Args:
        hidden_channels: filters per rotation in every CNN layer (``hidden_channels``); the CNN outputs
            ``num_rotations · hidden_channels`` channels.
        num_rotations: angles per filter (``num_rotations``).
        layers: CNN layers (``layers``).
        input_kernel: Hermite filter size of the first layer (``input_kern``).
        hidden_kernel: Hermite filter size of the other layers (``hidden_kern``, odd; "same" padding).
        pad_input: zero-pad the first layer to keep the frame size (``pad_input``; off in the baseline: 36×64 → 28×56).
        upsampling: the Hermite basis is sampled at this factor and summed back (``upsampling``).
        batch_norm_momentum: BatchNorm momentum, PyTorch convention (``momentum``; 0.9: running stats ≈ the last
            batch).
        final_nonlinearity: ELU after the last CNN layer too (``final_nonlinearity``; off in the baseline).
        init_std: Hermite coefficients start ``N(0, init_std²)`` (``init_std``).
        gru_channels: channels of the GRU state and of the output (``rec_channels``).
        gru_input_kernel: kernel of the GRU's input convolutions (``input_kern`` of the GRU).
        gru_rec_kernel: kernel of the GRU's recurrent convolutions (``rec_kern``).
        video_channels: channels of the video itself (1, grey).
        behavior_channels: add pupil size and running speed as 2 constant image channels.
        pupil_channels: add the pupil centre as 2 channels too (off in the baseline: it drives the shifter).
        input_reg_weight: weight of the Laplace smoothness of the first-layer filters (``gamma_input``).
        hidden_reg_weight: weight of the group sparsity of the hidden-layer filters (``gamma_hidden``).
    """

    def __init__(
        self,
        hidden_channels: int = 8,
        num_rotations: int = 8,
        layers: int = 4,
        input_kernel: int = 9,
        hidden_kernel: int = 7,
        pad_input: bool = False,
        upsampling: int = 2,
        batch_norm_momentum: float = 0.9,
        final_nonlinearity: bool = False,
        init_std: float = 0.1,
        gru_channels: int = 64,
        gru_input_kernel: int = 9,
        gru_rec_kernel: int = 9,
        video_channels: int = 1,
        behavior_channels: bool = True,
        pupil_channels: bool = False,
        input_reg_weight: float = 500.0,
        hidden_reg_weight: float = 500_000.0,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        if hidden_kernel % 2 == 0 or (pad_input and input_kernel % 2 == 0):
            raise ValueError(
                f"padded Hermite kernels must be odd: hidden_kernel={hidden_kernel}, input_kernel={input_kernel}"
            )
        self.video_channels = video_channels
        self.behavior_channels = behavior_channels
        self.pupil_channels = pupil_channels
        self.input_reg_weight = input_reg_weight
        self.hidden_reg_weight = hidden_reg_weight
        self.input_channels = video_channels + 2 * behavior_channels + 2 * pupil_channels
        self._pixels_lost = 0 if pad_input else input_kernel - 1
        blocks = []
        for i in range(layers):
            first = i == 0
            kernel = input_kernel if first else hidden_kernel
            conv = HermiteConv2d(
                self.input_channels if first else num_rotations * hidden_channels,
                hidden_channels,
                kernel,
                num_rotations,
                upsampling=upsampling,
                padding=kernel // 2 if (pad_input or not first) else 0,
                rotate_inputs=not first,
                init_std=init_std,
            )
            blocks.append(_HermiteBlock(conv, batch_norm_momentum, nonlinearity=final_nonlinearity or i < layers - 1))
        self.cnn = nn.Sequential(*blocks)
        self.gru = ConvGRU(num_rotations * hidden_channels, gru_channels, gru_input_kernel, gru_rec_kernel)
        self.out_channels = gru_channels

    def _block(self, i: int) -> _HermiteBlock:
        block = self.cnn[i]
        assert isinstance(block, _HermiteBlock)
        return block

    def frame_features(self, x: Tensor) -> Tensor:
        """The rotation-equivariant CNN on single frames ``(N, C_in, H, W)`` → ``(N, R·F, H', W')``."""
        return self.cnn(x)

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        if self.behavior_channels and behavior is None:
            raise ValueError("CnnGruCore(behavior_channels=True) needs `behavior` (B, 2, T)")
        if self.pupil_channels and pupil_center is None:
            raise ValueError("CnnGruCore(pupil_channels=True) needs `pupil_center` (B, 2, T)")
        x = behavior_as_channels(
            video,
            behavior if self.behavior_channels else None,
            pupil_center if self.pupil_channels else None,
        )  # (B, C_in, T, H, W)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B·T, C_in, H, W): frames are independent
        feats = self.frame_features(frames)  # (B·T, R·F, H', W')
        feats = feats.view(b, t, *feats.shape[1:]).transpose(1, 2)  # (B, R·F, T, H', W')
        return self.gru(feats)  # (B, gru_channels, T, H', W')

    def regularizer(self) -> Tensor:
        """``input_reg_weight · LaplaceL2norm(W₀) + hidden_reg_weight · mean_l mean_{o,i} ‖W_l[o, i]‖₂`` (l ≥ 1).

        The Laplace term sums over the first-layer filters at all rotations (``avg=False``); the group sparsity is
        the mean over (out, in) of the L2 norm of each hidden-layer ``k×k`` filter at all rotations, averaged over
        the hidden layers. The GRU's ``gamma_rec`` is 0 in the benchmark and never reaches the loss in the original
        trainer, so it is left out.
        """
        laplace = laplace_l2norm(self._block(0).conv.filters())
        hidden = [self._block(i).conv.filters() for i in range(1, len(self.cnn))]
        if not hidden:
            return self.input_reg_weight * laplace
        sparsity = torch.stack([wt.pow(2).sum(dim=(2, 3)).sqrt().mean() for wt in hidden]).mean()
        return self.hidden_reg_weight * sparsity + self.input_reg_weight * laplace

    def output_shape(self, input_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        _, t, h, w = input_shape
        return self.out_channels, t, h - self._pixels_lost, w - self._pixels_lost


__all__ = ["CnnGruCore", "ConvGRU", "HermiteConv2d", "RotationSharedBatchNorm", "hermite_basis", "hermite_rotation"]
