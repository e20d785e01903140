"""CutMix for video + responses, as DwiseNeuro trains (``alpha=1``, ``prob=0.5``), for any model.

Ported from https://github.com/lRomul/sensorium/blob/master/src/mixers.py (``CutMix``, ``rand_bbox``) to 36×64
frames, per-mouse partners and seeded draws. What it mixes, and each difference from the original:
docs/training.md, "CutMix".
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def rand_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box ``(y1, y2, x1, x2)`` of about ``lam`` of a ``height × width`` frame, centred at random, clipped to it.

    As the original's ``rand_bbox`` (sides ``int(size · sqrt(lam))``, half-sides on both sides of a uniform centre)
    but with each side drawn on its own axis.
    """
    ratio = float(np.sqrt(lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x1, x2 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return y1, y2, x1, x2


def _partners(mice: list[str], rng: np.random.Generator) -> list[int | None]:
    """For each sample, a random other sample index of the same mouse, or None if it is its mouse's only sample."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(mice):
        groups.setdefault(m, []).append(i)
    out: list[int | None] = [None] * len(mice)
    for members in groups.values():
        n = len(members)
        if n < 2:
            continue
        for pos, i in enumerate(members):
            out[i] = members[(pos + int(rng.integers(1, n))) % n]
    return out


def cutmix_batch(
    batch: dict[str, Any], rng: np.random.Generator, alpha: float = 1.0, prob: float = 0.5, mix_behavior: bool = True
) -> dict[str, Any]:
    """Mix ``batch`` in place (and return it); works for one-mouse and mixed-mouse batches.

    Adds ``cutmix_partner`` ``(B,)`` (partner index, −1 for unmixed samples) and ``cutmix_fraction`` ``(B,)`` (pasted
    area fraction, 0 for unmixed samples) so the mix can be inspected.
    """
    video = batch["video"]  # (B, C, T, H, W)
    b, h, w = video.shape[0], video.shape[-2], video.shape[-1]
    mouse = batch["mouse_id"]
    mice = [mouse] * b if isinstance(mouse, str) else list(mouse)
    partner = _partners(mice, rng)
    use = rng.random(b) < prob
    lams = rng.beta(alpha, alpha, size=b)
    src = np.arange(b)
    boxes = np.zeros((b, 4), dtype=np.int64)  # (B, [y1, y2, x1, x2]); empty box = unmixed
    for i in range(b):
        j = partner[i]
        if j is None or not use[i]:
            continue
        src[i] = j
        boxes[i] = rand_box(h, w, float(lams[i]), rng)
    fraction = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / (h * w)  # (B,)
    src[fraction == 0] = np.arange(b)[fraction == 0]

    device = video.device
    box = torch.from_numpy(boxes).to(device)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows >= box[:, :1]) & (rows < box[:, 1:2])  # (B, H)
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None, None]  # (B, 1, 1, H, W)
    src_t = torch.from_numpy(src).to(device)
    frac_t = torch.from_numpy(fraction).to(device=device, dtype=torch.float32)  # (B,)
    batch["video"] = torch.where(mask, video[src_t], video)

    def mix(x: torch.Tensor) -> torch.Tensor:
        a = frac_t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
        return (1 - a) * x + a * x[src_t]

    if mix_behavior:
        for key in ("behavior", "pupil_center"):
            if key in batch:
                batch[key] = mix(batch[key])
    # Responses are mixed on one scale per neuron: with `data.response_scale` each sample's official targets carry
    # the gain of its own frames, so they are divided by it, mixed, and given back the receiving sample's gain.
    responses, scale = batch["responses"], batch.get("response_scale")
    if isinstance(responses, torch.Tensor):
        flat = responses if scale is None else responses / scale  # (B, N, T)
        batch["responses"] = mix(flat) if scale is None else mix(flat) * scale
    else:  # mixed mice: B × (N_mouse, T); partners share the mouse, hence N
        flat_list = responses if scale is None else [r / g for r, g in zip(responses, scale, strict=True)]
        mixed = [
            r if fraction[i] == 0 else (1 - float(fraction[i])) * r + float(fraction[i]) * flat_list[int(src[i])]
            for i, r in enumerate(flat_list)
        ]
        batch["responses"] = mixed if scale is None else [r * g for r, g in zip(mixed, scale, strict=True)]
    batch["cutmix_partner"] = torch.from_numpy(np.where(fraction > 0, src, -1))
    batch["cutmix_fraction"] = torch.from_numpy(fraction)
    return batch


class CutMix(Callback):
    """CutMix training batches on their device (``on_train_batch_start``); validation and test batches are untouched.

    Args:
        alpha: ``Beta(alpha, alpha)`` parameter of the box's target area fraction (1: uniform).
        prob: probability that a sample is mixed with a partner.
        mix_behavior: also mix behaviour and pupil centre by the pasted area fraction (else keep the sample's own).
        seed: seed of the draws; default the global seed (``seed_everything``, ``PL_GLOBAL_SEED``) or 0.
    """

    def __init__(self, alpha: float = 1.0, prob: float = 0.5, mix_behavior: bool = True, seed: int | None = None):
        if alpha <= 0:
            raise ValueError(f"CutMix: alpha must be > 0, got {alpha}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"CutMix: prob must be in [0, 1], got {prob}")
        self.alpha, self.prob, self.mix_behavior, self.seed = alpha, prob, mix_behavior, seed

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def generator(self, global_step: int, batch_idx: int, rank: int) -> np.random.Generator:
        """The generator for one batch: ``(global_step, batch_idx)`` is unique per batch even under accumulation."""
        return np.random.default_rng([self._seed(), global_step, batch_idx, rank])

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.prob == 0:
            return
        rng = self.generator(trainer.global_step, batch_idx, trainer.global_rank)
        cutmix_batch(batch, rng, self.alpha, self.prob, self.mix_behavior)
