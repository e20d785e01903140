"""ViV1T core: a factorized video vision transformer (3rd place, SENSORIUM 2023).

Port of ``ViViTCore`` / ``ViViT`` of https://github.com/bryanlimy/ViV1T/blob/main/src/viv1t/model/core/vivit.py as
its README command builds it (``--core=vivit --core_parallel_attention``), with the tuned defaults of ``train.py``
(Table 3 of the retrospective paper, https://arxiv.org/abs/2407.09100). Spatial then temporal attention over
overlapping tubelets; not causal. Model, parameters, parity and differences: docs/models.md, "ViV1T (3rd place):
factorized video transformer + Gaussian readout with a behaviour state encoder".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_sensorium.models.cores.base import Core
from lightning_sensorium.models.layers import DropPath, behavior_as_channels


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float = 0.0, training: bool = False) -> Tensor:
    """Multi-head attention ``softmax(q kᵀ · scale) v`` on ``(B, heads, L, d)``, then dropout on its output.

    Uses :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels where the
    device has them), as the original; the dropout is applied to the attention *output*, not to the attention
    weights (the original notes that dropout inside the flash kernel costs memory).
    """
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, heads, L, d)
    return F.dropout(out, p=dropout, training=training)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, _ = x.shape
    return x.reshape(b, n, heads, -1).transpose(1, 2)  # (B, heads, L, d)


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # (B, L, heads·d)


def _init_block(module: nn.Module) -> None:
    """The original blocks' ``init_weight``: Linear ~ trunc_normal(std 0.02), zero bias; LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ParallelTransformerBlock(nn.Module):
    """Attention and feed-forward in parallel from one LayerNorm and one fused projection (Wang 2021, GPT-J).

    With the README model's sizes::

        x ─► LN ─► Linear(112 → 3·528 + 136, no bias) ─► q, k, v (11 heads × 48), ff (136)
        y = x + DropPath(Linear(528→112, no bias)(Dropout(SDPA(q, k, v))))
              + DropPath(Linear(136→112, no bias)(Dropout(GELU(ff))))

    Args:
        dim: token embedding size.
        heads: attention heads.
        head_dim: size of each head.
        ff_dim: hidden size of the feed-forward branch.
        attention_dropout: dropout on the attention output (before the output projection).
        ff_dropout: dropout after the feed-forward GELU.
        drop_path: stochastic-depth rate of each branch.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        ff_dim: int,
        attention_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale, self.attention_dropout = heads, head_dim**-0.5, attention_dropout
        self.fused_dims = (inner, inner, inner, ff_dim)
        self.norm = nn.LayerNorm(dim)
        self.fused_linear = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(inner, dim, bias=False)
        self.ff_out = nn.Sequential(nn.GELU(), nn.Dropout(ff_dropout), nn.Linear(ff_dim, dim, bias=False))
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)
        self.apply(_init_block)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, dim)`` → ``(B, L, dim)``."""
        q, k, v, ff = self.fused_linear(self.norm(x)).split(self.fused_dims, dim=-1)  # (B, L, ·) each
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))  # (B, heads, L, head_dim)
        attn = _merge_heads(attention(q, k, v, self.scale, self.attention_dropout, self.training))  # (B, L, inner)
        return x + self.drop_path1(self.attn_out(attn)) + self.drop_path2(self.ff_out(ff))


class TransformerBlock(nn.Module):
    """Standard pre-LN block: ``x + DropPath(MHA(LN x))`` then ``x + DropPath(FF(LN x))``.

    The attention is LN → Linear(dim → 3·inner, no bias) → SDPA → Dropout → Linear(inner → dim) → Dropout; the FF
    is LN → Linear(dim → ff_dim) → GELU → Dropout → Linear(ff_dim → dim) → Dropout (the original's ``Attention``
    and ``TransformerBlock.ff``; arguments as :class:`ParallelTransformerBlock`).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        ff_dim: int,
        attention_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale, self.attention_dropout = heads, head_dim**-0.5, attention_dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.attn_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(attention_dropout))
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_dim),
            nn.GELU(),
            nn.Dropout(ff_dropout),
            nn.Linear(ff_dim, dim),
            nn.Dropout(ff_dropout),
        )
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)
        self.apply(_init_block)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, L, dim)`` → ``(B, L, dim)``."""
        q, k, v = (_split_heads(t, self.heads) for t in self.to_qkv(self.norm(x)).chunk(3, dim=-1))  # (B, h, L, d)
        attn = _merge_heads(attention(q, k, v, self.scale, self.attention_dropout, self.training))  # (B, L, inner)
        x = x + self.drop_path1(self.attn_out(attn))
        return x + self.drop_path2(self.ff(x))


