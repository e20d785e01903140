"""The competition's scale of scored reads (every normalisation), ViV1T's input normalisation against its formula
computed by hand, and the errors of a scale that cannot apply."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.normalization import Normalizer, viv1t_statistics
from lightning_sensorium.data.store import MouseStore


def copy_stores(src: Path, dst: Path, edit: Callable[[zarr.Group], None] | None = None) -> Path:
    """A copy of the stores under ``src`` (caches left out), each store's root group passed to ``edit``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.npz"))
    if edit is not None:
        for store in sorted(dst.glob("*.zarr")):
            edit(zarr.open_group(store, mode="r+"))
    return dst


def _official_precision(store: MouseStore) -> np.ndarray:
    """The official per-frame precision ``(T, N)`` by hand (neuralpredictors' NeuroNormalizer)."""
    s = np.asarray(store.statistics["responses"]["std"], dtype=np.float64)
    threshold = 0.01 * np.nanmean(s)
    precision = np.ones_like(s) / threshold
    precision[s > threshold] = 1 / s[s > threshold]
    return precision


def test_scored_reads_are_on_the_competition_scale(tiny_stores: Path) -> None:
    """Raw: training windows are ReLU'd raw, scored reads raw × official precision (negatives kept) with the
    precision as the prediction factor; official: both × precision, no factor."""
    raw_dm = SensoriumDataModule(root=str(tiny_stores), frames=20, normalization="raw")
    mouse = raw_dm.mouse_ids[0]
    store = raw_dm.stores[mouse]
    precision = _official_precision(store)
    x = store.read(0, 10, 30, rates=True)
    x["responses"] = x["responses"] - 0.05  # tiny negatives, as deconvolution leaves them
    frames = np.arange(10, 30)
    norm = raw_dm.normalizers[mouse]
    trained = norm(x, frames, scored=False)
    np.testing.assert_allclose(trained["responses"], np.maximum(x["responses"], 0))
    assert "response_scale" not in trained
    scored = norm(x, frames)
    np.testing.assert_allclose(scored["responses"], x["responses"] * precision[10:30], rtol=1e-6)
    np.testing.assert_allclose(scored["rates"], x["rates"] * precision[10:30], rtol=1e-6)
    np.testing.assert_allclose(scored["response_scale"], precision[10:30], rtol=1e-6)
    assert (scored["responses"] < 0).any()
    official = Normalizer(store)
    for read in (official(x, frames), official(x, frames, scored=False)):
        np.testing.assert_allclose(read["responses"], x["responses"] * precision[10:30], rtol=1e-6)
        assert "response_scale" not in read
    # Training batches of a raw model carry no factor; its evaluation batches do, frame by frame.
    assert "response_scale" not in next(iter(raw_dm.train_dataloader()))
    batch = next(iter(raw_dm.trial_loader(["oracle"], max_trials=2)))
    length = int(batch["length"][0])
    got = batch["response_scale"][0, :, :length].numpy()
    np.testing.assert_allclose(got, precision[:length].T, rtol=1e-6)


def _viv1t_by_hand(store: MouseStore) -> dict[str, np.ndarray]:
    """ViV1T's ``compute_statistics`` (stat_mode=1): NaN-padded train trials, nan-statistics over trials."""
    trials = store.trials("train")
    t = store.t_pad
    stacked: dict[str, list[np.ndarray]] = {"videos": [], "responses": [], "behavior": [], "pupil_center": []}
    for trial in trials:
        x = store.read(int(trial), 0, t)
        length = int(store.length[trial])
        for key in stacked:
            a = x[key].astype(np.float64)
            a[length:] = np.nan
            stacked[key].append(a)
    s = {k: np.stack(v) for k, v in stacked.items()}  # (trials, T, ...)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # frames no train trial has: all-NaN slices
        out = {
            "video_mean": np.nanmean(s["videos"], 0),
            "video_std": np.nanstd(s["videos"], 0),
            "response_std": np.nanstd(s["responses"], 0),
            "behavior_min": np.nanmin(s["behavior"], 0),
            "behavior_max": np.nanmax(s["behavior"], 0),
            "pupil_min": np.nanmin(s["pupil_center"], 0),
            "pupil_max": np.nanmax(s["pupil_center"], 0),
        }
    std = out["response_std"]
    threshold = 0.01 * np.nanmean(std)
    precision = np.ones_like(std) / threshold
    precision[std > threshold] = 1 / std[std > threshold]
    out["precision"] = precision
    out["mean_response"] = np.nanmean(s["responses"] * precision, axis=(0, 1))
    return out


