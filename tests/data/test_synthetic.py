"""Synthetic mice: exact official layout, realistic structure, determinism, and the ground-truth neuron model."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.content import classify_stimulus
from lightning_sensorium.data.layout import DATA_KEYS, GROUND_TRUTH_DIR, STATISTICS, STIMULUS_TYPES, TEST_TIERS, TIERS
from lightning_sensorium.data.stimuli import OOD_GENERATORS, MouseBehaviour, ood_length
from lightning_sensorium.data.synthetic import MEDIAN_RESERVOIR, neuron_metadata, plan_clips, synthesize
from tests.conftest import TINY, sessions

LENGTHS = {"natural": (300, 300), "random_dots": (240, 240), "drifting_gabor": (300, 300)}
LENGTHS |= {"gaussian_dots": (315, 315), "pink_noise": (313, 324), "image": (305, 414)}


def _load(session: Path, rel: str) -> np.ndarray:
    return np.load(session / rel, allow_pickle=False)


def _truth(root: Path, session: Path, name: str) -> np.ndarray:
    return np.load(root / GROUND_TRUTH_DIR / session.name / name, allow_pickle=False)


def tree_digest(root: Path) -> str:
    """SHA-256 over every file path and content under ``root`` (for same-seed-same-bytes checks)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _official_length(arrays: list[np.ndarray]) -> int:
    """The official loader's cut: first frame with a NaN in any element of any key (time last)."""
    t_pad = arrays[0].shape[-1]
    nan = np.zeros(t_pad, dtype=bool)
    for a in arrays:
        nan |= np.isnan(a.reshape(-1, t_pad)).any(axis=0)
    return int(np.argmax(nan)) if nan.any() else t_pad


# ---------------------------------------------------------------------------------------------------- layout
def test_official_layout(tiny_release: Path) -> None:
    found = sessions(tiny_release)
    assert [s.name for s in found] == [f"synthetic0-{k}-Video-digitaltwin" for k in range(TINY["mice"])]
    assert sorted(p.name for p in tiny_release.iterdir()) == sorted([GROUND_TRUTH_DIR, *(s.name for s in found)])
    for s in found:
        assert sorted(p.name for p in s.iterdir()) == ["config.json", "data", "meta"]
        assert json.loads((s / "config.json").read_text()) == {"links": {}}
        tiers = _load(s, "meta/trials/tiers.npy")
        assert tiers.dtype.kind == "U" and tiers.ndim == 1
        assert set(tiers.tolist()) == set(TIERS)
        n = len(tiers)
        for key in DATA_KEYS:
            assert sorted(p.name for p in (s / "data" / key).iterdir()) == sorted(f"{i}.npy" for i in range(n))
        ids = _load(s, "meta/neurons/unit_ids.npy")
        assert ids.dtype.kind == "i" and ids.shape == (TINY["neurons"],)
        assert np.all(np.diff(ids) > 0) and ids.min() >= 1
        coords = _load(s, "meta/neurons/cell_motor_coordinates.npy")
        assert coords.shape == (TINY["neurons"], 3) and coords.dtype.kind == "i"
        assert set(np.unique(coords[:, 2])) <= set(range(200, 426, 25))
        t_pad = _load(s, "data/responses/0.npy").shape[1]
        shapes = {"videos": (36, 64, t_pad), "responses": (TINY["neurons"], t_pad), "behavior": (2, t_pad)}
        shapes["pupil_center"] = (2, t_pad)
        assert sorted(p.name for p in (s / "meta" / "statistics").iterdir()) == sorted(DATA_KEYS)
        for key, shape in shapes.items():
            assert sorted(p.name for p in (s / "meta/statistics" / key / "all").iterdir()) == sorted(
                f"{stat}.npy" for stat in STATISTICS
            )
            for stat in STATISTICS:
                arr = _load(s, f"meta/statistics/{key}/all/{stat}.npy")
                assert arr.shape == shape and arr.dtype == np.float32
            for i in range(n):
                arr = _load(s, f"data/{key}/{i}.npy")
                assert arr.shape == shape and arr.dtype == np.float32


