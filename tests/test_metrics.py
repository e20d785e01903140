"""Metrics against plain NumPy references: pooling, masking, stability, repeats, dtype pinning, DDP exactness."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sensorium.metrics import MetricGroup, RepeatMetrics, SingleTrialCorrelation, pooled_mean, summarise

SKIP = 50
MAX_FRAMES = 120


# ------------------------------------------------------------------------------------------ NumPy references
def ref_corr(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """The official ``corr`` on (samples, N), float64, NaN → 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        xz = (x - x.mean(0)) / (x.std(0) + eps)
        yz = (y - y.mean(0)) / (y.std(0) + eps)
        return np.nan_to_num((xz * yz).mean(0))


def scored_frames(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, N, T) → (Σ scored frames, N): the trials' frames skip ≤ t < length concatenated."""
    return np.concatenate([a[b, :, SKIP : lengths[b]].T for b in range(len(a))])


def ref_repeat(preds: np.ndarray, target: np.ndarray, lengths: np.ndarray, clips: np.ndarray) -> dict[str, np.ndarray]:
    """Correlation to average, leave-one-out oracle, FEV and FEVE by explicit grouping (loops, float64)."""
    avg_y, avg_p, loo_y, loo_m, groups_y, groups_p = [], [], [], [], [], []
    for c in np.unique(clips):
        members = np.flatnonzero(clips == c)
        for t in range(SKIP, min(lengths[members].max(), MAX_FRAMES)):
            rows = [b for b in members if t < lengths[b]]
            y, p = target[rows, :, t], preds[rows, :, t]  # (repeats, N)
            avg_y.append(y.mean(0))
            avg_p.append(p.mean(0))
            if len(rows) >= 2:
                loo_y.append(y)
                loo_m.append((y.sum(0) - y) / (len(rows) - 1))  # mean of the other repeats
                groups_y.append(y)
                groups_p.append(p)
    # neuralpredictors `fev`, with a sample = (clip, frame) in the role of an image
    total_var = np.var(np.vstack(groups_y), axis=0, ddof=1)
    noise_var = np.mean([np.var(g, axis=0, ddof=1) for g in groups_y], axis=0)
    mse = np.mean(np.vstack([(g - p) ** 2 for g, p in zip(groups_y, groups_p, strict=True)]), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fev = (total_var - noise_var) / total_var
        feve = 1 - (mse - noise_var) / (total_var - noise_var)
    return {
        "repeat_averaged_corr": ref_corr(np.array(avg_y), np.array(avg_p)),
        "oracle_corr": ref_corr(np.vstack(loo_y), np.vstack(loo_m)),
        "fev": fev,
        "feve": feve,
    }


# ------------------------------------------------------------------------------------------ data
def single_data(seed: int = 0, b: int = 9, n: int = 8, t: int = 120) -> tuple[np.ndarray, ...]:
    """Trials of varying length with NaN padding, a constant, a single-spike and an offset neuron (float32 values)."""
    rng = np.random.default_rng(seed)
    target = rng.gamma(0.5, 2.0, size=(b, n, t))
    preds = 0.5 * target + rng.normal(0, 1, size=(b, n, t))
    lengths = rng.integers(70, t + 1, size=b)
    target[:, 0] = 3.0  # constant neuron
    target[:, 1] = 0.0
    target[4, 1, 80] = 5.0  # silent but for one spike
    target[:, 2] += 1000.0  # large offsets
    preds[:, 3] += 1000.0
    for i, length in enumerate(lengths):
        target[i, :, length:] = np.nan  # padding must be ignored
        preds[i, :, length:] = np.nan
    return preds.astype(np.float32), target.astype(np.float32), lengths


def repeat_data(seed: int = 1, n: int = 6, t: int = 110) -> tuple[np.ndarray, ...]:
    """Clips with 3, 2, 4 and 1 repeats; repeats of a clip differ in length; one constant and one offset neuron."""
    rng = np.random.default_rng(seed)
    clips = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    lengths = np.array([110, 110, 95, 100, 80, 90, 90, 90, 70, 105])  # clip 1: frames 80..99 have one repeat
    signal = rng.gamma(1.0, 1.0, size=(4, n, t))
    target = signal[clips] + rng.normal(0, 0.5, size=(10, n, t))
    preds = signal[clips] * 0.8 + rng.normal(0, 0.3, size=(10, n, t))
    target[:, 0] = 2.0  # constant neuron
    target[:, 1] += 1000.0  # offset neuron
    preds[:, 1] += 1000.0
    for i, length in enumerate(lengths):
        target[i, :, length:] = np.nan
        preds[i, :, length:] = np.nan
    return preds.astype(np.float32), target.astype(np.float32), lengths, clips


def _t(*arrays: np.ndarray) -> list[torch.Tensor]:
    return [torch.from_numpy(a) for a in arrays]


def _single(preds: np.ndarray, target: np.ndarray, lengths: np.ndarray, split: list[int]) -> SingleTrialCorrelation:
    metric = SingleTrialCorrelation(target.shape[1], skip_frames=SKIP)
    start = 0
    for size in split:
        sl = slice(start, start + size)
        metric.update(*_t(preds[sl], target[sl], lengths[sl]))
        start += size
    return metric


def _repeat(preds: np.ndarray, target: np.ndarray, lengths: np.ndarray, clips: np.ndarray, rows: list[list[int]]):
    metric = RepeatMetrics(target.shape[1], num_clips=4, max_frames=MAX_FRAMES, skip_frames=SKIP)
    for r in rows:
        metric.update(*_t(preds[r], target[r], clips[r], lengths[r]))
    return metric


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("split", [[9], [1] * 9, [4, 2, 3]])
def test_single_trial_matches_numpy_however_batched(split: list[int]) -> None:
    preds, target, lengths = single_data()
    ref = ref_corr(scored_frames(preds, lengths).astype(np.float64), scored_frames(target, lengths).astype(np.float64))
    got = _single(preds, target, lengths, split).compute().numpy()
    assert np.isfinite(got).all()
    assert got[0] == 0.0  # constant neuron → 0, not NaN
    assert abs(got[1]) > 1e-3  # the single spike still correlates
    np.testing.assert_allclose(got, ref, atol=2e-6)  # includes the +1000 offsets on neurons 2 and 3


def test_single_trial_without_lengths_scores_all_frames_after_skip() -> None:
    preds, target, _ = single_data()
    full = np.full(len(target), target.shape[-1])
    preds, target = np.nan_to_num(preds), np.nan_to_num(target)
    metric = SingleTrialCorrelation(target.shape[1], skip_frames=SKIP)
    metric.update(*_t(preds, target))
    ref = ref_corr(scored_frames(preds, full).astype(np.float64), scored_frames(target, full).astype(np.float64))
    np.testing.assert_allclose(metric.compute().numpy(), ref, atol=2e-6)


@pytest.mark.parametrize("rows", [[list(range(10))], [[9, 0, 5], [3, 1, 6, 2], [8, 4, 7]]])
def test_repeat_metrics_match_numpy(rows: list[list[int]]) -> None:
    preds, target, lengths, clips = repeat_data()
    ref = ref_repeat(preds.astype(np.float64), target.astype(np.float64), lengths, clips)
    got = _repeat(preds, target, lengths, clips, rows).compute()
    for key in ("repeat_averaged_corr", "oracle_corr", "fev", "feve"):
        assert torch.isfinite(got[key]).all(), key
        assert got[key][0] == 0.0, key  # constant neuron: 0, not NaN
        np.testing.assert_allclose(got[key][1:].numpy(), ref[key][1:], atol=2e-6, err_msg=key)
    mask = np.nan_to_num(ref["fev"]) >= 0.15
    np.testing.assert_array_equal(got["fev_mask"].numpy(), mask)
    assert mask.sum() >= 2
    assert got["feve_mean"].item() == pytest.approx(ref["feve"][mask].mean(), abs=2e-6)


def test_repeat_metrics_with_single_repeats_only() -> None:
    """No clip repeats: oracle/FEV/FEVE are 0 (no NaN) and the correlation to average is the single-trial one."""
    preds, target, lengths, _ = repeat_data()
    keep = [0, 3, 5, 9]  # one trial of each clip
    clips = np.arange(4)
    got = _repeat(preds[keep], target[keep], lengths[keep], clips, [[0, 1, 2, 3]]).compute()
    single = _single(preds[keep], target[keep], lengths[keep], [4]).compute()
    np.testing.assert_allclose(got["repeat_averaged_corr"].numpy(), single.numpy(), atol=2e-6)
    for key in ("oracle_corr", "fev", "feve"):
        assert (got[key] == 0).all(), key
    assert not got["fev_mask"].any()
    assert torch.isnan(got["feve_mean"])


def test_states_stay_float64_under_bf16() -> None:
    preds, target, lengths = single_data()
    single = _single(preds, target, lengths, [9])
    before = single.compute()
    single = single.to(torch.bfloat16)
    assert single.sxx.dtype == torch.float64 and single._defaults["sxx"].dtype == torch.float64
    single._computed = None
    np.testing.assert_array_equal(single.compute().numpy(), before.numpy())  # accumulated values kept exactly
    repeat = RepeatMetrics(3, num_clips=2, max_frames=60, skip_frames=SKIP).to(torch.bfloat16)
    assert repeat.sum_y.dtype == repeat.count.dtype == torch.float64 and repeat.sum_p.dtype == torch.float32


def test_pooled_mean_is_neuron_weighted() -> None:
    values = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([0.0])}
    assert pooled_mean(values).item() == pytest.approx(0.75)  # not (1 + 0) / 2
    assert torch.isnan(pooled_mean({}))


