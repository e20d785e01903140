"""Synthetic mice: exact official layout, realistic structure, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lightning_sensorium.data.layout import DATA_KEYS, TIERS
from lightning_sensorium.data.synthetic import synthesize, tree_digest
from tests.conftest import TINY, sessions


def _load(session: Path, rel: str) -> np.ndarray:
    return np.load(session / rel, allow_pickle=False)


def test_official_layout(tiny_release: Path) -> None:
    found = sessions(tiny_release)
    assert len(found) == TINY["mice"]
    for s in found:
        tiers = _load(s, "meta/trials/tiers.npy")
        assert tiers.dtype.kind == "U"
        assert set(tiers.tolist()) == set(TIERS)
        n = len(tiers)
        for key in DATA_KEYS:
            assert sorted(p.name for p in (s / "data" / key).iterdir()) == sorted(f"{i}.npy" for i in range(n))
        ids = _load(s, "meta/neurons/unit_ids.npy")
        coords = _load(s, "meta/neurons/cell_motor_coordinates.npy")
        assert ids.shape == (TINY["neurons"],) and np.all(np.diff(ids) > 0) and ids.min() >= 1
        assert coords.shape == (TINY["neurons"], 3) and coords.dtype.kind == "i"
        assert set(np.unique(coords[:, 2])) <= set(range(200, 426, 25))
        t_pad = _load(s, "data/responses/0.npy").shape[1]
        shapes = {"videos": (36, 64, t_pad), "responses": (TINY["neurons"], t_pad), "behavior": (2, t_pad)}
        shapes["pupil_center"] = (2, t_pad)
        for key, shape in shapes.items():
            for stat in ("mean", "std", "min", "max", "median"):
                assert _load(s, f"meta/statistics/{key}/all/{stat}.npy").shape == shape
            for i in range(n):
                assert _load(s, f"data/{key}/{i}.npy").shape == shape
        assert json.loads((s / "config.json").read_text()) == {"links": {}}


def test_padding_and_lengths(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    gt = tiny_release / "ground_truth" / s.name
    types = np.load(gt / "stimulus_types.npy")
    expected = {"natural": {300}, "random_dots": {240}, "drifting_gabor": {300}, "gaussian_dots": {315}}
    for i, kind in enumerate(types):
        video = _load(s, f"data/videos/{i}.npy")
        behavior = _load(s, f"data/behavior/{i}.npy")
        pupil = _load(s, f"data/pupil_center/{i}.npy")
        assert not np.isnan(behavior).any()
        length = int((~np.isnan(pupil[0])).sum())
        if kind in expected:
            assert length in expected[kind]
        elif kind == "pink_noise":
            assert 313 <= length <= 324
        else:
            assert 305 <= length <= 414
        assert np.isnan(video[..., length:]).all()
        # The last valid frame is partially NaN, as in the release (the official loader keeps length - 1).
        last = video[..., length - 1]
        assert np.isnan(last).any() and not np.isnan(last).all()
        assert not np.isnan(video[..., : length - 1]).any()
        values = video[..., : length - 1]
        assert values.min() >= 0 and values.max() <= 255 and np.all(values == np.round(values))


def test_repeats_share_pixels_and_natural_movies_are_not_noise(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    gt = tiny_release / "ground_truth" / s.name
    clip_ids, tiers = np.load(gt / "clip_ids.npy"), _load(s, "meta/trials/tiers.npy")
    for tier in TIERS[1:]:
        idx = np.flatnonzero(tiers == tier)
        for clip in np.unique(clip_ids[idx]):
            members = idx[clip_ids[idx] == clip]
            assert len(members) == TINY["repeats"]
            first = _load(s, f"data/videos/{members[0]}.npy")
            for j in members[1:]:
                np.testing.assert_array_equal(first, _load(s, f"data/videos/{j}.npy"))
    train = np.flatnonzero(tiers == "train")
    assert len(np.unique(clip_ids[train])) == len(train)
    # Natural movies: strong spatial and temporal correlation (white noise has neither).
    v = np.nan_to_num(_load(s, f"data/videos/{train[0]}.npy")[..., :250])
    spatial = np.corrcoef(v[:, :-1].ravel(), v[:, 1:].ravel())[0, 1]
    temporal = np.corrcoef(v[..., :-1].ravel(), v[..., 1:].ravel())[0, 1]
    assert spatial > 0.7 and temporal > 0.7


def test_ground_truth_and_responses(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    gt = tiny_release / "ground_truth" / s.name
    tiers = _load(s, "meta/trials/tiers.npy")
    resp, rates = [], []
    for i in np.flatnonzero(tiers == "train"):
        resp.append(_load(s, f"data/responses/{i}.npy")[:, 50:299])
        rates.append(np.load(gt / "rates" / f"{i}.npy")[:, 50:299])
    r, g = np.concatenate(resp, 1), np.concatenate(rates, 1)
    assert np.all(r >= 0) and np.isfinite(r).all()
    corr = [np.corrcoef(r[n], g[n])[0, 1] for n in range(r.shape[0])]
    assert 0.15 < np.nanmean(corr) < 0.95
    assert 0.3 < r.mean() < 10


def test_behaviour_structure(tiny_release: Path) -> None:
    s = sessions(tiny_release)[0]
    beh = np.concatenate([_load(s, f"data/behavior/{i}.npy") for i in range(10)], axis=1)
    pupil, speed = beh
    assert speed.min() >= 0 and (speed > 1).mean() > 0.0  # running bouts exist
    assert 20 < pupil.mean() < 70
    # Pupil size varies slowly: neighbouring frames almost identical.
    assert np.corrcoef(pupil[:-1], pupil[1:])[0, 1] > 0.9


def test_hidden_test_tiers_are_zero(tiny_release_hidden: Path) -> None:
    s = sessions(tiny_release_hidden)[0]
    tiers = _load(s, "meta/trials/tiers.npy")
    for i, tier in enumerate(tiers):
        r = _load(s, f"data/responses/{i}.npy")
        if "test" in tier:
            assert not np.isnan(r).any() and not r.any()
        else:
            assert r[:, :50].any()


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    small = {"mice": 1, "neurons": 6, "train_trials": 2, "clips_per_tier": 1, "repeats": 2, "progress": False}
    synthesize(tmp_path / "a", seed=3, workers=1, **small)
    synthesize(tmp_path / "b", seed=3, workers=1, **small)
    synthesize(tmp_path / "c", seed=4, workers=1, **small)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_existing_session_is_refused(tiny_release: Path) -> None:
    with pytest.raises(FileExistsError, match="synthetic0-0"):
        synthesize(tiny_release, progress=False, workers=1, **TINY)


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="--neurons"):
        synthesize("/tmp/never", neurons=0, progress=False)
