"""3D shifted-window transformer core of Dynamic-V1FM, 2nd place in SENSORIUM 2023.

Port of ``SwinCore`` (https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/models/swin_core.py) with the submitted
configuration (https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/config/neuroencoding.py); its window attention
follows torchvision's ``shifted_window_attention_3d``
(https://github.com/pytorch/vision/blob/main/torchvision/models/video/swin_transformer.py). Model, parameters and
differences: docs/models.md, "Dynamic-V1FM (2nd place): 3D Swin core + hierarchical Gaussian readout".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import DropPath

Triple = tuple[int, int, int]


def _pad_sizes(size: Triple, multiple: Triple) -> Triple:
    """Padding at the end of each axis that makes ``size`` a multiple of ``multiple``."""
    return (
        (multiple[0] - size[0] % multiple[0]) % multiple[0],
        (multiple[1] - size[1] % multiple[1]) % multiple[1],
        (multiple[2] - size[2] % multiple[2]) % multiple[2],
    )


def fit_window(size: Triple, window: Triple, shift: Triple) -> tuple[Triple, Triple]:
    """Window and shift used on a token grid of ``size``: an axis no longer than its window takes the whole axis as
    its window and is not shifted (``_get_window_and_shift_size`` of the original)."""
    w, s = list(window), list(shift)
    for i in range(3):
        if size[i] <= w[i]:
            w[i], s[i] = size[i], 0
    return (w[0], w[1], w[2]), (s[0], s[1], s[2])


def shifted_window_mask(padded: Triple, window: Triple, shift: Triple, device: torch.device | None = None) -> Tensor:
    """``(windows, V, V)`` additive mask of the shifted windows: 0 between tokens of the same region, −100 between
    tokens the cyclic shift brought together from different regions (``_compute_attention_mask_3d``).

    Regions are labelled in the rolled frame by the slices ``[0, P − w)``, ``[P − w, P − s)``, ``[P − s, P)`` of each
    axis, as the original; with ``s = 0`` the last slice is the whole axis, so an unshifted axis separates nothing.
    """
    labels = torch.zeros(padded, device=device)  # (Tp, Hp, Wp)
    slices = [((0, -window[i]), (-window[i], -shift[i]), (-shift[i], None)) for i in range(3)]
    count = 0
    for t in slices[0]:
        for h in slices[1]:
            for w in slices[2]:
                labels[t[0] : t[1], h[0] : h[1], w[0] : w[1]] = count
                count += 1
    nt, nh, nw = padded[0] // window[0], padded[1] // window[1], padded[2] // window[2]
    labels = labels.view(nt, window[0], nh, window[1], nw, window[2])  # (nT, wt, nH, wh, nW, ww)
    labels = labels.permute(0, 2, 4, 1, 3, 5).reshape(nt * nh * nw, -1)  # (windows, V)
    diff = labels[:, None, :] - labels[:, :, None]  # (windows, V, V)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def relative_position_index(window: Triple) -> Tensor:
    """``(V, V)`` index into the ``((2wt−1)(2wh−1)(2ww−1), heads)`` bias table for each token pair of a window."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (3, V)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (V, V, 3): coords_i − coords_j
    rel = rel + torch.tensor([w - 1 for w in window])  # each offset from 0
    return rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1) + rel[..., 1] * (2 * window[2] - 1) + rel[..., 2]


