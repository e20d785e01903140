"""Release → zarr: exact round trip, official lengths, content-derived clip ids and OOD labels, errors, atomicity,
idempotence."""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr

from lightning_sensorium.data import store_writer
from lightning_sensorium.data.content import block_means, group_clips, same_clip
from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.layout import STATISTICS, STIMULUS_TYPES, TIERS
from lightning_sensorium.data.normalization import response_precision
from lightning_sensorium.data.release import ConversionError
from lightning_sensorium.data.store import MouseStore
from tests.conftest import sessions

TIME_FIRST = {"videos": (2, 0, 1), "responses": (1, 0), "behavior": (1, 0), "pupil_center": (1, 0)}


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two labelings group the items identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def _truth(release: Path, session: str, name: str) -> np.ndarray:
    return np.load(release / "ground_truth" / session / name)


# ------------------------------------------------------------------------------------------------ round trip
def test_values_equal_the_sources_time_first(tiny_release: Path, tiny_stores: Path) -> None:
    for session in sessions(tiny_release):
        store = MouseStore(tiny_stores / f"{session.name}.zarr")
        root = zarr.open_group(tiny_stores / f"{session.name}.zarr", mode="r")
        assert store.mouse_id == session.name
        assert store.tier_names() == np.load(session / "meta/trials/tiers.npy").tolist()
        np.testing.assert_array_equal(store.unit_ids, np.load(session / "meta/neurons/unit_ids.npy"))
        np.testing.assert_array_equal(store.coordinates, np.load(session / "meta/neurons/cell_motor_coordinates.npy"))
        np.testing.assert_array_equal(store.trial_index, np.arange(store.num_trials))
        for i in range(store.num_trials):
            length = int(store.length[i])
            for key, dims in (
                ("videos", (2, 0, 1)),
                ("responses", (1, 0)),
                ("behavior", (1, 0)),
                ("pupil_center", (1, 0)),
            ):
                source = np.load(session / f"data/{key}/{i}.npy").transpose(dims)  # time first
                stored = np.asarray(root[key][i])
                np.testing.assert_array_equal(stored[:length], source[:length], err_msg=f"{key} {i}")
                assert not stored[length:].any(), f"{key} {i}: frames past the length must be 0"
            rates = np.load(tiny_release / "ground_truth" / session.name / f"rates/{i}.npy").T
            np.testing.assert_array_equal(np.asarray(root["ground_truth/rates"][i])[:length], rates[:length])
        for key in ("videos", "responses", "behavior", "pupil_center"):
            for stat in STATISTICS:
                source = np.load(session / f"meta/statistics/{key}/all/{stat}.npy")
                np.testing.assert_array_equal(store.statistics[key][stat], np.moveaxis(source, -1, 0))


def test_lengths_follow_the_official_rule(tiny_release: Path, tiny_stores: Path) -> None:
    seen = set()
    for session in sessions(tiny_release):
        store = MouseStore(tiny_stores / f"{session.name}.zarr")
        types = _truth(tiny_release, session.name, "stimulus_types.npy")
        for i in range(store.num_trials):
            recorded = int((~np.isnan(np.load(session / f"data/pupil_center/{i}.npy")[0])).sum())
            # First NaN of any element of any key (the partially NaN last frame), capped at 300.
            assert store.length[i] == min(recorded - 1, 300), (i, types[i], recorded)
            if types[i] == "natural":
                assert store.length[i] == 299
            if types[i] == "random_dots":
                assert store.length[i] == 239
            seen.add(int(store.length[i]))
    assert {239, 299, 300} <= seen


def test_clip_ids_and_stimulus_types_match_the_generator(tiny_release: Path, tiny_stores: Path) -> None:
    for session in sessions(tiny_release):
        store = MouseStore(tiny_stores / f"{session.name}.zarr")
        assert _same_partition(store.clip_id, _truth(tiny_release, session.name, "clip_ids.npy"))
        assert store.stimulus_type_names() == _truth(tiny_release, session.name, "stimulus_types.npy").tolist()
        np.testing.assert_array_equal(store.ground_truth["clip_id"], _truth(tiny_release, session.name, "clip_ids.npy"))