class Tokenizer(nn.Module):
    """Overlapping tubelets → token embeddings with learned spatial and temporal positions.

    ``(B, C, T, H, W)`` → ``(B, T', H'·W', dim)`` with ``T' = T − temporal_patch + 1`` and
    ``H' = ⌊(H − spatial_patch) / spatial_stride⌋ + 1`` (likewise ``W'``). Each tubelet is flattened in the
    original's ``(c, t, h, w)`` order, then LayerNorm → Linear → LayerNorm → Dropout (the original's
    ``patch_mode=0``). Positions: ``(1, 1, H'·W', dim)`` + ``(1, T'_max, 1, dim)``, both ``randn``
    (``pos_encoding=3``); ``T'_max`` is the token count of a ``max_frames`` clip. ``fused``: the same LayerNorm →
    Linear as a convolution (:meth:`_fused_embed`), without materialising the tubelets.
    """

    def __init__(
        self,
        channels: int,
        grid: tuple[int, int],
        dim: int,
        spatial_patch: int,
        spatial_stride: int,
        temporal_patch: int,
        max_frames: int,
        dropout: float,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        self.spatial_patch, self.spatial_stride, self.temporal_patch = spatial_patch, spatial_stride, temporal_patch
        self.grid = grid
        patch_dim = channels * temporal_patch * spatial_patch * spatial_patch
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.spatial_pos = nn.Parameter(torch.randn(1, 1, grid[0] * grid[1], dim))  # (1, 1, P, D)
        self.temporal_pos = nn.Parameter(torch.randn(1, max_frames - temporal_patch + 1, 1, dim))  # (1, T'max, 1, D)

    def forward(self, x: Tensor) -> Tensor:
        t_max = self.temporal_pos.shape[1]
        if x.shape[2] < self.temporal_patch or x.shape[2] - self.temporal_patch + 1 > t_max:
            raise ValueError(
                f"ViViTCore: a clip of {x.shape[2]} frames does not fit: it needs at least temporal_patch="
                f"{self.temporal_patch} frames and at most max_frames={t_max + self.temporal_patch - 1}"
            )
        embedded = self._fused_embed(x) if self.fused else self._unfold_embed(x)  # (B, T', P, D)
        tokens = self.dropout(self.norm_out(embedded))  # (B, T', P, D)
        return tokens + self.spatial_pos + self.temporal_pos[:, : tokens.shape[1]]  # (B, T', P, D)

    def _unfold_embed(self, x: Tensor) -> Tensor:
        """``Linear(LayerNorm(tubelet))`` literally: every tubelet materialised (the original's ``Unfold3d``)."""
        sp, ss = self.spatial_patch, self.spatial_stride
        patches = x.unfold(2, self.temporal_patch, 1).unfold(3, sp, ss).unfold(4, sp, ss)  # (B,C,T',H',W',pt,ps,ps)
        b, c, t, h, w = patches.shape[:5]
        patches = patches.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, t, h * w, -1)  # (B, T', P, C·pt·ps·ps)
        return self.proj(self.norm_in(patches))  # (B, T', P, D)

    def _fused_embed(self, x: Tensor) -> Tensor:
        """The same ``Linear(LayerNorm(tubelet))`` as a convolution, without materialising the tubelets.

        With ``μ, σ²`` the tubelet's mean and (biased) variance, ``W`` the projection and ``γ, β`` the LayerNorm's
        affine: ``W(γ ⊙ (x − μ)/√(σ² + ε) + β) + b = ((Wγ) ∗ x − μ Σ(Wγ)) / √(σ² + ε) + (Wβ + b)``, where
        ``(Wγ) ∗ x`` is one Conv3d with ``Wγ`` as its kernel and ``μ``, ``E[x²]`` are average pools. The statistics
        are computed in float32 (``σ² = E[x²] − μ²``).
        """
        d = self.proj.out_features
        c = x.shape[1]
        ks = (self.temporal_patch, self.spatial_patch, self.spatial_patch)
        stride = (1, self.spatial_stride, self.spatial_stride)
        kernel = self.proj.weight * self.norm_in.weight  # (D, C·pt·ps·ps): W·diag(γ), columns in (c, t, h, w) order
        y = F.conv3d(x, kernel.view(d, c, *ks).to(x.dtype), stride=stride)  # (B, D, T', H', W')
        xf = x.float()
        mean = F.avg_pool3d(xf.mean(1, keepdim=True), ks, stride)  # (B, 1, T', H', W'): mean over the tubelet
        var = (F.avg_pool3d(xf.square().mean(1, keepdim=True), ks, stride) - mean.square()).clamp(min=0.0)
        inv_std = torch.rsqrt(var + self.norm_in.eps)  # (B, 1, T', H', W')
        offset = self.proj.weight @ self.norm_in.bias + self.proj.bias  # (D,): W·β + b
        out = (y - mean * kernel.sum(1).view(1, d, 1, 1, 1)) * inv_std + offset.view(1, d, 1, 1, 1)
        b, _, t, h, w = out.shape
        return out.reshape(b, d, t, h * w).permute(0, 2, 3, 1).to(y.dtype)  # (B, T', P, D)