class ShiftedWindowAttention3d(nn.Module):
    """Multi-head self-attention inside 3D (shifted) windows with a learned relative-position bias.

    Per (window, head), ``softmax(q kᵀ / √d + bias + mask) v`` with ``bias`` a learned relative-position table
    ``((2·8 − 1)(2·7 − 1)(2·7 − 1), heads)`` for the default window and ``mask`` −100 between tokens that the cyclic
    shift brought together from different regions (torchvision's ``shifted_window_attention_3d``, which the
    original copies). It runs through :func:`torch.nn.functional.scaled_dot_product_attention` with ``bias + mask``
    as a float ``attn_mask`` and the ``(windows · heads)`` pairs as the head axis, so the mask is broadcast over the
    batch instead of materialised per sample (the same maths: tested against a plain softmax reference). As in the
    original, the token grid is zero-padded at the end to multiples of the window (15 × 18 × 32 → 16 × 21 × 35: 30
    windows of 392 tokens) and padded tokens take part in the attention; a window larger than the grid shrinks to
    it and stops shifting along that axis. The relative-position index is a non-persistent buffer (derived from the
    options).

    Args:
        dim: token channels.
        window_size: (T, H, W) window in tokens.
        shift_size: (T, H, W) cyclic shift in tokens (0: plain windows).
        num_heads: attention heads (``dim`` must divide).
        qkv_bias: bias of the qkv projection.
        proj_bias: bias of the output projection.
        attention_dropout: dropout of the attention weights (training only).
        dropout: dropout after the output projection.
    """

    relative_position_index: Tensor  # (V, V) buffer

    def __init__(
        self,
        dim: int,
        window_size: Triple,
        shift_size: Triple,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attention_dropout: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} is not divisible by num_heads={num_heads}")
        self.window_size: Triple = (int(window_size[0]), int(window_size[1]), int(window_size[2]))
        self.shift_size: Triple = (int(shift_size[0]), int(shift_size[1]), int(shift_size[2]))
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.dropout = nn.Dropout(dropout)
        table = math.prod(2 * w - 1 for w in window_size)
        self.relative_position_bias_table = nn.Parameter(torch.empty(table, num_heads))  # (table, heads)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(self.window_size), persistent=False)

    def attention_bias(self, size: Triple, device: torch.device | None = None) -> tuple[Tensor, Triple, Triple]:
        """``(windows, heads, V, V)`` relative-position bias plus shift mask for a token grid of ``size``, with the
        window and shift that grid uses."""
        window, shift = fit_window(size, self.window_size, self.shift_size)
        vol = math.prod(window)
        # As the original: a shrunk window reads the top-left block of the full window's index (exact when only the
        # temporal window shrinks, the slowest axis of the flattening).
        index = self.relative_position_index[:vol, :vol].reshape(-1)  # (V·V,)
        bias = self.relative_position_bias_table[index].view(vol, vol, -1).permute(2, 0, 1)  # (heads, V, V)
        padded = tuple(s + p for s, p in zip(size, _pad_sizes(size, window), strict=True))
        windows = math.prod([p // w for p, w in zip(padded, window, strict=True)])  # a list: dynamo traces it
        if sum(shift) > 0:
            mask = shifted_window_mask(padded, window, shift, device)  # type: ignore[arg-type]
            return bias[None] + mask[:, None].to(bias.dtype), window, shift  # (windows, heads, V, V)
        return bias[None].expand(windows, -1, -1, -1), window, shift  # (windows, heads, V, V)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, H, W, C)`` → ``(B, T, H, W, C)``."""
        b, t, h, w, c = x.shape
        bias, window, shift = self.attention_bias((t, h, w), x.device)  # (nWin, heads, V, V)
        pt, ph, pw = _pad_sizes((t, h, w), window)
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pt))  # (B, Tp, Hp, Wp, C)
        tp, hp, wp = t + pt, h + ph, w + pw
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(1, 2, 3))
        nt, nh, nw = tp // window[0], hp // window[1], wp // window[2]
        n_win, vol, heads = nt * nh * nw, math.prod(window), self.num_heads
        x = x.view(b, nt, window[0], nh, window[1], nw, window[2], c)  # (B, nT, wt, nH, wh, nW, ww, C)
        x = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, n_win, vol, c)  # (B, nWin, V, C)
        qkv = self.qkv(x).view(b, n_win, vol, 3, heads, c // heads)  # (B, nWin, V, 3, heads, d)
        qkv = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, b, n_win * heads, vol, c // heads)  # (3, B, nWin·heads, V, d)
        mask = bias.reshape(1, n_win * heads, vol, vol).to(qkv.dtype)  # broadcast over B
        dropout = self.attention_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask, dropout_p=dropout)
        o = o.view(b, n_win, heads, vol, c // heads).permute(0, 1, 3, 2, 4).reshape(b, n_win, vol, c)  # heads concat
        o = self.dropout(self.proj(o))  # (B, nWin, V, C)
        o = o.view(b, nt, nh, nw, window[0], window[1], window[2], c)  # (B, nT, nH, nW, wt, wh, ww, C)
        o = o.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, tp, hp, wp, c)  # (B, Tp, Hp, Wp, C)
        if sum(shift) > 0:
            o = torch.roll(o, shifts=shift, dims=(1, 2, 3))
        return o[:, :t, :h, :w].contiguous()  # (B, T, H, W, C)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"