def test_per_neuron_statistics(tiny_release: Path, tiny_stores: Path) -> None:
    session = sessions(tiny_release)[0]
    store = MouseStore(tiny_stores / f"{session.name}.zarr")
    std = np.load(session / "meta/statistics/responses/all/std.npy").astype(np.float64)  # (N, T_pad)
    precision = response_precision(std, dtype=np.float64)
    raw, normalized = [], []
    for i in store.trials(["train"]):
        r = np.load(session / f"data/responses/{i}.npy")[:, : store.length[i]].astype(np.float64)
        raw.append(r)
        normalized.append(r * precision[:, : store.length[i]])
    for name, parts in (("raw", raw), ("normalized", normalized)):
        x = np.concatenate(parts, axis=1)  # (N, all valid train frames)
        got = store.neuron_statistics[name]
        np.testing.assert_allclose(got["mean"], x.mean(axis=1), rtol=1e-5)
        np.testing.assert_allclose(got["std"], x.std(axis=1), rtol=1e-4)


def test_store_contract(tiny_stores: Path) -> None:
    path = next(tiny_stores.glob("*.zarr"))
    root = zarr.open_group(path, mode="r")
    arrays = {name: a for name, a in root.members(max_depth=None) if isinstance(a, zarr.Array)}
    for name, a in arrays.items():
        names = a.metadata.dimension_names
        assert names is not None and len(names) == a.ndim and all(names), name
    dims = {
        "videos": ("trial", "frame", "height", "width"),
        "responses": ("trial", "frame", "neuron"),
        "behavior": ("trial", "frame", "signal"),
        "pupil_center": ("trial", "frame", "coordinate"),
        "length": ("trial",),
        "tier": ("trial",),
        "clip_id": ("trial",),
        "stimulus_type": ("trial",),
        "trial_index": ("trial",),
        "hidden": ("trial",),
        "unit_ids": ("neuron",),
        "coordinates": ("neuron", "axis"),
        "statistics/responses/std": ("frame", "neuron"),
        "statistics/responses_per_neuron/normalized/mean": ("neuron",),
        "ground_truth/rates": ("trial", "frame", "neuron"),
    }
    for name, names in dims.items():
        assert tuple(arrays[name].metadata.dimension_names) == names, name
    assert arrays["videos"].dtype == np.uint8
    assert arrays["responses"].dtype == np.float32
    assert arrays["hidden"].dtype == np.bool_
    assert arrays["responses"].chunks == (1, *arrays["responses"].shape[1:])  # one raw chunk per trial
    assert not arrays["responses"].compressors
    for key in ("videos", "responses", "behavior", "pupil_center"):
        assert not np.isnan(np.asarray(arrays[key][...], dtype=np.float64)).any(), key
    assert arrays["tier"].attrs["flag_meanings"].split() == [*TIERS, "none"]
    assert arrays["stimulus_type"].attrs["flag_meanings"].split() == list(STIMULUS_TYPES)
    attrs = root.attrs
    for key in ("session", "mouse_id", "num_neurons", "num_trials", "t_pad", "format_version", "source_fingerprint"):
        assert key in attrs, key
    assert attrs["session"] == attrs["mouse_id"] == path.name[: -len(".zarr")]
    assert attrs["tier_labels"] == [*TIERS, "none"] and attrs["stimulus_type_labels"] == list(STIMULUS_TYPES)
    assert root["statistics/videos/mean"].shape == (attrs["t_pad"], 36, 64)