def test_metric_group_keeps_the_three_metrics_and_summarise_pools_them() -> None:
    preds, target, lengths, clips = _t(*repeat_data())
    n = target.shape[1]
    plain = MetricGroup(n, num_clips=4, skip_frames=SKIP)
    plain.update(preds, target, clips, lengths)
    with_rates = MetricGroup(n, num_clips=4, skip_frames=SKIP)
    with_rates.update(preds, target, clips, lengths, rates=preds)
    values, values_gt = plain.compute(), with_rates.compute()
    single, repeat = SingleTrialCorrelation(n, skip_frames=SKIP), RepeatMetrics(n, num_clips=4, skip_frames=SKIP)
    single.update(preds, target, lengths)
    repeat.update(preds, target, clips, lengths)
    expected = {"single_trial_corr": single.compute(), **repeat.compute()}
    assert set(values) == set(expected) and "ground_truth_corr" not in values  # no rates, no ground truth
    for name, value in expected.items():
        torch.testing.assert_close(values[name], value, equal_nan=True)
    torch.testing.assert_close(values_gt["ground_truth_corr"], values["single_trial_corr"])  # rates = predictions
    plain.reset()
    assert int(plain.single.n) == 0 and float(plain.repeat.count.sum()) == 0

    summary = summarise({"oracle": {"a": values, "b": values_gt}})["oracle"]
    both = {"a": values["single_trial_corr"], "b": values["single_trial_corr"]}
    assert summary["pooled"]["single_trial_corr"] == pytest.approx(float(pooled_mean(both)))
    assert summary["per_mouse"]["a"]["feve"] == pytest.approx(float(values["feve"][values["fev_mask"]].mean()))
    assert "ground_truth_corr" not in summary["per_mouse"]["a"] and "ground_truth_corr" in summary["pooled"]
    assert summary["pooled"]["fraction_of_ground_truth"] == pytest.approx(1.0)
    np.testing.assert_array_equal(
        summary["per_mouse_vectors"]["b"]["single_trial_corr_per_neuron"], values["single_trial_corr"].numpy()
    )