def test_ground_truth_layout(tiny_release: Path) -> None:
    for s in sessions(tiny_release):
        gt = tiny_release / GROUND_TRUTH_DIR / s.name
        n = len(_load(s, "meta/trials/tiers.npy"))
        assert sorted(p.name for p in (gt / "rates").iterdir()) == sorted(f"{i}.npy" for i in range(n))
        clip_ids, types = _truth(tiny_release, s, "clip_ids.npy"), _truth(tiny_release, s, "stimulus_types.npy")
        assert clip_ids.dtype == np.int64 and clip_ids.shape == (n,)
        assert types.dtype.kind == "U" and set(types.tolist()) <= set(STIMULUS_TYPES)
        assert np.load(gt / "neurons" / "rf_center.npy").shape == (TINY["neurons"], 2)
        for i in range(n):
            rates, responses = np.load(gt / "rates" / f"{i}.npy"), _load(s, f"data/responses/{i}.npy")
            assert rates.dtype == np.float32 and rates.shape == responses.shape
            np.testing.assert_array_equal(np.isnan(rates), np.isnan(responses))


def test_padding_lengths_and_partial_last_frame(tiny_release: Path) -> None:
    for s in sessions(tiny_release):
        types = _truth(tiny_release, s, "stimulus_types.npy")
        t_pad = _load(s, "data/videos/0.npy").shape[-1]
        lengths = []
        for i, kind in enumerate(types):
            arrays = {key: _load(s, f"data/{key}/{i}.npy") for key in DATA_KEYS}
            assert not np.isnan(arrays["behavior"]).any()
            length = int((~np.isnan(arrays["pupil_center"][0])).sum())
            lengths.append(length)
            lo, hi = LENGTHS[str(kind)]
            assert lo <= length <= hi, kind
            for key in ("videos", "responses", "pupil_center"):
                assert np.isnan(arrays[key][..., length:]).all() and not np.isnan(arrays[key][..., : length - 1]).any()
            assert not np.isnan(arrays["responses"][..., length - 1]).any()
            # The last valid frame is partially NaN, as in the release: the official loader keeps length − 1.
            last = arrays["videos"][..., length - 1]
            assert np.isnan(last).any() and not np.isnan(last).all()
            assert _official_length(list(arrays.values())) == length - 1
            values = arrays["videos"][..., : length - 1]
            assert values.min() >= 0 and values.max() <= 255 and np.all(values == np.round(values))
        assert max(lengths) == t_pad