def test_hidden_tiers_are_flagged(tiny_release_hidden: Path, tmp_path: Path) -> None:
    (path,) = convert([tiny_release_hidden], tmp_path, progress=False)
    store = MouseStore(path)
    test = np.array([t.startswith(("live_test", "final_test")) for t in store.tier_names()])
    np.testing.assert_array_equal(store.hidden, test)
    assert (store.length[test] >= 239).all()  # zeros do not cut the length
    for i in np.flatnonzero(test)[:3]:
        assert not store.read(int(i), 0, int(store.length[i]))["responses"].any()


# ------------------------------------------------------------------------------------------------ heuristics
def test_same_clip_tolerates_one_grey_level() -> None:
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (100, 36, 64)).astype(np.float32)
    jitter = clip + rng.integers(-1, 2, clip.shape)
    assert same_clip(clip, jitter)
    changed = jitter.copy()
    changed[:14, 0, 0] += 5  # 14 % of the frames differ: still the same clip
    assert same_clip(clip, changed)
    changed[:16, 0, 0] += 5  # 16 %: no longer
    assert not same_clip(clip, changed)
    assert not same_clip(clip, clip[:80])  # 80 of 100 frames in common


def test_group_clips_by_content() -> None:
    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, (60, 36, 64)).astype(np.float32) for _ in range(4)]
    truth = np.array([0, 1, 0, 2, 3, 1, 0, 2, 2])
    videos = [clips[c] + rng.integers(0, 2, clips[c].shape) for c in truth]  # repeats differ by ≤ 1 grey level
    frames = 60
    means = np.stack([v.reshape(frames, -1).mean(axis=1) for v in videos])
    blocks = np.stack([block_means(v) for v in videos])
    loads: list[int] = []

    def load(i: int) -> np.ndarray:
        loads.append(i)
        return videos[i]

    ids = group_clips(np.full(len(truth), frames), means, blocks, load)
    assert _same_partition(ids, truth)
    assert len(loads) <= len(truth) + 4  # only candidates are verified on pixels (representatives are cached)


def test_all_ood_families_are_recognised(tmp_path: Path) -> None:
    from lightning_sensorium.data.synthetic import synthesize

    # Mice 2 and 3 see the families mice 0 and 1 do not, so four mice cover all five.
    release = tmp_path / "r"
    synthesize(release, mice=4, neurons=4, train_trials=1, clips_per_tier=1, repeats=2, progress=False, workers=1)
    seen = set()
    for path in convert([release], tmp_path / "s", progress=False):
        store = MouseStore(path)
        truth = _truth(release, store.mouse_id, "stimulus_types.npy").tolist()
        assert store.stimulus_type_names() == truth
        assert _same_partition(store.clip_id, _truth(release, store.mouse_id, "clip_ids.npy"))
        seen |= set(truth)
    assert seen == set(STIMULUS_TYPES)