class SwiGLU(nn.Module):
    """``x, gate = split(x)``; ``SiLU(gate) · x``: halves the last axis."""

    def forward(self, x: Tensor) -> Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class ConvMLP(nn.Module):
    """Linear(C → 2h) → SwiGLU → depthwise Conv3d(h, 3×3×3, padding 1) → GELU → Linear(h → C) → Dropout.

    The original's ``MLP`` with ``TiedBlockConv3d(B=1)``, which is a plain depthwise convolution.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, 2 * hidden)
        self.swiglu = SwiGLU()
        self.dwconv = nn.Conv3d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, H, W, C)`` → ``(B, T, H, W, C)``."""
        x = self.swiglu(self.linear1(x))  # (B, T, H, W, h)
        x = self.act(self.dwconv(x.permute(0, 4, 1, 2, 3)))  # (B, h, T, H, W)
        return self.dropout(self.linear2(x.permute(0, 2, 3, 4, 1)))  # (B, T, H, W, C)


class BehaviorMLP(nn.Module):
    """Per-frame signals ``(B, T, S)`` → a token bias ``(B, T / p, C)``: Linear(S → hidden) → Tanh → Dropout →
    Linear(hidden → C / p) → Tanh, the ``p`` frames of a temporal patch concatenated (the original's reshape)."""

    def __init__(self, in_features: int, hidden: int, dim: int, patch_frames: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.patch_frames = patch_frames
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim // patch_frames),
            nn.Tanh(),
        )

    def forward(self, signals: Tensor) -> Tensor:
        b, t, _ = signals.shape
        return self.mlp(signals).reshape(b, t // self.patch_frames, -1)  # (B, T/p, C): frames of a patch side by side


class SwinBlock(nn.Module):
    """``x += B-MLP(signals)``; ``x += DropPath(W-MSA(x))``; ``x += DropPath(MLP(x))`` — no LayerNorm."""

    def __init__(
        self,
        behavior_mlp: BehaviorMLP,
        attention: ShiftedWindowAttention3d,
        mlp: ConvMLP,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.behavior_mlp, self.attention, self.mlp = behavior_mlp, attention, mlp
        self.drop_path = DropPath(drop_path)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: Tensor, signals: Tensor) -> Tensor:
        """``x (B, T', H', W', C)``, ``signals (B, T, S)`` → ``(B, T', H', W', C)``."""
        x = x + self.behavior_mlp(signals)[:, :, None, None, :]  # (B, T', 1, 1, C): broadcast over H', W'
        if self.grad_checkpointing and self.training:
            attended = checkpoint(self.attention, x, use_reentrant=False, preserve_rng_state=True)
        else:
            attended = self.attention(x)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(x))


