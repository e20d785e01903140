"""The competition's metrics as torchmetrics, exact under DDP (sufficient statistics summed across ranks).

Ports https://github.com/ecker-lab/sensorium_2023/blob/main/sensorium/utility/scores.py, neuralpredictors' ``corr``
and ``fev`` (https://github.com/sinzlab/neuralpredictors/blob/main/neuralpredictors/measures/np_functions.py) and
the 2022 ``feve`` (https://github.com/sinzlab/sensorium/blob/main/sensorium/utility/metrics.py). Inputs: ``preds``,
``target`` ``(B, N, T)``, ``lengths (B,)`` valid frames, ``clip_index (B,)`` dense clip numbers ``0 … num_clips - 1``;
frames at or beyond a trial's length are ignored (NaN there is fine). Definitions: docs/evaluation.md, "`evaluate`",
and docs/training.md, "Metrics and TensorBoard".
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_sensorium.data.layout import MAX_FRAMES, SKIP_FRAMES


def _scored_mask(lengths: Tensor | None, batch: int, frames: int, skip: int, device: torch.device) -> Tensor:
    """``(B, T)`` True on scored frames ``skip ≤ t < length``."""
    t = torch.arange(frames, device=device)[None]  # (1, T)
    mask = (t >= skip).expand(batch, frames)
    if lengths is not None:
        mask = mask & (t < lengths.to(device)[:, None])
    return mask


def _check_shapes(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape or target.dim() != 3:
        raise ValueError(f"preds and target must both be (B, N, T), got {tuple(preds.shape)} and {tuple(target.shape)}")


def _pearson(sx: Tensor, sy: Tensor, sxx: Tensor, syy: Tensor, sxy: Tensor, n: Tensor, eps: float) -> Tensor:
    """Per-neuron Pearson correlation (population stds + ``eps``) from float64 sums over ``n`` samples; NaN → 0."""
    n = n.clamp_min(1)
    mx, my = sx / n, sy / n
    vx = (sxx / n - mx * mx).clamp_min(0)
    vy = (syy / n - my * my).clamp_min(0)
    cov = sxy / n - mx * my
    corr = cov / ((vx.sqrt() + eps) * (vy.sqrt() + eps))
    return torch.nan_to_num(corr, nan=0.0).float()


class _PinnedStates(Metric):
    """Keeps every state in its declared dtype when the module is cast, e.g. by ``precision="bf16-true"``.

    Lightning's ``*-true`` precision plugins call ``module.to(dtype=...)``, which torchmetrics passes on to the
    states. Here a cast that would change a state's dtype only moves it (no round trip through
    bf16, so values accumulated so far are kept exactly). ``set_dtype`` is a no-op on the states for the same reason.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = "") -> Any:
        this = super()._apply(fn, exclude_state=tuple(self._defaults))  # states are handled below

        def keep_dtype(value: Tensor) -> Tensor:
            out = fn(value)
            return out if out.dtype == value.dtype else value.to(out.device)

        for name, default in this._defaults.items():
            if name in exclude_state or not isinstance(default, Tensor):
                continue
            this._defaults[name] = keep_dtype(default)
            setattr(this, name, keep_dtype(getattr(this, name)))
        return this