# ------------------------------------------------------------------------------------------ sources, re-runs
def _zip_session(session: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(session.rglob("*")):
            if p.is_file():
                zf.write(p, f"{session.name}/{p.relative_to(session)}")
        zf.writestr(f"__MACOSX/{session.name}/data/videos/._0.npy", b"resource fork junk")
    return archive


def test_zip_source_gives_the_same_store(tiny_release: Path, tiny_stores: Path, tmp_path: Path) -> None:
    session = sessions(tiny_release)[0]
    archive = _zip_session(session, tmp_path / f"{session.name}.zip")
    (path,) = convert([archive], tmp_path / "out", progress=False)
    a = zarr.open_group(path, mode="r")
    b = zarr.open_group(tiny_stores / f"{session.name}.zarr", mode="r")
    truth = ("ground_truth", "checksums/rates")  # the zip holds no ground truth
    names = {n for n, x in b.members(max_depth=None) if isinstance(x, zarr.Array) and not n.startswith(truth)}
    assert names == {n for n, x in a.members(max_depth=None) if isinstance(x, zarr.Array)}
    for name in sorted(names):
        np.testing.assert_array_equal(np.asarray(a[name][...]), np.asarray(b[name][...]), err_msg=name)
    assert a.attrs["mouse_id"] == b.attrs["mouse_id"] and not a.attrs["has_ground_truth"]


def test_folder_of_zips(tiny_release: Path, tmp_path: Path) -> None:
    src = tmp_path / "downloads"
    src.mkdir()
    for s in sessions(tiny_release):
        _zip_session(s, src / f"{s.name}.zip")
    paths = convert([src], tmp_path / "out", progress=False)
    assert [p.name for p in paths] == [f"{s.name}.zarr" for s in sessions(tiny_release)]


def test_idempotent(tiny_release: Path, tiny_stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = next(tiny_stores.glob("*.zarr"))
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    convert([tiny_release], tiny_stores, progress=False)
    assert capsys.readouterr().out.count("up to date") == len(sessions(tiny_release))
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before
    assert sorted(p.name for p in tiny_stores.iterdir()) == sorted(f"{s.name}.zarr" for s in sessions(tiny_release))


def _copy_session(tiny_release: Path, tmp_path: Path) -> Path:
    src = sessions(tiny_release)[0]
    dst = tmp_path / "src" / src.name
    shutil.copytree(src, dst)
    return dst


def test_changed_source_needs_overwrite(tiny_release: Path, tmp_path: Path) -> None:
    session = _copy_session(tiny_release, tmp_path)
    out = tmp_path / "out"
    convert([session], out, progress=False)
    responses = np.load(session / "data/responses/0.npy")
    np.save(session / "data/responses/0.npy", responses * 2)  # same size, new content (and mtime)
    with pytest.raises(ConversionError, match="already exists and was built from another source"):
        convert([session], out, progress=False)
    (path,) = convert([session], out, overwrite=True, progress=False)
    length = int(MouseStore(path).length[0])
    np.testing.assert_array_equal(MouseStore(path).read(0, 0, length)["responses"], 2 * responses[:, :length].T)
    assert sorted(p.name for p in out.iterdir()) == [f"{session.name}.zarr"]


def test_older_format_from_the_same_source_is_rebuilt(
    tiny_release: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    session = _copy_session(tiny_release, tmp_path)
    (path,) = convert([session], tmp_path / "out", progress=False)
    zarr.open_group(path, mode="r+").attrs.update({"format_version": 2, "source_fingerprint": "old"})
    convert([session], tmp_path / "out", progress=False)
    assert f"rebuilding (format 2 → {store_writer.FORMAT_VERSION})" in capsys.readouterr().out
    assert zarr.open_group(path, mode="r").attrs["format_version"] == store_writer.FORMAT_VERSION


def test_output_that_is_not_a_store(tiny_release: Path, tmp_path: Path) -> None:
    session = _copy_session(tiny_release, tmp_path)
    out = tmp_path / "out"
    (out / f"{session.name}.zarr").mkdir(parents=True)
    (out / f"{session.name}.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not a lightning_sensorium store"):
        convert([session], out, progress=False)
    assert (out / f"{session.name}.zarr" / "notes.txt").read_text() == "mine"
    convert([session], out, overwrite=True, progress=False)
    assert MouseStore(out / f"{session.name}.zarr").mouse_id == session.name


def test_hidden_files_are_ignored(tiny_release: Path, tmp_path: Path) -> None:
    session = _copy_session(tiny_release, tmp_path)
    (session / "data" / "videos" / ".DS_Store").write_bytes(b"finder")  # glob("*") skips it too
    (path,) = convert([session], tmp_path / "out", progress=False)
    assert MouseStore(path).num_trials == len(np.load(session / "meta/trials/tiers.npy"))


def test_videos_that_are_not_grey_levels_stay_float(tiny_release: Path, tmp_path: Path) -> None:
    session = _copy_session(tiny_release, tmp_path)
    n = len(np.load(session / "meta/trials/tiers.npy"))
    video = np.load(session / f"data/videos/{n - 1}.npy")
    video[0, 0, 0] += 0.5  # found only at the last trial: the converter starts again with float32
    np.save(session / f"data/videos/{n - 1}.npy", video)
    (path,) = convert([session], tmp_path / "out", progress=True)
    store = MouseStore(path)
    window = store.read(n - 1, 0, 10)["videos"]
    assert window.dtype == np.float32 and window[0, 0, 0] == video[0, 0, 0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [path.name]


def test_interrupted_write_leaves_nothing(tiny_release: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _copy_session(tiny_release, tmp_path)
    calls = []

    def failing(video: np.ndarray) -> str:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return "pink_noise"

    monkeypatch.setattr(store_writer, "classify_stimulus", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert([session], out, progress=False)
    assert not out.exists()


# --------------------------------------------------------------------------------------------- bad input
def _missing_folder(s: Path) -> None:
    shutil.rmtree(s / "data" / "pupil_center")


def _unequal_counts(s: Path) -> None:
    (s / "data" / "behavior" / "0.npy").unlink()


def _stray_file(s: Path) -> None:
    (s / "data" / "videos" / "notes.txt").write_text("x")


def _misnamed_file(s: Path) -> None:
    (s / "data" / "videos" / "3.npy").rename(s / "data" / "videos" / "x.npy")


def _shape_mismatch(s: Path) -> None:
    np.save(s / "data" / "responses" / "3.npy", np.zeros((5, 7), dtype=np.float32))


def _statistics_shape(s: Path) -> None:
    np.save(s / "meta/statistics/videos/all/std.npy", np.zeros((36, 64, 7), dtype=np.float32))


def _unknown_tier(s: Path) -> None:
    tiers = np.load(s / "meta/trials/tiers.npy")
    tiers[0] = "validation"
    np.save(s / "meta/trials/tiers.npy", tiers)


def _corrupt(s: Path) -> None:
    (s / "data" / "videos" / "2.npy").write_bytes(b"not an npy file")


def _truncated(s: Path) -> None:
    p = s / "data" / "responses" / "5.npy"
    p.write_bytes(p.read_bytes()[:-100])


def _nan_behaviour(s: Path) -> None:
    b = np.load(s / "data/behavior/4.npy")
    b[1, 7] = np.nan
    np.save(s / "data/behavior/4.npy", b)


def _missing_meta(s: Path) -> None:
    (s / "meta/neurons/unit_ids.npy").unlink()


def _missing_tiers(s: Path) -> None:
    (s / "meta/trials/tiers.npy").unlink()


BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing folder": (_missing_folder, r"data/pupil_center: missing folder"),
    "unequal counts": (_unequal_counts, r"data/behavior: \d+ files, but meta/trials/tiers.npy lists \d+ trials"),
    "stray file": (_stray_file, r"data/videos: \d+ files"),
    "misnamed file": (_misnamed_file, r"data/videos: unexpected file\(s\) \['x.npy'\]"),
    "shape mismatch": (_shape_mismatch, r"data/responses/3.npy: shape \(5, 7\), expected \(24, \d+\)"),
    "statistics shape": (_statistics_shape, r"statistics/videos/all/std.npy: shape \(36, 64, 7\), expected"),
    "unknown tier": (_unknown_tier, r"tiers.npy: unknown tier\(s\) \['validation'\]"),
    "corrupt npy": (_corrupt, r"data/videos/2.npy: not a readable .npy file"),
    "truncated npy": (_truncated, r"data/responses/5.npy: not a readable .npy file .*header promises"),
    "nan behaviour": (_nan_behaviour, r"data/behavior/4.npy: NaN in behaviour \(first at frame 7\)"),
    "missing meta": (_missing_meta, r"meta/neurons/unit_ids.npy: missing file"),
    "missing tiers": (_missing_tiers, r"meta/trials/tiers.npy: missing file"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_input_writes_nothing(case: str, tiny_release: Path, tmp_path: Path) -> None:
    breaker, message = BREAKS[case]
    session = _copy_session(tiny_release, tmp_path)
    breaker(session)
    good = sessions(tiny_release)[1]  # a valid mouse given first: it must not be written either
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert([good, session], out, progress=False)
    assert not out.exists()


@pytest.mark.parametrize("case", ["shape mismatch", "nan behaviour"])
def test_bad_zip_member(case: str, tiny_release: Path, tmp_path: Path) -> None:
    breaker, message = BREAKS[case]
    session = _copy_session(tiny_release, tmp_path)
    breaker(session)
    archive = _zip_session(session, tmp_path / "bad.zip")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConversionError, match=message.replace("data/", r"bad.zip:\S*/data/", 1)):
        convert([archive], out, progress=False)
    assert os.listdir(out) == []


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no such file or folder"):
        convert([tmp_path / "nope"], tmp_path / "out", progress=False)
    (tmp_path / "broken.zip").write_bytes(b"PK not really")
    with pytest.raises(ConversionError, match="not a readable .zip archive"):
        convert([tmp_path / "broken.zip"], tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="neither a session folder"):
        convert([tmp_path / "empty"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _set(s: Path, key: str, trial: int, index: tuple[int, ...], value: float) -> None:
    path = s / "data" / key / f"{trial}.npy"
    x = np.load(path)
    x[index] = value
    np.save(path, x)


VALUE_BREAKS: dict[str, tuple[Callable[[Path], None], str]] = {
    "inf response": (
        lambda s: _set(s, "responses", 3, (2, 40), np.inf),
        r"data/responses/3.npy: Inf at frame 40; the release holds finite values",
    ),
    "inf video": (lambda s: _set(s, "videos", 1, (5, 6, 0), -np.inf), r"data/videos/1.npy: Inf at frame 0"),
    "inf behaviour": (lambda s: _set(s, "behavior", 4, (1, 30), np.inf), r"data/behavior/4.npy: Inf at frame 30"),
    "inf pupil centre": (
        lambda s: _set(s, "pupil_center", 5, (0, 12), -np.inf),
        r"data/pupil_center/5.npy: Inf at frame 12",
    ),
    "nan gap in pupil centre": (
        lambda s: _set(s, "pupil_center", 2, (0, 10), np.nan),
        r"data/pupil_center/2.npy: NaN at frame 10 with data after it \(frame 11\)",
    ),
    "nan gap in responses": (
        lambda s: _set(s, "responses", 0, (7, 100), np.nan),
        r"data/responses/0.npy: NaN at frame 100 with data after it",
    ),
}


@pytest.mark.parametrize("case", sorted(VALUE_BREAKS))
def test_non_finite_values_are_refused(case: str, tiny_release: Path, tmp_path: Path) -> None:
    """Checked while the store is written (reading every value twice would double a release's conversion): the bad
    store is not kept, and the message names the file, trial and frame."""
    breaker, message = VALUE_BREAKS[case]
    session = _copy_session(tiny_release, tmp_path)
    breaker(session)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert([session], out, progress=False)
    assert not out.exists() or not list(out.iterdir())


def test_a_nan_that_cuts_a_trial_short_is_reported(
    tiny_release: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    session = _copy_session(tiny_release, tmp_path)
    x = np.load(session / "data/pupil_center/6.npy")
    x[:, 120:] = np.nan  # the pupil tracking stops early: the official rule cuts the whole trial there
    np.save(session / "data/pupil_center/6.npy", x)
    with caplog.at_level("WARNING"):
        (store,) = convert([session], tmp_path / "out", progress=False)
    assert any(
        "data/pupil_center/6.npy: NaN from frame 120 cuts the trial short" in r.getMessage() for r in caplog.records
    )
    assert MouseStore(store).length[list(MouseStore(store).trial_index).index(6)] == 120