def test_statistics_are_nan_aware_over_train_trials(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    train = np.flatnonzero(_load(s, "meta/trials/tiers.npy") == "train")
    assert len(train) <= MEDIAN_RESERVOIR  # so the reservoir median is the full median here
    for key in DATA_KEYS:
        stack = np.stack([_load(s, f"data/{key}/{i}.npy").astype(np.float64) for i in train])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames
            expected = {
                "mean": np.nanmean(stack, 0),
                "std": np.nanstd(stack, 0),
                "min": np.nanmin(stack, 0),
                "max": np.nanmax(stack, 0),
                "median": np.nanmedian(stack, 0),
            }
        for stat, value in expected.items():
            got = _load(s, f"meta/statistics/{key}/all/{stat}.npy")
            np.testing.assert_allclose(got, value.astype(np.float32), rtol=1e-4, atol=1e-3, err_msg=f"{key}/{stat}")
    # No train trial is longer than 300 frames: beyond that the statistics are NaN (the official 300 cap).
    std = _load(s, "meta/statistics/responses/all/std.npy")
    assert np.isnan(std[:, 300:]).all() and np.isfinite(std[:, :300]).all()
    assert np.isfinite(_load(s, "meta/statistics/behavior/all/std.npy")).all()


# --------------------------------------------------------------------------------------------------- content
def test_repeats_share_pixels_but_not_behaviour(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    clip_ids, tiers = _truth(tiny_release, s, "clip_ids.npy"), _load(s, "meta/trials/tiers.npy")
    for tier in TIERS[1:]:
        idx = np.flatnonzero(tiers == tier)
        for clip in np.unique(clip_ids[idx]):
            members = idx[clip_ids[idx] == clip]
            assert len(members) == TINY["repeats"]
            first = _load(s, f"data/videos/{members[0]}.npy")
            behaviour = _load(s, f"data/behavior/{members[0]}.npy")
            for j in members[1:]:
                np.testing.assert_array_equal(first, _load(s, f"data/videos/{j}.npy"))
                assert not np.array_equal(behaviour, _load(s, f"data/behavior/{j}.npy"))
    # Clip ids are unique across tiers: one clip never appears in two tiers.
    for clip in np.unique(clip_ids):
        assert len(set(tiers[clip_ids == clip].tolist())) == 1
    train = np.flatnonzero(tiers == "train")
    assert len(np.unique(clip_ids[train])) == len(train)


def test_natural_movies_are_not_noise(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    train = np.flatnonzero(_load(s, "meta/trials/tiers.npy") == "train")
    v = np.stack([_load(s, f"data/videos/{i}.npy")[..., :299] for i in train[:4]])
    spatial = np.corrcoef(v[:, :, :-1].ravel(), v[:, :, 1:].ravel())[0, 1]
    temporal = np.corrcoef(v[..., :-1].ravel(), v[..., 1:].ravel())[0, 1]
    assert spatial > 0.7 and temporal > 0.7
    assert 60 < v.mean() < 100 and 35 < v.std() < 75


@pytest.mark.parametrize("family", sorted(OOD_GENERATORS))
def test_ood_families_match_the_release_and_the_converter(family: str) -> None:
    rng = np.random.default_rng(7)
    length = ood_length(rng, family)
    assert LENGTHS[family][0] <= length <= LENGTHS[family][1]
    video = OOD_GENERATORS[family](rng, length)
    assert video.shape == (length, 36, 64) and video.dtype == np.float32
    assert video.min() >= 0 and video.max() <= 255 and np.all(video == np.round(video))
    assert classify_stimulus(video[:-1]) == family


def test_bonus_families_rotate_across_mice() -> None:
    seen = []
    for mouse in range(5):
        clips = plan_clips(np.random.default_rng(0), mouse, 1, 1)
        live = {c.stimulus_type for c in clips if c.tier == "live_test_bonus"}
        final = {c.stimulus_type for c in clips if c.tier == "final_test_bonus"}
        assert len(live) == 1 and len(final) == 2 and not live & final
        seen.append(live.pop())
    assert sorted(seen) == sorted(OOD_GENERATORS)


def test_ground_truth_correlation_and_response_scale(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    tiers = _load(s, "meta/trials/tiers.npy")
    resp, rates = [], []
    for i in np.flatnonzero(tiers == "train"):
        resp.append(_load(s, f"data/responses/{i}.npy")[:, 50:299])
        rates.append(_truth(tiny_release, s, f"rates/{i}.npy")[:, 50:299])
    r, g = np.concatenate(resp, 1), np.concatenate(rates, 1)
    assert np.all(r >= 0) and np.isfinite(r).all() and np.all(g > 0)
    corr = np.array([np.corrcoef(r[n], g[n])[0, 1] for n in range(r.shape[0])])
    assert 0.2 < corr.mean() < 0.8 and corr.max() < 1
    assert 0.5 < r.mean() < 6 and np.median(r) == 0  # sparse, heavy-tailed like deconvolved activity


def test_behaviour_structure(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    n = len(_load(s, "meta/trials/tiers.npy"))
    pupil, speed = np.concatenate([_load(s, f"data/behavior/{i}.npy") for i in range(n)], axis=1)
    center = np.concatenate([_load(s, f"data/pupil_center/{i}.npy") for i in range(n)], axis=1)
    assert speed.min() >= 0 and (speed > 1).any() and (speed == 0).any()  # running bouts and stillness
    assert 20 < pupil.mean() < 75
    assert np.corrcoef(pupil[:-1], pupil[1:])[0, 1] > 0.9  # slow
    assert 100 < np.nanmean(center) < 180 and 1 < np.nanstd(center[0]) < 12


def test_hidden_test_tiers_are_zero(tiny_release_hidden: Path) -> None:
    s = sessions(tiny_release_hidden)[0]
    tiers = _load(s, "meta/trials/tiers.npy")
    for i, tier in enumerate(tiers):
        r = _load(s, f"data/responses/{i}.npy")
        if tier in TEST_TIERS:
            assert not np.isnan(r).any() and not r.any()
            assert np.isfinite(_truth(tiny_release_hidden, s, f"rates/{i}.npy")[:, :240]).all()
        else:
            assert r[:, :50].any()


# ---------------------------------------------------------------------------------------------- determinism
SMALL = {"mice": 1, "neurons": 6, "train_trials": 2, "clips_per_tier": 1, "repeats": 2, "progress": False}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", seed=3, workers=1, **SMALL)
    synthesize(tmp_path / "b", seed=3, workers=1, **SMALL)
    synthesize(tmp_path / "c", seed=4, workers=1, **SMALL)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


@pytest.mark.slow
def test_bytes_do_not_depend_on_workers(tmp_path: Path) -> None:
    synthesize(tmp_path / "a", seed=5, workers=1, **{**SMALL, "mice": 2})
    synthesize(tmp_path / "b", seed=5, workers=2, **{**SMALL, "mice": 2})
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_existing_session_is_refused(tiny_release: Path) -> None:
    before = sorted(p.name for p in tiny_release.iterdir())
    with pytest.raises(FileExistsError, match="synthetic0-0"):
        synthesize(tiny_release, progress=False, workers=1, **TINY)
    assert sorted(p.name for p in tiny_release.iterdir()) == before  # nothing half-written left behind


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neurons must be ≥ 1"):
        synthesize(tmp_path, neurons=0, progress=False)
    with pytest.raises(ValueError, match="repeats must be ≥ 1"):
        synthesize(tmp_path, repeats=0, progress=False)
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- the model
def _neurons(n: int = 8) -> twin.NeuronParameters:
    rng = np.random.default_rng(0)
    _, coords = neuron_metadata(rng, n)
    mb = MouseBehaviour.draw(rng)
    return twin.draw_neurons(rng, coords, np.asarray(mb.eye_reference), np.array([mb.pupil_mean, 12.0]))


def _grating(direction: int, vertical: bool = True, frames: int = 90, wavelength: float = 10.0) -> np.ndarray:
    """Full-field grating ``(T, 36, 64)`` drifting at 3.75 Hz; vertical stripes move along ±x, horizontal along ±y."""
    y, x = np.mgrid[0:36, 0:64]
    t = np.arange(frames)[:, None, None]
    phase = 2 * math.pi * ((x if vertical else y)[None] / wavelength - direction * t / 8.0)
    return (80 + 60 * np.cos(phase)).astype(np.float32)


def test_feature_bank_shapes() -> None:
    bank = twin.feature_bank(_grating(1, frames=31))
    assert bank.quadrature.shape == (twin.CHANNELS, twin.FEAT_H, twin.FEAT_W, 16)
    assert bank.quadrature.dtype == np.complex64 and bank.pool.shape == (twin.FEAT_H, twin.FEAT_W, 16)
    assert np.isfinite(bank.quadrature).all() and (bank.pool > 0).all()


def test_direction_and_orientation_selectivity() -> None:
    p = _neurons(4)
    # Channel 0: sustained kernel, orientation 0 (stripes varying along x), 10 px wavelength; pure motion energy.
    p.channel[:] = 0
    p.simple_index[:] = 0.0
    p.direction_index[:] = 1.0
    p.direction_sign[:] = [1.0, -1.0, 1.0, -1.0]
    p.rf_center[:] = [twin.FEAT_W / 2, twin.FEAT_H / 2]
    gaze = np.zeros((45, 2))

    def drive(video: np.ndarray) -> np.ndarray:
        return twin.stimulus_drive(twin.feature_bank(video), p, gaze)[:, 10:].mean(1)

    forward, backward = drive(_grating(1)), drive(_grating(-1))
    ratio = forward / backward
    assert (ratio[[0, 2]] > 2).all() and (ratio[[1, 3]] < 0.5).all()  # opposite signs prefer opposite directions
    assert (drive(_grating(1, vertical=False)) < 0.5 * np.maximum(forward, backward)).all()  # orientation tuned


def test_gaze_moves_receptive_fields() -> None:
    p = _neurons(6)
    rng = np.random.default_rng(1)
    video = np.clip(80 + 55 * rng.standard_normal((40, 36, 64)), 0, 255).astype(np.float32)
    bank = twin.feature_bank(video)
    shift = np.tile([[2.0, 1.0]], (bank.steps, 1))
    moved = twin.stimulus_drive(bank, p, shift)
    p.rf_center = p.rf_center + [2.0, 1.0]
    np.testing.assert_allclose(moved, twin.stimulus_drive(bank, p, np.zeros_like(shift)), rtol=1e-5)
    assert not np.allclose(moved, twin.stimulus_drive(bank, p, -shift))


def test_noise_is_mean_preserving() -> None:
    p = _neurons(3)
    rate = np.full((3, 150), 2.0)
    rates, responses = twin.observe(rate, p, 300, np.random.default_rng(0))
    np.testing.assert_allclose(rates, 2.0, rtol=1e-5)
    many = np.stack([twin.observe(rate, p, 300, np.random.default_rng(i))[1] for i in range(200)])
    assert abs(many.mean() - 2.0) < 0.2 and (many == 0).mean() > 0.3