class _NeuronMetric(_PinnedStates):
    """Adds per-neuron min/max of targets and predictions, so a constant neuron scores exactly 0.

    From sums alone a constant neuron's variance and covariance come out as rounding residues (~1e-16 · mean²),
    which the ε-regularised correlation can turn into small non-zero scores (or FEV into noise). The official formula
    gives exactly 0 there (y − ȳ = 0); min/max reduce exactly under DDP, so the constancy test is exact too.
    """

    pred_min: Tensor
    pred_max: Tensor
    target_min: Tensor
    target_max: Tensor

    def _add_range_states(self, num_neurons: int) -> None:
        for kind in ("pred", "target"):
            self.add_state(f"{kind}_min", torch.full((num_neurons,), math.inf), dist_reduce_fx="min")
            self.add_state(f"{kind}_max", torch.full((num_neurons,), -math.inf), dist_reduce_fx="max")

    def _update_ranges(self, x: Tensor, y: Tensor, keep: Tensor | None = None) -> None:
        """``x``, ``y``: ``(..., N)`` predictions and targets; ``keep``: broadcastable mask of scored entries."""
        n = x.shape[-1]
        if keep is None:
            lo_x = hi_x = x.reshape(-1, n)
            lo_y = hi_y = y.reshape(-1, n)
        else:
            lo_x, hi_x = torch.where(keep, x, math.inf).reshape(-1, n), torch.where(keep, x, -math.inf).reshape(-1, n)
            lo_y, hi_y = torch.where(keep, y, math.inf).reshape(-1, n), torch.where(keep, y, -math.inf).reshape(-1, n)
        self.pred_min = torch.minimum(self.pred_min, lo_x.amin(0))
        self.pred_max = torch.maximum(self.pred_max, hi_x.amax(0))
        self.target_min = torch.minimum(self.target_min, lo_y.amin(0))
        self.target_max = torch.maximum(self.target_max, hi_y.amax(0))

    def _constant(self) -> tuple[Tensor, Tensor]:
        """``(N,)`` bool: predictions / targets constant over all scored frames (or none seen)."""
        return ~(self.pred_max > self.pred_min), ~(self.target_max > self.target_min)


