"""The competition's metrics as torchmetrics, exact under DDP (sufficient statistics summed across ranks).

* :class:`SingleTrialCorrelation` — the main metric: per neuron, Pearson correlation over every scored frame
  (``skip_frames ≤ t < length``) of every trial pooled, ε = 1e-8 on the stds, NaN → 0
  (https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/utility/scores.py).
* :class:`RepeatMetrics` — everything that needs repeats of a clip, from per-(clip, frame, neuron) sums:
  the "correlation to average" (repeat-averaged responses vs repeat-averaged predictions, pooled over clips and
  frames), the leave-one-out oracle correlation (each trial vs the mean of the other repeats, in closed form),
  and FEVE / FEV as the 2022 evaluation defines them
  (https://github.com/sinzlab/sensorium/blob/main/sensorium/utility/metrics.py), a "sample" being a scored
  (clip, frame).
* :func:`pooled_mean` — the official score: the mean over all neurons of all mice (neuron-weighted).

Inputs: ``preds`` and ``target`` ``(B, N, T)``, ``lengths (B,)`` valid frames per trial, ``clip_index (B,)``
dense clip numbers ``0 … num_clips - 1``. Frames at or beyond a trial's length are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sensorium.data.layout import MAX_FRAMES, SKIP_FRAMES


def _frame_mask(lengths: Tensor | None, batch: int, frames: int, skip: int, device: torch.device) -> Tensor:
    """``(B, T)`` True on scored frames ``skip ≤ t < length``."""
    t = torch.arange(frames, device=device)[None]  # (1, T)
    mask = (t >= skip).expand(batch, frames)
    if lengths is not None:
        mask = mask & (t < lengths.to(device)[:, None])
    return mask


def _pearson(sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor, sxy: Tensor, n: Tensor, eps: float) -> Tensor:
    """Per-neuron population Pearson correlation from float64 sums; NaN → 0."""
    n = n.clamp_min(1)
    mx, my = sx / n, sy / n
    vx = (sxx / n - mx * mx).clamp_min(0)
    vy = (syy / n - my * my).clamp_min(0)
    cov = sxy / n - mx * my
    corr = cov / ((vx.sqrt() + eps) * (vy.sqrt() + eps))
    return torch.nan_to_num(corr, nan=0.0).float()


class _PinnedStates(Metric):
    """Keeps every state in its declared dtype, even under ``precision="bf16-true"`` (ecosystem.md §3)."""

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        dtypes = {name: default.dtype for name, default in self._defaults.items()}
        this = super()._apply(fn, *args, **kwargs)
        for name, dtype in dtypes.items():
            setattr(this, name, getattr(this, name).to(dtype))
            this._defaults[name] = this._defaults[name].to(dtype)
        return this


class SingleTrialCorrelation(_PinnedStates):
    """Per-neuron correlation over all scored frames of all trials pooled. ``compute()`` → ``(N,)``.

    Each batch is centred in float32 before its moments are added to float64 states, so large offsets and
    silent or single-spike neurons stay exact (a constant neuron scores 0, not NaN).

    Args:
        num_neurons: neurons of the mouse.
        skip_frames: leading frames of every trial that are not scored (official: 50).
        eps: added to each std (official: 1e-8).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    sx: Tensor
    sy: Tensor
    sxx: Tensor
    syy: Tensor
    sxy: Tensor
    n: Tensor

    def __init__(self, num_neurons: int, skip_frames: int = SKIP_FRAMES, eps: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_frames, self.eps = skip_frames, eps
        for name in ("sx", "sy", "sxx", "syy", "sxy"):
            self.add_state(name, torch.zeros(num_neurons, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, lengths: Tensor | None = None) -> None:
        b, n_neurons, t = target.shape
        mask = _frame_mask(lengths, b, t, self.skip_frames, target.device)  # (B, T)
        x = preds.detach().transpose(1, 2)[mask].float()  # (M, N) scored frames
        y = target.detach().transpose(1, 2)[mask].float()
        m = x.shape[0]
        if m == 0:
            return
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my  # centred in float32, accumulated in float64
        mx64, my64 = mx.double(), my.double()
        self.sx += m * mx64
        self.sy += m * my64
        self.sxx += (xc * xc).sum(0).double() + m * mx64 * mx64
        self.syy += (yc * yc).sum(0).double() + m * my64 * my64
        self.sxy += (xc * yc).sum(0).double() + m * mx64 * my64
        self.n += m

    def compute(self) -> Tensor:
        return _pearson(self.sx, self.sy, self.sxx, self.syy, self.sxy, self.n, self.eps)


class RepeatMetrics(_PinnedStates):
    """Repeat-based metrics of one mouse and tier. ``compute()`` → dict of ``(N,)`` tensors:

    ``repeat_averaged_corr`` (correlation to average), ``oracle_corr`` (leave-one-out), ``feve``, ``fev`` and
    ``fev_mask`` (1 where FEV ≥ ``fev_threshold``; the 2022 code averages FEVE over those neurons only).

    States are per (clip, frame, neuron) sums in float32 (a handful of repeats each), reduced in float64:
    5 · num_clips · max_frames · N · 4 bytes, e.g. 6 clips × 300 frames × 8,000 neurons → 288 MB.

    Args:
        num_neurons: neurons of the mouse.
        num_clips: distinct clips of the tier (``clip_index`` runs over ``0 … num_clips - 1``).
        max_frames: longest scored trial (official cap: 300).
        skip_frames: leading frames not scored.
        eps: added to each std.
        fev_threshold: FEV below which a neuron is left out of the FEVE mean.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True
    sum_y: Tensor
    sum_yy: Tensor
    sum_p: Tensor
    sum_se: Tensor
    count: Tensor

    def __init__(
        self,
        num_neurons: int,
        num_clips: int,
        max_frames: int = MAX_FRAMES,
        skip_frames: int = SKIP_FRAMES,
        eps: float = 1e-8,
        fev_threshold: float = 0.15,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_frames, self.skip_frames, self.eps, self.fev_threshold = max_frames, skip_frames, eps, fev_threshold
        shape = (num_clips, max_frames, num_neurons)
        for name in ("sum_y", "sum_yy", "sum_p", "sum_se"):
            self.add_state(name, torch.zeros(shape, dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_clips, max_frames, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, clip_index: Tensor, lengths: Tensor | None = None) -> None:
        b, _, t = target.shape
        t = min(t, self.max_frames)
        mask = _frame_mask(lengths, b, t, self.skip_frames, target.device).float()  # (B, T)
        y = target.detach()[..., :t].transpose(1, 2).float() * mask[..., None]  # (B, T, N)
        p = preds.detach()[..., :t].transpose(1, 2).float() * mask[..., None]
        idx = clip_index.to(target.device).long()
        self.sum_y[:, :t].index_add_(0, idx, y)
        self.sum_yy[:, :t].index_add_(0, idx, y * y)
        self.sum_p[:, :t].index_add_(0, idx, p)
        self.sum_se[:, :t].index_add_(0, idx, (y - p) ** 2)
        self.count[:, :t].index_add_(0, idx, mask.double())

    def compute(self) -> dict[str, Tensor]:
        n = self.count[..., None]  # (V, T, 1)
        s, q = self.sum_y.double(), self.sum_yy.double()
        seen = (self.count > 0).flatten()  # scored (clip, frame) samples
        flat = n.shape[0] * n.shape[1]

        def pooled(values: Tensor, rows: Tensor) -> Tensor:  # (V, T, N) → (rows, N)
            return values.reshape(flat, -1)[rows]

        # Correlation to average: repeat means of targets and predictions, pooled over (clip, frame).
        my = pooled(s / n.clamp_min(1), seen)
        mp = pooled(self.sum_p.double() / n.clamp_min(1), seen)
        ones = torch.tensor(float(my.shape[0]), dtype=torch.float64, device=my.device)
        repeat_corr = _pearson(
            my.sum(0), mp.sum(0), (my * my).sum(0), (mp * mp).sum(0), (my * mp).sum(0), ones, self.eps
        )

        # Leave-one-out oracle over samples with ≥ 2 repeats, in closed form from S = Σy, Q = Σy², n.
        rep = (self.count >= 2).flatten()
        nn_ = pooled(n.expand_as(s), rep)
        ss, qq = pooled(s, rep), pooled(q, rep)
        total = nn_[:, :1].sum()
        loo_m = ss  # Σ_j m_{-j} = S
        loo_mm = ((nn_ - 2) * ss * ss + qq) / (nn_ - 1) ** 2  # Σ_j m_{-j}²
        loo_ym = (ss * ss - qq) / (nn_ - 1)  # Σ_j y_j m_{-j}
        oracle = _pearson(ss.sum(0), loo_m.sum(0), qq.sum(0), loo_mm.sum(0), loo_ym.sum(0), total, self.eps)

        # FEV / FEVE (2022 definitions) over the same samples.
        m_total = total.clamp_min(2)
        total_var = (qq.sum(0) - ss.sum(0) ** 2 / m_total) / (m_total - 1)
        noise_var = ((qq - ss * ss / nn_) / (nn_ - 1)).mean(0) if ss.shape[0] else torch.zeros_like(total_var)
        mse = pooled(self.sum_se.double(), rep).sum(0) / m_total
        fev = (total_var - noise_var) / total_var
        feve = 1 - (mse - noise_var) / (total_var - noise_var)
        fev, feve = torch.nan_to_num(fev, nan=0.0), torch.nan_to_num(feve, nan=0.0)
        return {
            "repeat_averaged_corr": repeat_corr,
            "oracle_corr": oracle,
            "feve": feve.float(),
            "fev": fev.float(),
            "fev_mask": (fev >= self.fev_threshold).float(),
        }


def pooled_mean(per_neuron: Mapping[str, Tensor]) -> Tensor:
    """The official score: mean over the neurons of all mice concatenated (not the mean of per-mouse means)."""
    values = [v.flatten().float().cpu() for v in per_neuron.values()]
    return torch.cat(values).mean() if values else torch.tensor(float("nan"))
