"""Whole-trial predictions ``(B, N, T)`` from a model that predicts the last frames of its input.

A *batch model* (a :class:`~lightning_sensorium.module.SensoriumModule`, or any callable on a batch) maps
``video (B, C, T, H, W)``, ``behavior`` and ``pupil_center`` ``(B, 2, T)`` to responses ``(B, N, T')`` of the last
``T'`` input frames. :class:`WholeTrialPredictor` turns it into a prediction for every frame of whole trials, under
an inference policy: one pass, one pass per frame phase (:func:`predict_phases`), sliding windows averaged where
they overlap (:func:`predict_windows`, as https://github.com/lRomul/sensorium/blob/main/src/predictors.py) or
windows tiled so each frame is predicted once (:func:`predict_tiles`, as Dynamic-V1FM's submission). Frames that no
pass predicts (the core's temporal receptive field, the frames before a tiling starts) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

#: ``batch -> (B, N, T')``: responses of the last ``T'`` frames of the batch's inputs.
BatchModel = Callable[[Mapping[str, Any]], Tensor]

#: Batch keys the model reads; time is dimension 2 of each.
MODEL_INPUTS = ("video", "behavior", "pupil_center")


def check_inference_policy(
    eval_window: int | None,
    eval_stride: int,
    eval_window_batch: int,
    frame_step: int,
    eval_tile_from: int | None = None,
) -> None:
    """Raise ValueError unless the policy predicts every frame a model can (see :class:`WholeTrialPredictor`)."""
    if eval_window is not None and eval_window < 1:
        raise ValueError(f"eval_window must be ≥ 1 or null, got {eval_window}")
    if eval_tile_from is not None:
        if eval_window is None or frame_step != 1:
            raise ValueError(
                f"eval_tile_from={eval_tile_from} tiles sliding windows of every frame: it needs an eval_window "
                f"(got {eval_window}) and frame_step 1 (got {frame_step})"
            )
        if not 1 <= eval_stride <= eval_window or eval_tile_from < eval_window - eval_stride:
            raise ValueError(
                f"eval_tile_from={eval_tile_from}, eval_window={eval_window}, eval_stride={eval_stride}: tiles of "
                f"eval_stride frames need 1 ≤ eval_stride ≤ eval_window and eval_tile_from ≥ eval_window − "
                f"eval_stride (the first window must start at frame 0 or later)"
            )
    if eval_stride < 1 or eval_window_batch < 1 or frame_step < 1:
        raise ValueError(
            f"eval_stride={eval_stride}, eval_window_batch={eval_window_batch} and frame_step={frame_step} must be ≥ 1"
        )
    if frame_step > 1 and eval_window is not None and math.gcd(eval_stride, frame_step) != 1:
        raise ValueError(
            f"eval_stride={eval_stride} and frame_step={frame_step} share a factor: windows ending every "
            f"{eval_stride} frames would never predict some frames; use an eval_stride coprime to it"
        )


class WholeTrialPredictor:
    """Predicts every frame of whole trials ``(B, N, T)`` with ``model``.

    Trials shorter than the batch (``length``; zero-padded by the loader) are predicted in groups of equal length,
    cut to it: a non-causal core (ViViT, DwiseNeuro, Swin) would otherwise see the padding, and the last sliding
    window must end at each trial's own last frame. A batch with a ``response_scale`` ``(B, N, T)``
    (``data.response_scale``) has its predictions multiplied by it, frame by frame: the model predicts a scale that
    is constant in time, the official targets' scale is not.

    Args:
        model: the batch model.
        eval_window: predict by sliding windows of this many model frames (DwiseNeuro 16, Dynamic-V1FM 30);
            overlapping predictions are averaged. None: the whole trial in one pass (with a ``frame_step`` k > 1,
            one pass per phase: frames p, p + k, p + 2k, ... for p < k).
        eval_stride: raw frames between the ends of consecutive windows (DwiseNeuro 1, Dynamic-V1FM 15).
        eval_window_batch: at most this many windows go through the model at once (memory bound).
        frame_step: the model sees every ``frame_step``-th frame.
        eval_tile_from: tile instead of averaging (:func:`predict_tiles`, Dynamic-V1FM's submission: 50): each
            window keeps its last ``eval_stride`` outputs, the kept frames tile the trial from this frame on, and a
            last window ending at the trial's last frame keeps the frames not yet predicted; each frame from this one
            on is predicted exactly once, earlier ones are NaN. None: overlapping windows averaged.
    """

    def __init__(
        self,
        model: BatchModel,
        eval_window: int | None = None,
        eval_stride: int = 1,
        eval_window_batch: int = 64,
        frame_step: int = 1,
        eval_tile_from: int | None = None,
    ) -> None:
        check_inference_policy(eval_window, eval_stride, eval_window_batch, frame_step, eval_tile_from)
        self.model = model
        self.eval_window, self.eval_stride, self.eval_window_batch = eval_window, eval_stride, eval_window_batch
        self.frame_step = frame_step
        self.eval_tile_from = eval_tile_from

    def __call__(self, batch: Mapping[str, Any]) -> Tensor:
        scale = batch.get("response_scale")
        pred = predict_by_length(self._predict_filled, batch)  # (B, N, T)
        return pred if scale is None else pred * scale.to(pred.dtype)

    def _predict_filled(self, batch: Mapping[str, Any]) -> Tensor:
        """Predictions ``(B, N, T)`` of trials that fill the batch's ``T`` frames, before the response scale."""
        if self.eval_window is not None and self.eval_tile_from is not None:
            return predict_tiles(
                self.model, batch, self.eval_window, self.eval_stride, self.eval_tile_from, self.eval_window_batch
            )
        if self.eval_window is not None:
            return predict_windows(
                self.model, batch, self.eval_window, self.eval_stride, self.frame_step, self.eval_window_batch
            )
        if self.frame_step > 1:
            return predict_phases(self.model, batch, self.frame_step)
        return predict_one_pass(self.model, batch)


def select_frames(batch: Mapping[str, Any], frames: slice, rows: Tensor | None = None) -> dict[str, Any]:
    """The model inputs of ``batch`` at ``frames`` (time is dimension 2 of each), for the trials ``rows``
    (default: all)."""
    sub: dict[str, Any] = {"mouse_id": batch["mouse_id"]}
    for key in MODEL_INPUTS:
        if batch.get(key) is not None:
            x = batch[key] if rows is None else batch[key][rows]
            sub[key] = x[:, :, frames]
    return sub


def predict_by_length(predict: BatchModel, batch: Mapping[str, Any]) -> Tensor:
    """``predict`` (trials that fill the batch → ``(B, N, T)``) applied to each group of trials of equal
    ``length``, cut to it; NaN past each trial's length."""
    t = batch["video"].shape[2]
    if batch.get("length") is None:
        return predict(batch)
    lengths = torch.as_tensor(batch["length"], device=batch["video"].device)
    if bool((lengths >= t).all()):
        return predict(batch)
    out: Tensor | None = None
    for length in torch.unique(lengths).tolist():
        rows = (lengths == length).nonzero().squeeze(1)  # (B_g,) trials of this length
        pred = predict(select_frames(batch, slice(length), rows))  # (B_g, N, L)
        if out is None:
            out = pred.new_full((len(lengths), pred.shape[1], t), float("nan"))
        out[rows, :, :length] = pred
    assert out is not None
    return out  # (B, N, T)


def predict_one_pass(model: BatchModel, batch: Mapping[str, Any]) -> Tensor:
    """The whole trial in one pass: ``model``'s ``(B, N, T')`` placed on the last ``T'`` of ``T`` frames."""
    pred = model(batch)  # (B, N, T')
    t = batch["video"].shape[2]
    lost = t - pred.shape[-1]
    if lost <= 0:
        return pred[..., -t:]
    return torch.nn.functional.pad(pred, (lost, 0), value=float("nan"))  # (B, N, T)


def predict_phases(model: BatchModel, batch: Mapping[str, Any], frame_step: int) -> Tensor:
    """Whole trials at a frame step k without a window: one pass over each phase's frames p, p + k, ...

    A model trained on every k-th frame predicts each frame from the frames it saw in training, the last being its
    own; together the k passes cost one pass at the full frame rate."""
    video = batch["video"]
    b, _, t = video.shape[:3]
    out: Tensor | None = None
    for phase in range(min(frame_step, t)):
        sub = select_frames(batch, slice(phase, None, frame_step))  # (B, ..., T_p): the phase's frames
        pred = model(sub)  # (B, N, T') for the last T' of the phase's T_p frames
        if out is None:
            out = pred.new_full((b, pred.shape[1], t), float("nan"))
        t_p = sub["video"].shape[2]
        kept = min(pred.shape[-1], t_p)
        frames = phase + frame_step * torch.arange(t_p - kept, t_p, device=video.device)  # raw frame of each
        out[..., frames] = pred[..., -kept:]
    assert out is not None
    return out  # (B, N, T)


def _window_batch(batch: Mapping[str, Any], video: Tensor, idx: Tensor) -> dict[str, Any]:
    """The model inputs of every window ``idx`` ``(W, L)`` (raw frames) of every trial of ``batch``, one sample each."""
    b, (w, length) = video.shape[0], idx.shape
    windows: dict[str, Any] = {"mouse_id": batch["mouse_id"]}
    # (B, C, W, L, ...) → (B·W, C, L, ...): every window of every trial is one sample.
    clip = video[:, :, idx]  # (B, C, W, L, H, W_px)
    windows["video"] = clip.transpose(1, 2).reshape(b * w, clip.shape[1], length, *clip.shape[4:])
    for key in ("behavior", "pupil_center"):
        if batch.get(key) is not None:
            sig = batch[key][:, :, idx]  # (B, 2, W, L)
            windows[key] = sig.transpose(1, 2).reshape(b * w, sig.shape[1], length)  # (B·W, 2, L)
    return windows


def predict_windows(
    model: BatchModel,
    batch: Mapping[str, Any],
    window: int,
    stride: int = 1,
    frame_step: int = 1,
    window_batch: int = 64,
) -> Tensor:
    """Sliding-window prediction (DwiseNeuro's ``src/predictors.py``, Dynamic-V1FM's test-time tiling).

    A window takes ``window`` frames, every ``frame_step``-th, and ends at raw frame ``e``; its outputs belong to
    its last ``T'`` sampled frames. Window ends run every ``stride`` frames from the first complete window, plus
    windows that start at the first and end at the last frames of each of the ``frame_step`` phases (for
    ``frame_step`` 1: one ending at the last frame); each frame's prediction is the mean over the windows that
    predict it. At most ``window_batch`` windows go through the model at once.
    """
    video = batch["video"]
    b, _, t = video.shape[:3]
    span = (window - 1) * frame_step + 1  # raw frames one window covers
    if t < span:
        raise ValueError(
            f"a trial of {t} frames is shorter than one prediction window of {span} frames "
            f"(eval_window={window}, frame_step={frame_step})"
        )
    # Every stride frames from the first complete window, plus, for each of the frame_step phases, one window
    # starting at the first frames and one ending at the last (a single last window at frame_step 2 would leave the
    # other phase's last frames unpredicted whenever the stride skips them).
    k = frame_step
    ends = sorted(
        set(range(span - 1, t, stride))
        | {e for e in range(span - 1, span - 1 + k) if e < t}
        | {e for e in range(t - k, t) if e >= span - 1}
    )
    offsets = torch.arange(window, device=video.device) * frame_step - (span - 1)  # (L,)
    total: Tensor | None = None
    count = torch.zeros(t, device=video.device)
    per_pass = max(1, window_batch // b)
    for i in range(0, len(ends), per_pass):
        chunk = torch.tensor(ends[i : i + per_pass], device=video.device)
        idx = chunk[:, None] + offsets[None, :]  # (W, L) raw frame of each window frame
        w = idx.shape[0]
        pred = model(_window_batch(batch, video, idx))  # (B·W, N, L')
        n, l_out = pred.shape[1], pred.shape[2]
        pred = pred.reshape(b, w, n, l_out).permute(0, 2, 1, 3).reshape(b, n, w * l_out)  # (B, N, W·L')
        frames = idx[:, -l_out:].reshape(-1)  # (W·L',) raw frame of each output
        if total is None:
            total = pred.new_zeros(b, n, t)
        total.index_add_(2, frames, pred)
        count.index_add_(0, frames, torch.ones_like(frames, dtype=count.dtype))
    assert total is not None
    out = total / count.clamp(min=1).to(total.dtype)
    return out.masked_fill(count == 0, float("nan"))  # (B, N, T)


def tile_windows(t: int, window: int, stride: int, first: int) -> list[tuple[int, int]]:
    """The windows of :func:`predict_tiles` on a trial of ``t`` frames: ``(end, kept)`` per window, which covers
    frames ``end − window + 1 … end`` and keeps its predictions of the last ``kept`` of them.

    Tiles of ``stride`` frames from frame ``first`` on, each predicted by the window that ends at its last frame,
    then one window ending at the last frame keeping what no tile covered. On a 299-frame trial with window 30,
    stride 15, first 50 these are Dynamic-V1FM's windows: starts 35, 50, …, 260 (frames 50–289), and 269–298 keeping
    290–298 (``submission_func/single_model_mainTrack.py``; its second window of frames 260–289 is computed there
    and never used)."""
    if t < window:
        raise ValueError(f"a trial of {t} frames is shorter than one prediction window of {window} frames")
    ends = list(range(first + stride - 1, t, stride))
    covered = ends[-1] if ends else first - 1  # last frame a tile predicts
    windows = [(e, stride) for e in ends]
    if covered < t - 1:
        windows.append((t - 1, t - 1 - covered))
    if not windows:
        raise ValueError(f"a trial of {t} frames has no frame from eval_tile_from={first} on to predict")
    return windows


def predict_tiles(
    model: BatchModel,
    batch: Mapping[str, Any],
    window: int,
    stride: int,
    first: int,
    window_batch: int = 64,
) -> Tensor:
    """Dynamic-V1FM's test-time tiling: every frame from ``first`` on predicted by exactly one window.

    Windows of ``window`` frames (:func:`tile_windows`) each keep their last ``stride`` outputs (the last window
    fewer), so the kept predictions tile the trial without overlap or averaging, as
    https://github.com/zhuyu-cs/Dynamic-VFM/blob/main/submission_func/single_model_mainTrack.py does (windows from
    frame 35 every 15 frames, the last 15 of each 30-frame window's outputs kept). Frames before ``first`` are NaN.
    At most ``window_batch`` windows go through the model at once.
    """
    video = batch["video"]
    b, _, t = video.shape[:3]
    windows = tile_windows(t, window, stride, first)
    offsets = torch.arange(window, device=video.device) - (window - 1)  # (L,)
    out: Tensor | None = None
    per_pass = max(1, window_batch // b)
    for i in range(0, len(windows), per_pass):
        chunk = windows[i : i + per_pass]
        ends = torch.tensor([e for e, _ in chunk], device=video.device)
        kept = torch.tensor([k for _, k in chunk], device=video.device)  # (W,)
        idx = ends[:, None] + offsets[None, :]  # (W, L) raw frame of each window frame
        w = idx.shape[0]
        pred = model(_window_batch(batch, video, idx))  # (B·W, N, L')
        n, l_out = pred.shape[1], pred.shape[2]
        if l_out < stride:
            raise ValueError(
                f"the model predicts the last {l_out} frames of a {window}-frame window: tiles of eval_stride={stride} "
                f"frames need at least {stride}"
            )
        pred = pred.reshape(b, w, n, l_out).permute(0, 2, 1, 3)  # (B, N, W, L')
        keep = torch.arange(l_out, device=video.device)[None, :] >= l_out - kept[:, None]  # (W, L') the kept outputs
        frames = idx[:, -l_out:][keep]  # (K,) raw frame of each kept output
        if out is None:
            out = pred.new_full((b, n, t), float("nan"))
        out[:, :, frames] = pred[:, :, keep]  # (B, N, K)
    assert out is not None
    return out  # (B, N, T)


def mean_where_predicted(predictions: Iterable[Tensor]) -> Tensor:
    """Frame by frame, the mean of the finite ``(B, N, T)`` predictions (an ensemble's members, one at a time);
    NaN only where none is finite."""
    total: Tensor | None = None
    count: Tensor | None = None
    for pred in predictions:
        pred = pred.float()  # (B, N, T)
        ok = torch.isfinite(pred)
        value = torch.where(ok, pred, 0.0)
        total = value if total is None else total + value
        count = ok.float() if count is None else count + ok.float()
    if total is None or count is None:
        raise ValueError("no predictions to average")
    return torch.where(count > 0, total / count.clamp_min(1), float("nan"))


def prediction_record(batch: Mapping[str, Any], predict: BatchModel) -> dict[str, Any] | None:
    """What ``predict_step`` returns for a batch of whole trials (the prediction writers' input): its ``mouse_id``,
    ``tier``, ``trial``, ``length`` and ``prediction`` ``(B, N, T)``; None for a DDP rank's padding batch."""
    if batch.get("padding"):  # a DDP rank's stand-in batch (datamodule.PaddedEvalSampler): nothing to write
        return None
    return {
        "mouse_id": batch["mouse_id"],
        "tier": batch.get("tier"),
        "trial": batch["trial"],
        "length": batch["length"],
        "prediction": predict(batch),
    }
