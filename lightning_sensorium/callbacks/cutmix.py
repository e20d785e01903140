"""CutMix for video + responses, as DwiseNeuro trains (``alpha=1``, ``prob=0.5``), for any model.

Ported from https://github.com/lRomul/sensorium/blob/main/src/mixers.py (``CutMix``, ``rand_bbox``), with the
partner of https://github.com/lRomul/sensorium/blob/main/src/datasets.py (``TrainMouseVideoDataset.__getitem__``:
a fresh random window of the same mouse) and the box on the padded input of ``src/inputs.py``
(``StackInputsProcessor``), or, the default, a partner from the batch and a box on the frame. Seeded draws. What it
mixes, and each difference from the original: docs/training.md, "CutMix".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sensorium.data.datamodule import SensoriumDataModule

#: ``(mouse_id, rng) -> sample``: one fresh training window of that mouse, as the training loader reads it.
WindowSource = Callable[[str, np.random.Generator], dict[str, Any]]


def rand_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box ``(y1, y2, x1, x2)`` of about ``lam`` of a ``height × width`` frame, centred at random, clipped to it.

    As the original's ``rand_bbox`` (sides ``int(size · sqrt(lam))``, half-sides on both sides of a uniform centre)
    but with each side drawn on its own axis (the original swaps them, the same on its square canvas).
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


def _to_frame(box: np.ndarray, canvas: tuple[int, int], frame: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box ``[y1, y2, x1, x2]`` on the canvas the frame is centred in (``top = (H_c − H) // 2``, as
    ``DwiseNeuroCore`` and the original's ``StackInputsProcessor`` pad) → its part on the frame, in frame
    coordinates (maybe empty)."""
    (ch, cw), (h, w) = canvas, frame
    top, left = (ch - h) // 2, (cw - w) // 2
    y1, y2 = min(max(int(box[0]) - top, 0), h), min(max(int(box[1]) - top, 0), h)
    x1, x2 = min(max(int(box[2]) - left, 0), w), min(max(int(box[3]) - left, 0), w)
    return y1, max(y1, y2), x1, max(x1, x2)