def test_viv1t_normalisation_is_its_formula(tiny_stores: Path, tmp_path: Path) -> None:
    """``data.normalization: viv1t`` = ViV1T's ``transform_mode=2`` with its own train-tier statistics: videos
    ``(x − mean) / (std − mean)``, behaviour and pupil centre per-frame min–max, responses × its precision; scored
    reads on the competition's scale with the ratio of the two precisions as the prediction factor."""
    root = copy_stores(tiny_stores, tmp_path / "stores")
    dm = SensoriumDataModule(root=str(root), frames=20, normalization="viv1t")
    mouse = dm.mouse_ids[0]
    store = dm.stores[mouse]
    hand = _viv1t_by_hand(store)
    trial = int(store.trials("oracle")[0])
    x = store.read(trial, 10, 30)
    f = slice(10, 30)
    sample = dm._read(mouse, trial, 10, 30, scored=False)
    video = (x["videos"] - hand["video_mean"][f]) / (hand["video_std"][f] - hand["video_mean"][f])
    np.testing.assert_allclose(sample["video"][0].numpy(), video, rtol=1e-4, atol=1e-5)
    behavior = (x["behavior"] - hand["behavior_min"][f]) / (hand["behavior_max"][f] - hand["behavior_min"][f])
    np.testing.assert_allclose(sample["behavior"].numpy(), behavior.T, rtol=1e-4, atol=1e-5)
    pupil = (x["pupil_center"] - hand["pupil_min"][f]) / (hand["pupil_max"][f] - hand["pupil_min"][f])
    np.testing.assert_allclose(sample["pupil_center"].numpy(), pupil.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sample["responses"].numpy(), (x["responses"] * hand["precision"][f]).T, rtol=1e-4)
    assert "response_scale" not in sample
    official_video = SensoriumDataModule(root=str(root), frames=20)._read(mouse, trial, 10, 30, scored=False)["video"]
    assert not np.allclose(official_video.numpy(), sample["video"].numpy(), atol=0.1)
    scored = dm._read(mouse, trial, 10, 30)
    official = _official_precision(store)[f]
    np.testing.assert_allclose(scored["responses"].numpy(), (x["responses"] * official).T, rtol=1e-5)
    np.testing.assert_allclose(scored["response_scale"].numpy(), (official / hand["precision"][f]).T, rtol=1e-4)
    np.testing.assert_allclose(dm.neurons[mouse].mean_responses, hand["mean_response"], rtol=1e-4)
    # Cached beside the store, keyed by the store: a second data module reads the file, not the trials.
    cache = root / f"{Path(store.path).name}.viv1t-statistics.npz"
    assert cache.is_file()
    again = viv1t_statistics(MouseStore(store.path))
    np.testing.assert_array_equal(again["response_std"], viv1t_statistics(store)["response_std"])
    with pytest.raises(ValueError, match="data.input_statistics"):
        Normalizer(store, "viv1t", "time_averaged")
    with pytest.raises(ValueError, match="data.response_scale"):
        Normalizer(store, "viv1t", response_scale=True)
    with pytest.raises(ValueError, match=r"data.normalization='zscore'.*viv1t"):
        Normalizer(store, "zscore")  # type: ignore[arg-type]


def test_viv1t_cache_is_recomputed_for_another_store(tiny_stores: Path, tmp_path: Path) -> None:
    root = copy_stores(tiny_stores, tmp_path / "stores")
    path = sorted(root.glob("*.zarr"))[0]
    first = viv1t_statistics(MouseStore(path))
    cache = root / f"{path.name}.viv1t-statistics.npz"
    stale = dict(np.load(cache))
    stale["key"] = np.array("another store")
    stale["response_std"] = stale["response_std"] * 2
    with open(cache, "wb") as f:
        np.savez(f, **stale)
    np.testing.assert_array_equal(viv1t_statistics(MouseStore(path))["response_std"], first["response_std"])


def test_a_scale_that_cannot_apply_is_an_error(tiny_stores: Path, tmp_path: Path) -> None:
    """No response statistics, or statistics that end before the longest trial: an error naming the mouse."""

    def drop(g: zarr.Group) -> None:
        del g["statistics/responses"]["std"]

    def shorten(g: zarr.Group) -> None:
        std = np.asarray(g["statistics/responses/std"][...])
        del g["statistics/responses"]["std"]
        g["statistics/responses"].create_array("std", data=std[:100])

    for name, edit, match in (
        ("missing", drop, "no readable statistics/responses/std"),
        ("short", shorten, r"frames 100–\d+ have no precision"),
    ):
        root = copy_stores(tiny_stores, tmp_path / name, edit)
        for normalization in ("raw", "official", "viv1t"):
            with pytest.raises(ValueError, match=f"mouse synthetic0-.*{match}"):
                SensoriumDataModule(root=str(root), frames=20, normalization=normalization)  # type: ignore[arg-type]