class ViViTCore(Core):
    """Factorized spatial-then-temporal transformer on video + behaviour channels.

    With the defaults (the README model)::

        video (B,1,T,36,64) ┐
        behavior (B,2,T)    ├─► 5 channels ─► tubelets 25×7×7, stride 1×2×2 ─► LN(6125) ─► Linear(→112) ─► LN ─► Dropout
        pupil (B,2,T)       ┘                                                  + spatial (435) + temporal (T') positions
          ─► spatial transformer: 3 blocks over (B·T', 435, 112)
          ─► temporal transformer: 5 blocks over (B·435, T', 112), bidirectional (no mask)
          ─► features (B, 112, T' = T − 24, 15, 29)

    Each output frame ``k`` is the token of the tubelet of input frames ``k … k + 24``: it belongs to its last frame
    ``k + 24``, so the output covers the last ``T − 24`` input frames (the Core contract). The temporal attention is
    not causal, so an output frame also sees later frames within the clip. Blocks are
    :class:`ParallelTransformerBlock` (``parallel_attention=True``, the README command) or the standard
    :class:`TransformerBlock`. Linear weights in the blocks start truncated-normal (std 0.02) with zero biases, as
    the original's ``init_weight``; the tokenizer keeps PyTorch's default init; both position tables start
    ``randn``. The features are not cast to fp32 (Lightning's precision setting decides).

    Args:
        dim: token embedding size (``core_emb_dim``).
        heads: attention heads (``core_num_heads``).
        head_dim: size of each head (``core_head_dim``).
        ff_dim: hidden size of the feed-forward branch (``core_mlp_dim``).
        spatial_depth: blocks of the spatial transformer.
        temporal_depth: blocks of the temporal transformer.
        spatial_patch: tubelet height and width in pixels.
        spatial_stride: stride between tubelets in pixels.
        temporal_patch: tubelet length in frames (the temporal stride is 1).
        patch_dropout: dropout on the token embeddings (``core_p_dropout``).
        attention_dropout: dropout on the attention output (``core_mha_dropout``).
        ff_dropout: dropout in the feed-forward branch (``core_ff_dropout``).
        drop_path: stochastic-depth rate of every residual branch (``core_drop_path``).
        parallel_attention: ``ParallelTransformerBlock`` (the README model) instead of ``TransformerBlock``.
        max_frames: the longest clip the temporal position table covers (the original's ``max_frame``, 300).
        video_shape: ``(H, W)`` of the frames, which sizes the spatial position table.
        video_channels: channels of the video itself (1, grey).
        behavior_channels: add pupil size and running speed as 2 constant image channels.
        pupil_channels: add the pupil centre as 2 constant image channels (``core_behavior_mode=2``: both on).
        gradient_checkpointing: recompute each block in the backward pass instead of storing its activations.
        fused_tokenizer: compute the tokenizer's LayerNorm + Linear as one Conv3d plus pooled tubelet statistics
            (same parameters and function; no ``(B, T', P, 6125)`` tensor: 1.2 GB per 140-frame clip in float32,
            held twice in training).
            False: the original's literal unfold → LayerNorm → Linear.
    """

    def __init__(
        self,
        dim: int = 112,
        heads: int = 11,
        head_dim: int = 48,
        ff_dim: int = 136,
        spatial_depth: int = 3,
        temporal_depth: int = 5,
        spatial_patch: int = 7,
        spatial_stride: int = 2,
        temporal_patch: int = 25,
        patch_dropout: float = 0.1338,
        attention_dropout: float = 0.358,
        ff_dropout: float = 0.0592,
        drop_path: float = 0.0505,
        parallel_attention: bool = True,
        max_frames: int = 300,
        video_shape: tuple[int, int] = (36, 64),
        video_channels: int = 1,
        behavior_channels: bool = True,
        pupil_channels: bool = True,
        gradient_checkpointing: bool = False,
        fused_tokenizer: bool = True,
    ) -> None:
        super().__init__()
        for name, value in [
            ("dim", dim),
            ("heads", heads),
            ("head_dim", head_dim),
            ("ff_dim", ff_dim),
            ("spatial_patch", spatial_patch),
            ("spatial_stride", spatial_stride),
            ("temporal_patch", temporal_patch),
        ]:
            if value < 1:
                raise ValueError(f"ViViTCore: {name} must be ≥ 1, got {value}")
        h, w = int(video_shape[0]), int(video_shape[1])
        if spatial_patch > min(h, w):
            raise ValueError(f"ViViTCore: spatial_patch={spatial_patch} is larger than the frame {h}×{w}")
        if max_frames < temporal_patch:
            raise ValueError(f"ViViTCore: max_frames={max_frames} must be ≥ temporal_patch={temporal_patch}")
        self.behavior_channels, self.pupil_channels = behavior_channels, pupil_channels
        self.video_shape = (h, w)
        self.input_channels = video_channels + 2 * int(behavior_channels) + 2 * int(pupil_channels)
        self.gradient_checkpointing = gradient_checkpointing
        self.grid = ((h - spatial_patch) // spatial_stride + 1, (w - spatial_patch) // spatial_stride + 1)
        self.tokenizer = Tokenizer(
            self.input_channels,
            self.grid,
            dim,
            spatial_patch,
            spatial_stride,
            temporal_patch,
            max_frames,
            patch_dropout,
            fused=fused_tokenizer,
        )
        block = ParallelTransformerBlock if parallel_attention else TransformerBlock
        args = (dim, heads, head_dim, ff_dim, attention_dropout, ff_dropout, drop_path)
        self.spatial_transformer = nn.ModuleList(block(*args) for _ in range(spatial_depth))
        self.temporal_transformer = nn.ModuleList(block(*args) for _ in range(temporal_depth))

    def _run(self, blocks: nn.ModuleList, x: Tensor) -> Tensor:
        for blk in blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)  # same RNG state in the recomputation (dropout)
            else:
                x = blk(x)
        return x

    def forward(self, video: Tensor, behavior: Tensor | None = None, pupil_center: Tensor | None = None) -> Tensor:
        if self.behavior_channels and behavior is None:
            raise ValueError("ViViTCore(behavior_channels=True) needs `behavior` (B, 2, T)")
        if self.pupil_channels and pupil_center is None:
            raise ValueError("ViViTCore(pupil_channels=True) needs `pupil_center` (B, 2, T)")
        x = behavior_as_channels(
            video, behavior if self.behavior_channels else None, pupil_center if self.pupil_channels else None
        )  # (B, C_in, T, H, W)
        if x.shape[1] != self.input_channels or tuple(x.shape[-2:]) != self.video_shape:
            raise ValueError(
                f"ViViTCore expects {self.input_channels} channels of {self.video_shape} frames after adding "
                f"behaviour, got {x.shape[1]} channels of {tuple(x.shape[-2:])} (check video_channels, video_shape)"
            )
        tokens = self.tokenizer(x)  # (B, T', P, D)
        b, t, p, d = tokens.shape
        x = self._run(self.spatial_transformer, tokens.reshape(b * t, p, d))  # (B·T', P, D)
        x = x.reshape(b, t, p, d).transpose(1, 2).reshape(b * p, t, d)  # (B·P, T', D)
        x = self._run(self.temporal_transformer, x)  # (B·P, T', D)
        return x.reshape(b, p, t, d).permute(0, 3, 2, 1).reshape(b, d, t, *self.grid)  # (B, D, T', H', W')

    def extra_repr(self) -> str:
        return f"input_channels={self.input_channels}, grid={self.grid}, checkpointing={self.gradient_checkpointing}"


__all__ = ["ParallelTransformerBlock", "Tokenizer", "TransformerBlock", "ViViTCore", "attention"]