class SingleTrialCorrelation(_NeuronMetric):
    """Per-neuron correlation over all scored frames of all trials pooled. ``compute()`` → ``(N,)`` float32.

    Each batch is shifted by its float32 mean before its moments are added to float64 states (with the exact
    correction for the rounded shift), so large offsets (+1000) and silent or single-spike neurons stay accurate;
    a neuron constant over all scored frames scores exactly 0, never NaN. States: 5 · N + 1 float64, 4 · N float32.

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
        self._add_range_states(num_neurons)

    def update(self, preds: Tensor, target: Tensor, lengths: Tensor | None = None) -> None:
        _check_shapes(preds, target)
        batch, _, t = target.shape
        mask = _scored_mask(lengths, batch, t, self.skip_frames, target.device)  # (B, T)
        x = preds.detach().transpose(1, 2)[mask].float()  # (M, N) scored frames
        y = target.detach().transpose(1, 2)[mask].float()
        m = x.shape[0]
        if m == 0:
            return
        self._update_ranges(x, y)
        a, b = x.mean(0), y.mean(0)  # float32 shifts: any value is exact below, the mean keeps x − a small
        xc, yc = x - a, y - b
        sxc, syc = xc.sum(0).double(), yc.sum(0).double()  # ≈ 0, but not exactly: a, b are rounded
        a64, b64 = a.double(), b.double()
        self.sx += m * a64 + sxc
        self.sy += m * b64 + syc
        self.sxx += (xc * xc).sum(0).double() + 2 * a64 * sxc + m * a64 * a64
        self.syy += (yc * yc).sum(0).double() + 2 * b64 * syc + m * b64 * b64
        self.sxy += (xc * yc).sum(0).double() + a64 * syc + b64 * sxc + m * a64 * b64
        self.n += m

    def compute(self) -> Tensor:
        corr = _pearson(self.sx, self.sy, self.sxx, self.syy, self.sxy, self.n, self.eps)
        const_pred, const_target = self._constant()
        return corr.masked_fill(const_pred | const_target, 0.0)


class RepeatMetrics(_NeuronMetric):
    """Repeat-based metrics of one mouse and tier, from per-(clip, frame, neuron) sums (one class: all four share them).

    A *sample* (the 2022 evaluation's "image") is a scored (clip, frame): ``skip_frames ≤ t < max_frames`` and ``t``
    below the length of at least one repeat of the clip. Repeats of different lengths are fine: every frame averages
    the repeats that reach it.

    ``compute()`` → dict:

    * ``repeat_averaged_corr`` ``(N,)``: correlation to average — per sample, targets and predictions averaged over
      repeats, then Pearson over all samples pooled. Single-repeat samples count (their "average" is the trial).
    * ``oracle_corr`` ``(N,)``: leave-one-out oracle — Pearson over every (trial, sample) between the response and
      the mean of the other repeats, in closed form from S = Σy, Q = Σy², n per sample.
    * ``fev``, ``feve`` ``(N,)``: 2022 definitions; total variance over all repeats · samples (ddof 1), noise
      variance = mean over samples of the variance across repeats (ddof 1), MSE over all repeats · samples.
    * ``fev_mask`` ``(N,)`` bool: FEV ≥ ``fev_threshold``; ``feve_mean`` ``()``: FEVE averaged over those neurons
      (the 2022 reported value; NaN if none).

    Oracle, FEV and FEVE use only samples with ≥ 2 repeats. Where they are undefined (no such sample, a constant
    neuron, no explainable variance) they are 0, not NaN; such neurons are never in ``fev_mask``.

    States, ``dist_reduce_fx="sum"``, ``(V, T', N)`` with only the ``T' = max_frames - skip_frames`` scored frames
    stored: ``sum_y``, ``sum_yy`` float64 (noise variances are differences Q − S²/n, which float32 sums lose at
    offsets of ~1000), ``sum_p``, ``sum_se`` float32 (a mean and a sum of squares: no cancellation); plus
    ``count (V, T')`` float64 and per-neuron min/max (``"min"``/``"max"``). Memory ≈ 24 · V · T' · N bytes, e.g.
    6 clips × 250 frames × 8,000 neurons → 288 MB per mouse and tier (all float32 would save a third and break at
    large offsets); ``compute()`` needs a few float64 ``(samples, N)`` temporaries of the same order.

    Args:
        num_neurons: neurons of the mouse.
        num_clips: distinct clips of the tier (``clip_index`` runs over ``0 … num_clips - 1``).
        max_frames: frames from ``max_frames`` on are not scored (official cap: 300).
        skip_frames: leading frames not scored.
        eps: added to each std in the correlations.
        fev_threshold: FEV below which a neuron is left out of ``feve_mean``.
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
        if max_frames <= skip_frames:
            raise ValueError(f"max_frames ({max_frames}) must exceed skip_frames ({skip_frames})")
        self.max_frames, self.skip_frames, self.eps, self.fev_threshold = max_frames, skip_frames, eps, fev_threshold
        shape = (num_clips, max_frames - skip_frames, num_neurons)  # (V, T', N)
        sums = {"sum_y": torch.float64, "sum_yy": torch.float64, "sum_p": torch.float32, "sum_se": torch.float32}
        for name, dtype in sums.items():
            self.add_state(name, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(shape[:2], dtype=torch.float64), dist_reduce_fx="sum")
        self._add_range_states(num_neurons)

    def update(self, preds: Tensor, target: Tensor, clip_index: Tensor, lengths: Tensor | None = None) -> None:
        _check_shapes(preds, target)
        b, _, t = target.shape
        end = min(t, self.max_frames)
        if end <= self.skip_frames:
            return
        span = slice(self.skip_frames, end)
        mask = _scored_mask(lengths, b, end, self.skip_frames, target.device)[:, span]  # (B, T')
        keep = mask[..., None]  # (B, T', 1)
        y = target.detach()[..., span].transpose(1, 2).float()  # (B, T', N)
        p = preds.detach()[..., span].transpose(1, 2).float()
        self._update_ranges(p, y, keep)
        y, p = torch.where(keep, y, 0.0), torch.where(keep, p, 0.0)  # padding may hold NaN
        y64 = y.double()
        idx = clip_index.to(target.device).long()
        stored = slice(0, end - self.skip_frames)
        self.sum_y[:, stored].index_add_(0, idx, y64)
        self.sum_yy[:, stored].index_add_(0, idx, y64 * y64)
        self.sum_p[:, stored].index_add_(0, idx, p)
        self.sum_se[:, stored].index_add_(0, idx, (y - p).square())
        self.count[:, stored].index_add_(0, idx, mask.double())

    def compute(self) -> dict[str, Tensor]:
        eps = self.eps
        # Correlation to average: repeat means per sample, then Pearson over samples.
        seen = self.count > 0  # (V, T')
        n = self.count[seen][:, None]  # (M, 1) repeats per sample
        my, mp = self.sum_y[seen] / n, self.sum_p[seen].double() / n  # (M, N)
        samples = n.new_tensor(float(n.shape[0]))
        repeat_corr = _pearson(my.sum(0), mp.sum(0), (my * my).sum(0), (mp * mp).sum(0), (my * mp).sum(0), samples, eps)

        # Samples with ≥ 2 repeats: S = Σy, Q = Σy², n over the repeats of each.
        rep = self.count >= 2
        n = self.count[rep][:, None]  # (R, 1)
        s, q = self.sum_y[rep], self.sum_yy[rep]  # (R, N)
        total = n.sum()  # trials · samples
        s_sum, q_sum = s.sum(0), q.sum(0)  # (N,)

        # Leave-one-out oracle: m_j = (S − y_j) / (n − 1); Σ_j m_j = S, Σ_j m_j² and Σ_j y_j m_j in closed form.
        loo_sq = ((n - 2) * s * s + q) / (n - 1) ** 2
        loo_cross = (s * s - q) / (n - 1)
        oracle = _pearson(s_sum, s_sum, q_sum, loo_sq.sum(0), loo_cross.sum(0), total, eps)

        # FEV / FEVE (2022): variances ddof 1; undefined values → 0.
        total_var = ((q_sum - s_sum * s_sum / total.clamp_min(1)) / (total - 1).clamp_min(1)).clamp_min(0)
        noise_var = ((q - s * s / n) / (n - 1)).clamp_min(0).sum(0) / max(n.shape[0], 1)
        mse = self.sum_se[rep].double().sum(0) / total.clamp_min(1)
        explainable = total_var - noise_var
        zero = torch.zeros_like(total_var)
        fev = torch.where(total_var > 0, explainable / total_var, zero)
        feve = torch.where(explainable > 0, 1 - (mse - noise_var) / explainable, zero)
        const_pred, const_target = self._constant()
        fev, feve = fev.masked_fill(const_target, 0.0), feve.masked_fill(const_target, 0.0)
        fev_mask = fev >= self.fev_threshold
        feve_mean = feve[fev_mask].mean() if bool(fev_mask.any()) else feve.new_tensor(math.nan)
        return {
            "repeat_averaged_corr": repeat_corr.masked_fill(const_pred | const_target, 0.0),
            "oracle_corr": oracle.masked_fill(const_target, 0.0),
            "fev": fev.float(),
            "feve": feve.float(),
            "fev_mask": fev_mask,
            "feve_mean": feve_mean.float(),
        }


def pooled_mean(per_neuron: Mapping[str, Tensor]) -> Tensor:
    """The official score: the mean over the neurons of all mice concatenated, ``{mouse_id: (N_mouse,)}`` → ``()``.

    Neuron-weighted, unlike the mean of per-mouse means (``vec.mean()`` per mouse) that lRomul and ViV1T report.
    NaN if there are no neurons.
    """
    values = [v.detach().flatten().double().cpu() for v in per_neuron.values()]
    values = [v for v in values if v.numel()]
    return torch.cat(values).mean().float() if values else torch.tensor(math.nan)


class MetricGroup(nn.Module):
    """The metrics of one group of whole trials of one mouse (a tier, or its trials of one stimulus type).

    Validation during training and ``evaluate``/``score`` keep their metrics in these groups.

    ``single`` is the single-trial correlation, ``repeat`` the :class:`RepeatMetrics`, ``ground_truth`` the
    correlation of the noiseless rates (synthetic mice) with the responses.

    Args:
        num_neurons: neurons of the mouse.
        num_clips: distinct clips of the group (``clip_index`` runs over ``0 … num_clips - 1``).
        skip_frames: leading frames of every trial that are not scored.
    """

    def __init__(self, num_neurons: int, num_clips: int, skip_frames: int = SKIP_FRAMES) -> None:
        super().__init__()
        self.single = SingleTrialCorrelation(num_neurons, skip_frames=skip_frames)
        self.repeat = RepeatMetrics(num_neurons, num_clips=num_clips, skip_frames=skip_frames)
        self.ground_truth = SingleTrialCorrelation(num_neurons, skip_frames=skip_frames)
        # 1 once updated with random windows of trials (update(repeats=False)); agreed across ranks in compute().
        self.register_buffer("windows", torch.zeros((), dtype=torch.int32), persistent=False)

    def update(
        self,
        preds: Tensor,
        target: Tensor,
        clip_index: Tensor,
        lengths: Tensor,
        rates: Tensor | None = None,
        repeats: bool = True,
    ) -> None:
        """Add whole trials: ``preds``, ``target`` and ``rates`` ``(B, N, T)``, finite on scored frames.

        ``repeats=False`` for windows cut at random places of their trials (the baselines' official validation
        windows): the repeats of a clip then show different frames, so only the single-trial and ground-truth
        correlations are kept, and :meth:`compute` leaves the repeat metrics out."""
        self.single.update(preds, target, lengths)
        if repeats:
            self.repeat.update(preds, target, clip_index, lengths)
        else:
            self.windows.fill_(1)
        if rates is not None:
            self.ground_truth.update(rates, target, lengths)

    def compute(self) -> dict[str, Tensor]:
        """``single_trial_corr`` and :meth:`RepeatMetrics.compute`'s values, plus ``ground_truth_corr`` where rates
        were added. A collective under DDP: every rank calls it, whether it updated the group or not."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
            values: dict[str, Tensor] = {"single_trial_corr": self.single.compute()}
            repeat = self.repeat.compute()
            windows = self.windows.clone()
            if dist.is_available() and dist.is_initialized():  # a rank that saw no trial of the group must agree
                dist.all_reduce(windows, op=dist.ReduceOp.MAX)
            if not bool(windows):
                values.update(repeat)
            ground_truth = self.ground_truth.compute()
        if bool(self.ground_truth.n > 0):
            values["ground_truth_corr"] = ground_truth
        return values

    def reset(self) -> None:
        for metric in (self.single, self.repeat, self.ground_truth):
            metric.reset()
        self.windows.zero_()


def summarise(per_tier: Mapping[str, Mapping[str, Mapping[str, Tensor]]]) -> dict[str, Any]:
    """``{tier: {mouse: MetricGroup.compute()}}`` → per tier: ``pooled`` (the official neuron-weighted means),
    ``per_mouse`` means and ``per_mouse_vectors`` (the per-neuron single-trial correlations, for figures).

    FEVE averages only neurons with FEV ≥ 0.15 (the 2022 definition); ``fraction_of_ground_truth`` is the pooled
    single-trial correlation over the pooled ground-truth correlation, where that is positive."""
    out: dict[str, Any] = {}
    for tier, per_mouse in per_tier.items():
        res: dict[str, Any] = {"per_mouse": {}, "pooled": {}, "per_mouse_vectors": {}}
        names = sorted({n for v in per_mouse.values() for n, t in v.items() if t.dim() == 1 and n != "fev_mask"})
        for name in names:
            vecs = {m: v[name].float() for m, v in per_mouse.items() if name in v}
            if name == "feve":
                vecs = {m: v[name][v["fev_mask"].bool()].float() for m, v in per_mouse.items() if name in v}
            res["pooled"][name] = float(pooled_mean(vecs)) if any(v.numel() for v in vecs.values()) else math.nan
            for m, vec in vecs.items():
                res["per_mouse"].setdefault(m, {})[name] = float(vec.mean()) if vec.numel() else math.nan
        for m, values in per_mouse.items():
            res["per_mouse_vectors"][m] = {"single_trial_corr_per_neuron": values["single_trial_corr"].cpu().numpy()}
        if "ground_truth_corr" in res["pooled"] and res["pooled"]["ground_truth_corr"] > 0:
            res["pooled"]["fraction_of_ground_truth"] = (
                res["pooled"]["single_trial_corr"] / res["pooled"]["ground_truth_corr"]
            )
        out[tier] = res
    return out
