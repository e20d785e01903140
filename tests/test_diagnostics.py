"""The ground-truth diagnostics under ``benchmarks/`` on tiny synthetic mice: ablation, checkpoint diagnosis and
learning curve."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.layout import GROUND_TRUTH_DIR
from lightning_sensorium.data.synthetic import load_neuron_parameters
from tests.conftest import sessions
from tests.test_evaluate import TINY_FIT, fitted

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
EXPERIMENTS = Path(__file__).parents[1] / "experiments"


def _script(name: str) -> ModuleType:
    """Load ``benchmarks/<name>.py`` as the scripts run: their folder on ``sys.path`` for ``_diagnostics``."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _script("ground_truth_ablation")
diagnose = _script("diagnose_checkpoint")
curve = _script("learning_curve")


def test_ablation_full_model_reproduces_the_saved_rates(tiny_release: Path) -> None:
    """The script's trial loading + ``full`` variant + observation give the generator's saved noiseless rates (up to
    the random scan phase, which the script fixes per trial), and each ablation changes them."""
    folder = sessions(tiny_release)[0]
    params = load_neuron_parameters(tiny_release, folder.name)
    tiers = np.load(folder / "meta" / "trials" / "tiers.npy")
    trial = int(np.flatnonzero(tiers == "final_test_main")[0])
    frames, behavior, center = ablation.load_trial(folder, trial)
    saved = np.load(tiny_release / GROUND_TRUTH_DIR / folder.name / "rates" / f"{trial}.npy")[:, : len(frames)]
    variants = ablation.ablations(params)
    bank = twin.feature_bank(frames)
    rates, _ = twin.observe(variants["full"](bank, behavior, center), params, len(frames), np.random.default_rng(0))
    assert ablation.correlation(rates[:, 50:], saved[:, 50:]) > 0.97
    full = variants["full"](bank, behavior, center)
    np.testing.assert_allclose(
        variants["no_behaviour_gain"](bank, behavior, center) * twin.behaviour_gain(params, behavior), full, rtol=1e-6
    )
    for name in ("no_gaze", "exponent_1", "gain_only"):
        assert not np.allclose(variants[name](bank, behavior, center), full), name


def test_model_limits(tiny_release: Path) -> None:
    """The limits' ``full`` trace is the generator's observation at the same scan phase; with the eye (and behaviour)
    still, applying the gaze after the calcium kernel changes nothing; the per-frame statistics views change it."""
    folder = sessions(tiny_release)[0]
    params = load_neuron_parameters(tiny_release, folder.name)
    tiers = np.load(folder / "meta" / "trials" / "tiers.npy")
    trial = int(np.flatnonzero(tiers == "final_test_main")[0])
    frames, behavior, center = ablation.load_trial(folder, trial)
    limits = ablation.model_limits(params, folder)
    rate = twin.step_rates(twin.feature_bank(frames), params, behavior, center)
    expected, _ = twin.observe(rate, params, len(frames), np.random.default_rng(3))
    phase = float(np.random.default_rng(3).uniform(0, twin.FPS / twin.SCAN_HZ))
    full = limits["full"](frames, behavior, center, phase)
    np.testing.assert_allclose(full, expected, rtol=1e-3, atol=1e-4 * expected.max())
    # Eye and behaviour still: only the 2-s cap on the lags (e^(−60/9) of the calcium kernel) remains.
    still, calm = np.broadcast_to(center[:1], center.shape), np.broadcast_to(behavior[:1], behavior.shape)
    after = limits["gaze_after_calcium"](frames, calm, still, phase)
    np.testing.assert_allclose(after, limits["full"](frames, calm, still, phase), rtol=0, atol=3e-3 * after.max())
    assert not np.allclose(limits["gaze_after_calcium"](frames, behavior, center, phase), full, rtol=1e-3)
    for name in ("per_frame_video_stats", "per_frame_pupil_stats"):
        assert not np.allclose(limits[name](frames, behavior, center, phase), full, rtol=1e-3), name