def _draw(
    mice: list[str], canvas: tuple[int, int], rng: np.random.Generator, alpha: float, prob: float, fresh: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``(B, 4)`` on the canvas (empty: unmixed) and, for batch partners, the partner index ``(B,)`` of each
    sample (itself when unmixed). Batch partners keep the draw order of earlier versions, so runs repeat."""
    b = len(mice)
    boxes = np.zeros((b, 4), dtype=np.int64)  # (B, [y1, y2, x1, x2])
    src = np.arange(b)
    partner: list[int | None] = list(range(b)) if fresh else _partners(mice, rng)
    use = rng.random(b) < prob
    lams = rng.beta(alpha, alpha, size=b)
    for i in range(b):
        j = partner[i]
        if j is None or not use[i]:
            continue
        src[i] = j
        boxes[i] = rand_box(*canvas, float(lams[i]), rng)
    empty = (boxes[:, 1] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 2])
    src[empty] = np.arange(b)[empty]
    return boxes, src


def _fresh_partners(
    batch: dict[str, Any],
    mixed: np.ndarray,
    mice: list[str],
    fresh_window: WindowSource,
    rng: np.random.Generator,
) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, Any]]]:
    """The partner inputs of every sample (its own where unmixed) and the fresh windows of the mixed ones."""
    samples = {int(i): fresh_window(mice[i], rng) for i in mixed}
    rows = torch.from_numpy(mixed).to(batch["video"].device)
    other: dict[str, torch.Tensor] = {}
    for key in ("video", "behavior", "pupil_center"):
        if key not in batch:
            continue
        own = batch[key]  # (B, C, T, H, W) or (B, 2, T)
        if not samples:
            other[key] = own
            continue
        new = torch.stack([samples[int(i)][key] for i in mixed]).to(device=own.device, dtype=own.dtype)
        if new.shape[1:] != own.shape[1:]:
            raise ValueError(
                f"CutMix: a fresh {key} window has shape {tuple(new.shape[1:])}, the batch's "
                f"{tuple(own.shape[1:])}: the data module reads windows of another length"
            )
        other[key] = own.clone()
        other[key][rows] = new
    return other, samples


def cutmix_batch(
    batch: dict[str, Any],
    rng: np.random.Generator,
    alpha: float = 1.0,
    prob: float = 0.5,
    mix_behavior: bool = True,
    canvas: tuple[int, int] | None = None,
    fresh_window: WindowSource | None = None,
    clamp_responses_min: float | None = None,
) -> dict[str, Any]:
    """Mix ``batch`` in place (and return it); works for one-mouse and mixed-mouse batches.

    ``canvas``: draw the box on a ``(height, width)`` canvas the frame is centred in (the model's padded input)
    and mix the targets by the box's share of the canvas; None: on the frame. ``fresh_window``: partners are
    fresh windows of the same mouse read from it, so every sample can be mixed; None: another sample of the batch
    of the same mouse (a mouse's only sample stays unmixed). ``clamp_responses_min``: clamp every response from
    below first (DwiseNeuro's ReLU of the targets happens in its dataset, before the mixer).

    Adds ``cutmix_fraction`` ``(B,)`` (the box's share of the canvas, 0 for unmixed samples), ``cutmix_box``
    ``(B, 4)`` (``y1, y2, x1, x2`` on the canvas), ``cutmix_partner`` ``(B,)`` (the partner's index in the batch;
    −1 for unmixed samples and fresh partners), and with fresh partners ``cutmix_partner_trial`` ``(B,)`` (the
    partner window's trial, −1 for unmixed samples), to inspect the mix.
    """
    video = batch["video"]  # (B, C, T, H, W)
    b, h, w = video.shape[0], video.shape[-2], video.shape[-1]
    ch, cw = canvas if canvas is not None else (h, w)
    if ch < h or cw < w:
        raise ValueError(f"CutMix(canvas={canvas}): frames of {h}×{w} are larger than the canvas")
    mouse = batch["mouse_id"]
    mice = [mouse] * b if isinstance(mouse, str) else list(mouse)
    boxes, src = _draw(mice, (ch, cw), rng, alpha, prob, fresh=fresh_window is not None)
    fraction = (boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) / (ch * cw)  # (B,)
    mixed = np.flatnonzero(fraction > 0)

    responses, scale = batch["responses"], batch.get("response_scale")  # (B, N, T) or B × (N_mouse, T)
    if clamp_responses_min is not None:
        responses = [r.clamp(min=clamp_responses_min) for r in responses]
    device = video.device
    partner_trial = np.full(b, -1, dtype=np.int64)
    if fresh_window is None:
        idx = torch.from_numpy(src).to(device)
        other: dict[str, torch.Tensor] = {k: batch[k][idx] for k in ("video", "behavior", "pupil_center") if k in batch}
        other_responses = [responses[int(j)] for j in src]
        other_scale = None if scale is None else [scale[int(j)] for j in src]
    else:
        other, samples = _fresh_partners(batch, mixed, mice, fresh_window, rng)
        other_responses, other_scale = list(responses), None if scale is None else list(scale)
        for i, sample in samples.items():
            r = sample["responses"].to(device=device, dtype=responses[i].dtype)  # (N_mouse, T)
            other_responses[i] = r if clamp_responses_min is None else r.clamp(min=clamp_responses_min)
            if other_scale is not None:
                other_scale[i] = sample["response_scale"].to(device=device, dtype=other_scale[i].dtype)
            partner_trial[i] = int(sample["trial"])

    box = torch.tensor([_to_frame(x, (ch, cw), (h, w)) for x in boxes], device=device).view(b, 4)  # on the frame
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (rows >= box[:, :1]) & (rows < box[:, 1:2])  # (B, H)
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None, None]  # (B, 1, 1, H, W)
    batch["video"] = torch.where(mask, other["video"], video)
    if mix_behavior:
        a = torch.from_numpy(fraction).to(device)  # (B,)
        for key in ("behavior", "pupil_center"):
            if key in batch:
                x = batch[key]  # (B, 2, T)
                weight = a.to(x.dtype)[:, None, None]  # (B, 1, 1)
                batch[key] = (1 - weight) * x + weight * other[key]
    # Responses are mixed on one scale per neuron: with `data.response_scale` each sample's official targets carry
    # the gain of its own frames, so they are divided by it, mixed, and given back the receiving sample's gain.
    flat = [r if scale is None else r / scale[i] for i, r in enumerate(responses)]  # B × (N_mouse, T)
    flat_other = [r if other_scale is None else r / other_scale[i] for i, r in enumerate(other_responses)]
    out = [
        flat[i] if fraction[i] == 0 else (1 - float(fraction[i])) * flat[i] + float(fraction[i]) * flat_other[i]
        for i in range(b)
    ]
    out = out if scale is None else [r * scale[i] for i, r in enumerate(out)]
    batch["responses"] = torch.stack(out) if isinstance(batch["responses"], torch.Tensor) else out
    batch["cutmix_partner"] = torch.from_numpy(np.where((fraction > 0) & (fresh_window is None), src, -1))
    batch["cutmix_fraction"] = torch.from_numpy(fraction)
    batch["cutmix_box"] = torch.from_numpy(boxes)
    if fresh_window is not None:
        batch["cutmix_partner_trial"] = torch.from_numpy(partner_trial)
    return batch


class CutMix(Callback):
    """CutMix training batches on their device (``on_train_batch_start``); validation and test batches are untouched.

    Args:
        alpha: ``Beta(alpha, alpha)`` parameter of the box's target area fraction (1: uniform).
        prob: probability that a sample is mixed with a partner.
        mix_behavior: also mix behaviour and pupil centre by the pasted area fraction (else keep the sample's own).
        seed: seed of the draws; default the global seed (``seed_everything``, ``PL_GLOBAL_SEED``) or 0.
        partner: ``batch``: another sample of the batch of the same mouse (a mouse's only sample is never mixed);
            ``fresh_window``: a new random training window of the same mouse, read through the trainer's
            :class:`~lightning_sensorium.data.datamodule.SensoriumDataModule`, so every sample can be mixed
            (DwiseNeuro's ``TrainMouseVideoDataset``).
        canvas: ``(height, width)`` of the canvas the box is drawn on, the frame centred in it: the model's padded
            input (DwiseNeuro's 64 × 64, ``model.core.init_args.pad_to``); the targets are mixed by the box's share
            of it. None: the frame.
        clamp_responses_min: clamp the responses from below before mixing (DwiseNeuro: 0, its ReLU of the raw
            targets); None: as given.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        prob: float = 0.5,
        mix_behavior: bool = True,
        seed: int | None = None,
        partner: Literal["batch", "fresh_window"] = "batch",
        canvas: tuple[int, int] | None = None,
        clamp_responses_min: float | None = None,
    ):
        if alpha <= 0:
            raise ValueError(f"CutMix: alpha must be > 0, got {alpha}")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"CutMix: prob must be in [0, 1], got {prob}")
        if canvas is not None and (len(canvas) != 2 or min(canvas) < 1):
            raise ValueError(f"CutMix: canvas must be (height, width) of positive sizes or null, got {canvas}")
        self.alpha, self.prob, self.mix_behavior, self.seed = alpha, prob, mix_behavior, seed
        self.partner = partner
        self.canvas = None if canvas is None else (int(canvas[0]), int(canvas[1]))
        self.clamp_responses_min = clamp_responses_min

    def _seed(self) -> int:
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def generator(self, global_step: int, batch_idx: int, rank: int) -> np.random.Generator:
        """The generator for one batch: ``(global_step, batch_idx)`` is unique per batch even under accumulation."""
        return np.random.default_rng([self._seed(), global_step, batch_idx, rank])

    def window_source(self, trainer: L.Trainer) -> WindowSource | None:
        """Where fresh partners come from: the trainer's data module (``partner: fresh_window``), else None."""
        if self.partner == "batch":
            return None
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, SensoriumDataModule):
            raise TypeError(
                f"CutMix(partner='fresh_window') reads partner windows through the trainer's SensoriumDataModule; "
                f"the trainer has {type(dm).__name__}"
            )
        return dm.training_window

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.prob == 0:
            return
        rng = self.generator(trainer.global_step, batch_idx, trainer.global_rank)
        cutmix_batch(
            batch,
            rng,
            self.alpha,
            self.prob,
            self.mix_behavior,
            canvas=self.canvas,
            fresh_window=self.window_source(trainer),
            clamp_responses_min=self.clamp_responses_min,
        )