class Swin3dCore(Core):
    """Dynamic-V1FM's 3D Swin core: patch embedding + blocks of behaviour bias, shifted-window attention and a
    convolutional SwiGLU MLP.

    The video enters as its own channels only; behaviour (pupil size, running speed) and the pupil centre enter
    every block through its behaviour MLP, in that order (4 signals)::

        video (B, 1, T, H, W) ─► Conv3d 2×2×2, stride 2 ─► LayerNorm ─► tokens (B, T/2, H/2, W/2, C)
        for each of 4 blocks (no LayerNorm inside a block):
            x = x + B-MLP([behaviour, pupil centre])      per frame 4 → 112 → 112, 2 frames of a patch concatenated
            x = x + DropPath(W-MSA(x))                    3D windows (8, 7, 7), shifted by (4, 3, 3) in EVERY block
            x = x + DropPath(MLP(x))                      Linear → SwiGLU → depthwise Conv3d 3×3×3 → GELU → Linear
        features (B, C, T/2, H/2, W/2)

    With the defaults a ``(1, 30, 36, 64)`` clip becomes ``(224, 15, 18, 32)``. Token ``k`` covers input frames
    ``2k, 2k + 1``; by the Core contract the 15 tokens belong to the *last* 15 frames (the original trains token
    ``k`` against response frame ``15 + k``), so the mapping from input time to output time is learned. Attention
    is non-causal within a window. Init as the original: every Linear of the blocks trunc_normal(0.02) with zero
    bias, the relative-position table trunc_normal(0.02); the convolutions and the LayerNorm keep PyTorch's
    defaults.

    Args:
        embed_dim: token channels (``emb_dim``).
        num_blocks: transformer blocks.
        num_heads: attention heads per block.
        patch_size: (T, H, W) patch of the Conv3d embedding, also its stride.
        window_size: (T, H, W) attention window in tokens.
        shift_size: (T, H, W) cyclic shift, applied in every block; ``None``: half the window (the original).
        mlp_hidden: hidden channels of the MLP after SwiGLU (``mlp_dim``; the first Linear has twice as many).
        behavior_hidden: hidden units of each behaviour MLP; ``None``: ``embed_dim // 2`` (the original).
        qkv_bias: bias of the qkv projections.
        proj_bias: bias of the attention output projections.
        dropout: dropout after the attention projection and at the MLP output (``t_dropout``).
        attention_dropout: dropout of the attention weights.
        behavior_dropout: dropout inside the behaviour MLPs.
        drop_path: stochastic-depth rate of both residual branches, the same in every block.
        grad_checkpointing: recompute the attention in the backward pass (memory for time), as the original.
        video_channels: channels of the video (1, grey).
        layer_norm_eps: epsilon of the LayerNorm after the patch embedding.
    """

    def __init__(
        self,
        embed_dim: int = 224,
        num_blocks: int = 4,
        num_heads: int = 4,
        patch_size: Triple = (2, 2, 2),
        window_size: Triple = (8, 7, 7),
        shift_size: Triple | None = None,
        mlp_hidden: int = 488,
        behavior_hidden: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        behavior_dropout: float = 0.0,
        drop_path: float = 0.0,
        grad_checkpointing: bool = False,
        video_channels: int = 1,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if len(patch_size) != 3 or len(window_size) != 3 or (shift_size is not None and len(shift_size) != 3):
            raise ValueError("patch_size, window_size and shift_size must be (T, H, W) triples")
        if embed_dim % patch_size[0]:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by the temporal patch {patch_size[0]}")
        shift = tuple(w // 2 for w in window_size) if shift_size is None else tuple(shift_size)
        if any(not 0 <= s < w for s, w in zip(shift, window_size, strict=True)):
            raise ValueError(f"shift_size {shift} must lie in [0, window_size {tuple(window_size)})")
        self.embed_dim = embed_dim
        self.patch_size: Triple = (int(patch_size[0]), int(patch_size[1]), int(patch_size[2]))
        self.patch_embedding = nn.Conv3d(video_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        hidden = embed_dim // 2 if behavior_hidden is None else behavior_hidden
        self.blocks = nn.ModuleList(
            SwinBlock(
                BehaviorMLP(4, hidden, embed_dim, self.patch_size[0], behavior_dropout),
                ShiftedWindowAttention3d(
                    embed_dim,
                    (int(window_size[0]), int(window_size[1]), int(window_size[2])),
                    (shift[0], shift[1], shift[2]),
                    num_heads,
                    qkv_bias,
                    proj_bias,
                    attention_dropout,
                    dropout,
                ),
                ConvMLP(embed_dim, mlp_hidden, dropout),
                drop_path,
                grad_checkpointing,
            )
            for _ in range(num_blocks)
        )
        self.blocks.apply(self._init_linear)

    @staticmethod
    def _init_linear(m: nn.Module) -> None:
        """``Transformer.init_weight``: trunc_normal(0.02) weights and zero biases for every Linear of the blocks."""
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        if behavior is None or pupil_center is None:
            raise ValueError(
                "Swin3dCore needs `behavior` (B, 2, T) and `pupil_center` (B, 2, T) for its behaviour MLPs"
            )
        _, _, t, h, w = video.shape
        pt, ph, pw = _pad_sizes((t, h, w), self.patch_size)
        x = F.pad(video, (0, pw, 0, ph, 0, pt))  # (B, C, Tp, Hp, Wp): zeros at the end, as the original
        x = self.norm(self.patch_embedding(x).permute(0, 2, 3, 4, 1))  # (B, T', H', W', C)
        signals = torch.cat([behavior, pupil_center], dim=1).to(x.dtype)  # (B, 4, T)
        signals = F.pad(signals, (0, pt)).transpose(1, 2)  # (B, Tp, 4)
        for block in self.blocks:
            x = block(x, signals)  # (B, T', H', W', C)
        return x.permute(0, 4, 1, 2, 3)  # (B, C, T', H', W')

    def output_shape(self, input_shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        _, t, h, w = input_shape
        pt, ph, pw = self.patch_size
        return self.embed_dim, -(-t // pt), -(-h // ph), -(-w // pw)


__all__ = ["ShiftedWindowAttention3d", "Swin3dCore", "fit_window", "relative_position_index", "shifted_window_mask"]