# ------------------------------------------------------------------------------------------ DDP
# Uneven splits across 2 ranks; the repeats of clips 0 and 2 are split across the ranks.
SINGLE_ROWS = ([0, 1, 2], [3, 4, 5, 6, 7, 8])
REPEAT_ROWS = ([0, 3, 5, 6], [1, 2, 4, 7, 8, 9])


def _ddp_worker(rank: int, port: int, queue: mp.Queue) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        preds, target, lengths = single_data()
        rows = SINGLE_ROWS[rank]
        single = _single(preds[rows], target[rows], lengths[rows], [len(rows)])
        p, t, lens, clips = repeat_data()
        repeat = _repeat(p, t, lens, clips, [REPEAT_ROWS[rank]])
        s, r = single.compute(), repeat.compute()  # collectives: every rank computes
        queue.put((rank, s.numpy(), {k: v.numpy() for k, v in r.items()}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_single_process() -> None:
    ctx = mp.get_context("fork")  # cheap: the children inherit the imported modules
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, port, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = [queue.get(timeout=60) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]

    preds, target, lengths = single_data()
    single = _single(preds, target, lengths, [9]).compute().numpy()
    p, t, lens, clips = repeat_data()
    repeat = _repeat(p, t, lens, clips, [list(range(10))]).compute()
    for _, s_ddp, r_ddp in results:  # both ranks hold the synced result
        np.testing.assert_allclose(s_ddp, single, atol=1e-6)
        for key, value in repeat.items():
            np.testing.assert_allclose(r_ddp[key], value.numpy(), atol=1e-6, err_msg=key)


def test_metric_group_of_random_windows_reports_no_repeat_metrics() -> None:
    """Windows cut at random places (official validation windows) show repeats of a clip at different frames: the
    group keeps the single-trial correlation and leaves out the repeat metrics."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(4, 3, 80, generator=g), torch.rand(4, 3, 80, generator=g)
    clips, lengths = torch.tensor([0, 0, 1, 1]), torch.full((4,), 80)
    whole, windows = MetricGroup(3, num_clips=2), MetricGroup(3, num_clips=2)
    whole.update(pred, target, clips, lengths)
    windows.update(pred, target, clips, lengths, repeats=False)
    assert {"oracle_corr", "feve"} <= set(whole.compute())
    assert set(windows.compute()) == {"single_trial_corr"}
    torch.testing.assert_close(windows.compute()["single_trial_corr"], whole.compute()["single_trial_corr"])
