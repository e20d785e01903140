"""Metrics against plain NumPy references: pooling, masking, stability, repeats, DDP exactness."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_sensorium.metrics import RepeatMetrics, SingleTrialCorrelation, pooled_mean

SKIP = 50


def ref_corr(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """The official formula on (samples, N)."""
    xz = (x - x.mean(0)) / (x.std(0) + eps)
    yz = (y - y.mean(0)) / (y.std(0) + eps)
    return np.nan_to_num((xz * yz).mean(0))


def pooled_frames(a: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, N, T) → (Σ scored frames, N)."""
    return np.concatenate([a[b, :, SKIP : lengths[b]].T for b in range(len(a))])


def make_data(seed: int = 0, b: int = 9, n: int = 12, t: int = 120):
    rng = np.random.default_rng(seed)
    target = rng.gamma(0.5, 2.0, size=(b, n, t))
    preds = 0.5 * target + rng.normal(0, 1, size=(b, n, t))
    lengths = rng.integers(70, t + 1, size=b)
    target[:, 0] = 3.0  # a constant neuron
    target[:, 1] = 0.0
    target[4, 1, 80] = 5.0  # a single-spike neuron
    preds[:, 2] += 1000.0  # a large offset
    return preds, target, lengths


def test_single_trial_matches_numpy_however_batched() -> None:
    preds, target, lengths = make_data()
    ref = ref_corr(pooled_frames(preds, lengths), pooled_frames(target, lengths))
    for split in ([9], [1] * 9, [4, 2, 3]):
        metric = SingleTrialCorrelation(12, skip_frames=SKIP)
        start = 0
        for size in split:
            sl = slice(start, start + size)
            metric.update(torch.tensor(preds[sl]).float(), torch.tensor(target[sl]).float(), torch.tensor(lengths[sl]))
            start += size
        got = metric.compute().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)  # inputs are float32: ulp(1000) ≈ 6e-5
    assert got[0] == 0.0 and np.isfinite(got).all()
    assert got[1] != 0.0  # the single spike still correlates


def ref_repeat(preds, target, lengths, clips):
    """Correlation to average, LOO oracle, FEVE in plain NumPy (loops, float64)."""
    n = target.shape[1]
    avg_y, avg_p, loo_y, loo_m, se, ys, groups = [], [], [], [], [], [], []
    for c in np.unique(clips):
        members = np.flatnonzero(clips == c)
        tmax = lengths[members].max()
        for t in range(SKIP, tmax):
            rows = [b for b in members if t < lengths[b]]
            y = target[rows, :, t]
            p = preds[rows, :, t]
            avg_y.append(y.mean(0))
            avg_p.append(p.mean(0))
            if len(rows) >= 2:
                for j in range(len(rows)):
                    loo_y.append(y[j])
                    loo_m.append(np.delete(y, j, 0).mean(0))
                se.append(((y - p) ** 2).sum(0))
                ys.append(y)
                groups.append(len(rows))
    repeat = ref_corr(np.array(avg_y), np.array(avg_p))
    oracle = ref_corr(np.array(loo_y), np.array(loo_m))
    allv = np.concatenate(ys)
    total_var = allv.var(0, ddof=1)
    noise_var = np.mean([g.var(0, ddof=1) for g in ys], axis=0)
    mse = np.sum(se, axis=0) / len(allv)
    feve = 1 - (mse - noise_var) / (total_var - noise_var)
    fev = (total_var - noise_var) / total_var
    return repeat, oracle, np.nan_to_num(feve), np.nan_to_num(fev), n


def repeat_data(seed: int = 1):
    rng = np.random.default_rng(seed)
    clips = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # clip 3 has a single repeat
    signal = rng.gamma(1.0, 1.0, size=(4, 6, 110))
    target = signal[clips] + rng.normal(0, 0.5, size=(10, 6, 110))
    preds = signal[clips] * 0.8 + rng.normal(0, 0.3, size=(10, 6, 110))
    lengths = np.array([110, 110, 110, 100, 100, 90, 90, 90, 90, 105])
    return preds, target, lengths, clips


