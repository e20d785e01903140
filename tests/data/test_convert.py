"""Release → zarr: exact round trip, content-derived clip ids and OOD labels, errors, atomicity, idempotence."""

from __future__ import annotations

import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from lightning_sensorium.data.convert import ConversionError, convert
from lightning_sensorium.data.layout import STIMULUS_TYPES
from lightning_sensorium.data.store import MouseStore
from tests.conftest import sessions


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two labelings group the items identically (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_round_trip(tiny_release: Path, tiny_stores: Path) -> None:
    for session in sessions(tiny_release):
        store = MouseStore(tiny_stores / f"{session.name}.zarr")
        tiers = np.load(session / "meta/trials/tiers.npy")
        assert store.mouse_id == session.name and store.num_trials == len(tiers)
        assert store.tier_names() == tiers.tolist()
        np.testing.assert_array_equal(store.unit_ids, np.load(session / "meta/neurons/unit_ids.npy"))
        gt = tiny_release / "ground_truth" / session.name
        assert _same_partition(store.clip_id, np.load(gt / "clip_ids.npy"))
        assert store.stimulus_type_names() == np.load(gt / "stimulus_types.npy").tolist()
        for i in range(store.num_trials):
            pupil = np.load(session / f"data/pupil_center/{i}.npy")
            length = int((~np.isnan(pupil[0])).sum())
            # Official rule: first NaN of any element of any key (the partial last frame), capped at 300.
            assert store.length[i] == min(length - 1, 300)
            window = store.read(i, 0, int(store.length[i]), rates=True)
            video = np.load(session / f"data/videos/{i}.npy")[..., : store.length[i]].transpose(2, 0, 1)
            np.testing.assert_array_equal(window["videos"], video)
            resp = np.load(session / f"data/responses/{i}.npy")[:, : store.length[i]].T
            np.testing.assert_allclose(window["responses"], resp)
            np.testing.assert_allclose(
                window["behavior"], np.load(session / f"data/behavior/{i}.npy")[:, : store.length[i]].T
            )
            np.testing.assert_allclose(window["pupil_center"], pupil[:, : store.length[i]].T)
            rates = np.load(gt / "rates" / f"{i}.npy")[:, : store.length[i]].T
            np.testing.assert_allclose(window["rates"], rates)
        stats = store.statistics["responses"]["std"]
        np.testing.assert_allclose(stats, np.load(session / "meta/statistics/responses/all/std.npy").T)
        assert not store.hidden.any()


def test_store_contract(tiny_stores: Path) -> None:
    path = next(tiny_stores.glob("*.zarr"))
    root = zarr.open_group(path, mode="r")
    dims = {
        "videos": ["trial", "frame", "height", "width"],
        "responses": ["trial", "frame", "neuron"],
        "behavior": ["trial", "frame", "signal"],
        "pupil_center": ["trial", "frame", "coordinate"],
        "length": ["trial"],
        "tier": ["trial"],
        "clip_id": ["trial"],
        "stimulus_type": ["trial"],
        "trial_index": ["trial"],
        "hidden": ["trial"],
        "unit_ids": ["neuron"],
        "coordinates": ["neuron", "axis"],
    }
    for name, names in dims.items():
        assert list(root[name].metadata.dimension_names) == names, name
    assert root["videos"].dtype == np.uint8
    assert root["stimulus_type"].attrs["flag_meanings"].split() == list(STIMULUS_TYPES)
    assert root.attrs["session"] == path.name[: -len(".zarr")]
    assert root["statistics/videos/mean"].shape[1:] == (36, 64)


def test_all_ood_families_are_recognised(tmp_path: Path) -> None:
    from lightning_sensorium.data.synthetic import synthesize

    # Mice 2 and 3 see the families mouse 0 and 1 do not (live: image / gabor; final: the rest).
    release = tmp_path / "r"
    synthesize(release, mice=4, neurons=4, train_trials=1, clips_per_tier=1, repeats=2, progress=False, workers=1)
    stores = convert([release], tmp_path / "s", progress=False)
    seen = set()
    for path in stores:
        store = MouseStore(path)
        truth = np.load(release / "ground_truth" / store.mouse_id / "stimulus_types.npy").tolist()
        assert store.stimulus_type_names() == truth
        seen |= set(truth)
    assert seen == set(STIMULUS_TYPES)


def test_hidden_tiers_are_flagged(tiny_release_hidden: Path, tmp_path: Path) -> None:
    (path,) = convert([tiny_release_hidden], tmp_path, progress=False)
    store = MouseStore(path)
    test = np.array(["test" in t for t in store.tier_names()])
    np.testing.assert_array_equal(store.hidden, test)
    assert (store.length[test] > 200).all()  # zeros do not cut the length


def test_zip_source_gives_the_same_store(tiny_release: Path, tiny_stores: Path, tmp_path: Path) -> None:
    session = sessions(tiny_release)[0]
    archive = tmp_path / f"{session.name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(session.rglob("*")):
            if p.is_file():
                zf.write(p, f"{session.name}/{p.relative_to(session)}")
        zf.writestr(f"__MACOSX/{session.name}/._junk", b"x")
    (path,) = convert([archive], tmp_path / "out", progress=False)
    a, b = MouseStore(path), MouseStore(tiny_stores / f"{session.name}.zarr")
    np.testing.assert_array_equal(a.clip_id, b.clip_id)
    np.testing.assert_array_equal(a.length, b.length)
    np.testing.assert_array_equal(a.read(3, 10, 90)["responses"], b.read(3, 10, 90)["responses"])


def test_idempotent(tiny_release: Path, tiny_stores: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = next(tiny_stores.glob("*.zarr"))
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    convert([tiny_release], tiny_stores, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_store_pickles_and_reads_after(tiny_stores: Path) -> None:
    store = MouseStore(next(tiny_stores.glob("*.zarr")))
    window = store.read(0, 5, 25)
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone.read(0, 5, 25)["responses"], window["responses"])
    assert window["videos"].shape == (20, 36, 64)


# --------------------------------------------------------------------------------------------- bad input
def _broken_copy(tiny_release: Path, tmp_path: Path) -> Path:
    src = sessions(tiny_release)[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _break_missing_folder(s: Path) -> None:
    shutil.rmtree(s / "data" / "pupil_center")


def _break_unequal_counts(s: Path) -> None:
    (s / "data" / "behavior" / "0.npy").unlink()


def _break_stray_file(s: Path) -> None:
    (s / "data" / "videos" / "notes.txt").write_text("x")


def _break_shape(s: Path) -> None:
    np.save(s / "data" / "responses" / "3.npy", np.zeros((5, 7), dtype=np.float32))


def _break_unknown_tier(s: Path) -> None:
    tiers = np.load(s / "meta/trials/tiers.npy")
    tiers[0] = "validation"
    np.save(s / "meta/trials/tiers.npy", tiers)


def _break_corrupt(s: Path) -> None:
    (s / "data" / "videos" / "2.npy").write_bytes(b"not an npy file")


def _break_nan_behaviour(s: Path) -> None:
    b = np.load(s / "data/behavior/4.npy")
    b[1, 7] = np.nan
    np.save(s / "data/behavior/4.npy", b)


def _break_missing_meta(s: Path) -> None:
    (s / "meta/neurons/unit_ids.npy").unlink()


BREAKS = {
    "missing folder": (_break_missing_folder, "data/pupil_center: missing folder"),
    "unequal counts": (_break_unequal_counts, "data/behavior"),
    "stray file": (_break_stray_file, "data/videos"),
    "shape mismatch": (_break_shape, "responses/3.npy: shape"),
    "unknown tier": (_break_unknown_tier, "unknown tier"),
    "corrupt npy": (_break_corrupt, "videos/2.npy: not a readable"),
    "nan behaviour": (_break_nan_behaviour, "behavior/4.npy: NaN"),
    "missing meta": (_break_missing_meta, "unit_ids.npy: missing"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_bad_input_writes_nothing(case: str, tiny_release: Path, tmp_path: Path) -> None:
    breaker, message = BREAKS[case]
    session = _broken_copy(tiny_release, tmp_path / "src")
    breaker(session)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message):
        convert([session], out, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_existing_store_from_another_source(tiny_release: Path, tmp_path: Path) -> None:
    session = _broken_copy(tiny_release, tmp_path / "src")
    out = tmp_path / "out"
    convert([session], out, progress=False)
    _break_unknown_tier(session)
    tiers = np.load(session / "meta/trials/tiers.npy")
    tiers[0] = "train"
    tiers[1] = "oracle" if tiers[1] == "train" else "train"  # a different, still valid source
    np.save(session / "meta/trials/tiers.npy", tiers)
    with pytest.raises(ConversionError, match="already exists"):
        convert([session], out, progress=False)
    convert([session], out, overwrite=True, progress=False)
    assert MouseStore(out / f"{session.name}.zarr").tier_names()[1] == tiers[1]
    assert sorted(p.name for p in out.iterdir()) == [f"{session.name}.zarr"]


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no such file"):
        convert([tmp_path / "nope"], tmp_path / "out", progress=False)