def test_ablation_script_and_errors(tiny_release: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scores = ablation.main(["--data", str(tiny_release), "--trials", "1"])
    assert set(scores) == {
        "no_gaze",
        "no_behaviour_gain",
        "exponent_1",
        "pool_constant",
        "pool_global",
        "gain_only",
        "per_frame_video_stats",
        "per_frame_pupil_stats",
        "gaze_after_calcium",
        "scan_phase_unknown",
    }
    assert all(-1 <= v <= 1 for v in scores.values())
    assert scores["no_behaviour_gain"] > scores["gain_only"]  # the stimulus carries more than the gain
    assert "no_gaze" in capsys.readouterr().out
    (tmp_path / "m0").mkdir()
    with pytest.raises(FileNotFoundError, match="no ground-truth neurons"):
        load_neuron_parameters(tmp_path, "m0")


def test_band_split_adds_up() -> None:
    """The frequency bands partition the spectrum: their sum is the signal minus its mean (Nyquist included)."""
    x = np.random.default_rng(0).normal(size=(3, 200))
    total = sum(diagnose.band(x, lo, hi) for lo, hi in diagnose.BANDS_HZ)
    np.testing.assert_allclose(total, x - x.mean(-1, keepdims=True), atol=1e-10)


def test_diagnose_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path, tiny_release: Path) -> None:
    ckpt = fitted(tmp_path_factory, tiny_stores)["checkpoints"][0]
    args = [ckpt, "--data", str(tiny_stores), "--release", str(tiny_release), "--trials", "2", "--skip", "55"]
    results = diagnose.main(args)
    assert -1 <= results["overall"] <= 1
    assert -1 <= results["times_response_scale"] <= 1  # trained without data.response_scale
    assert set(results["lags"]) == set(diagnose.LAGS)
    assert [b["hz"] for b in results["bands"]] == list(diagnose.BANDS_HZ)
    assert all(b["power_rates"] > 0 for b in results["bands"])
    shifter = results["shifter"]  # the factorized baseline has shifters
    assert set(shifter["corr"]) == {s.name for s in sessions(tiny_release)}
    assert -1 <= shifter["linear_ground_truth"] <= 1 and -1 <= shifter["constant"] <= 1


def test_learning_curve(tiny_stores: Path, tiny_release: Path, tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    args = ["--config", str(EXPERIMENTS / "factorized.yaml"), "--budget", "2", "--every", "1", "--trials", "2"]
    args += ["--schedule", "decay", "--data", str(tiny_stores), "--release", str(tiny_release), "--out", str(out)]
    args += ["--ema", "0.5", "0.0"]
    points = curve.main([*args, "--", "--trainer.logger", "false", "--data.frames", "24", *TINY_FIT[:2]])
    assert points == json.loads(out.read_text())
    assert len(points) >= 2 and points[-1]["t"] >= 2
    assert [p["step"] for p in points] == sorted(p["step"] for p in points) and points[0]["step"] >= 1
    assert all(np.isfinite(p["r"]) and np.isfinite(p["y"]) and len(p["pos"]) == 2 for p in points)
    # decay 0 averages nothing: the weights themselves; the first decay's r is the point's own
    assert all(set(p["r_ema"]) == {"0.5", "0.0"} and p["r_ema"]["0.5"] == pytest.approx(p["r"]) for p in points)
    assert all(p["r_ema"]["0.0"] != p["r_ema"]["0.5"] for p in points)  # separate averages
    assert curve.factor("decay", 0.5, 0.3) == 1.0 and curve.factor("decay", 0.85, 0.3) == pytest.approx(0.5)
    assert curve.factor("cosine", 1.0, 0.3) == pytest.approx(0.0)


def test_bench_loader(tiny_stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loader = _script("bench_loader")
    args = ["--config", str(EXPERIMENTS / "factorized.yaml"), "--data", str(tiny_stores)]
    result = loader.main([*args, "--batches", "3", "--warmup", "1", "--repeats", "2", "--", "--data.frames", "24"])
    assert 0 < result["s_per_batch"] < 10
    out = capsys.readouterr().out
    assert "ms / batch" in out and "3 batches × 2" in out and "code: " in out


def test_bench_memory_measures_and_estimates(tiny_stores: Path) -> None:
    """The benchmark's child measurement runs (its figure is only meaningful in a fresh process, as the script runs
    it) and gives a positive estimate."""
    bench = _script("bench_memory")
    result = bench.measure("factorized", str(tiny_stores), 2, 24)
    assert result["estimate_gib"] > 0 and result["measured_gib"] >= 0


def test_bench_compile_reports_breaks_and_both_step_times(tiny_stores: Path) -> None:
    bench = _script("bench_compile")
    rows = bench.main(["--configs", "factorized", "--data", str(tiny_stores), "--iters", "1"])
    row = rows["factorized"]
    assert row["breaks"] == 0 and row["reasons"] == []  # the factorized core compiles as one graph
    assert row["first"] > 0 and row["eager"] > 0 and row["compiled"] > 0