def test_repeat_metrics_match_numpy() -> None:
    preds, target, lengths, clips = repeat_data()
    repeat, oracle, feve, fev, n = ref_repeat(preds, target, lengths, clips)
    metric = RepeatMetrics(n, num_clips=4, max_frames=120, skip_frames=SKIP)
    for sl in (slice(0, 4), slice(4, 7), slice(7, 10)):
        metric.update(
            torch.tensor(preds[sl]), torch.tensor(target[sl]), torch.tensor(clips[sl]), torch.tensor(lengths[sl])
        )
    got = metric.compute()
    np.testing.assert_allclose(got["repeat_averaged_corr"].numpy(), repeat, atol=1e-5)
    np.testing.assert_allclose(got["oracle_corr"].numpy(), oracle, atol=1e-5)
    np.testing.assert_allclose(got["feve"].numpy(), feve, atol=1e-4)
    np.testing.assert_allclose(got["fev"].numpy(), fev, atol=1e-4)
    np.testing.assert_array_equal(got["fev_mask"].numpy(), (fev >= 0.15).astype(np.float32))


def test_states_stay_float64_under_bf16() -> None:
    metric = SingleTrialCorrelation(3).to(torch.bfloat16)
    assert metric.sxx.dtype == torch.float64
    repeat = RepeatMetrics(3, num_clips=2, max_frames=60).to(torch.bfloat16)
    assert repeat.sum_y.dtype == torch.float32 and repeat.count.dtype == torch.float64


def test_pooled_mean_is_neuron_weighted() -> None:
    values = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([0.0])}
    assert pooled_mean(values).item() == pytest.approx(0.75)  # not (1 + 0) / 2


def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, target, lengths = make_data()
    rp, rt, rl, rc = repeat_data()
    # Uneven splits; the repeats of clips 0 and 2 are split across the ranks.
    single_rows = [0, 1, 2, 3, 4] if rank == 0 else [5, 6, 7, 8]
    repeat_rows = [0, 3, 5, 6] if rank == 0 else [1, 2, 4, 7, 8, 9]
    single = SingleTrialCorrelation(12, skip_frames=SKIP)
    single.update(
        torch.tensor(preds[single_rows]).float(),
        torch.tensor(target[single_rows]).float(),
        torch.tensor(lengths[single_rows]),
    )
    repeat = RepeatMetrics(6, num_clips=4, max_frames=120, skip_frames=SKIP)
    repeat.update(
        torch.tensor(rp[repeat_rows]),
        torch.tensor(rt[repeat_rows]),
        torch.tensor(rc[repeat_rows]),
        torch.tensor(rl[repeat_rows]),
    )
    s, r = single.compute(), repeat.compute()
    if rank == 0:
        queue.put((s.numpy(), {k: v.numpy() for k, v in r.items()}))
    dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process() -> None:
    ctx = mp.get_context("spawn")  # fork after torch has started its thread pool can deadlock
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    s_ddp, r_ddp = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    preds, target, lengths = make_data()
    single = SingleTrialCorrelation(12, skip_frames=SKIP)
    single.update(torch.tensor(preds).float(), torch.tensor(target).float(), torch.tensor(lengths))
    np.testing.assert_allclose(s_ddp, single.compute().numpy(), atol=1e-6)
    rp, rt, rl, rc = repeat_data()
    repeat = RepeatMetrics(6, num_clips=4, max_frames=120, skip_frames=SKIP)
    repeat.update(torch.tensor(rp), torch.tensor(rt), torch.tensor(rc), torch.tensor(rl))
    for k, v in repeat.compute().items():
        np.testing.assert_allclose(r_ddp[k], v.numpy(), atol=1e-6)
