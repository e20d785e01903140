"""`submit` and `score`: official file layout, validation before writing, and score == evaluate."""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_sensorium.cli import main
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.store import MouseStore
from lightning_sensorium.scoring import score_submission
from lightning_sensorium.submission import SubmissionBuilder, submit
from lightning_sensorium.submission_format import FILE_NAMES, SubmissionError, schema, tier_of_file
from tests.test_evaluate import _precision, fitted, fitted_raw

MAIN = ("live_test_main", "final_test_main")


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path) -> dict[str, Any]:
    return fitted(tmp_path_factory, tiny_stores)


@pytest.fixture(scope="module")
def dm(tiny_stores: Path) -> SensoriumDataModule:
    return SensoriumDataModule(root=str(tiny_stores), frames=24)


def _random_submission(dm: SensoriumDataModule, out: Path, track: str = "main", **kwargs: Any) -> list[Path]:
    """A valid submission of random predictions (no model needed)."""
    rng = np.random.default_rng(0)
    builder = SubmissionBuilder(out, dm.stores, track=track, **kwargs)  # type: ignore[arg-type]
    for (tier, mouse), rows in builder.expected.items():
        store = dm.stores[mouse]
        for row in sorted(rows):
            length = int(store.length[row])
            builder.add(mouse, tier, row, rng.random((store.num_neurons, length), dtype=np.float32), length)
    return builder.finish()


def test_submit_then_score_equals_evaluate(fits: dict[str, Any], tiny_stores: Path, tmp_path: Path) -> None:
    ckpt = fits["checkpoints"][0]
    out = tmp_path / "sub"
    assert main(["submit", "--ckpt_path", ckpt, "--out", str(out), "--accelerator", "cpu", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([FILE_NAMES[t] for t in MAIN] + ["submission_main.zip"])
    with zipfile.ZipFile(out / "submission_main.zip") as zf:
        assert sorted(zf.namelist()) == sorted(FILE_NAMES[t] for t in MAIN)  # at the zip's root
    scores, evals = tmp_path / "scores.json", tmp_path / "eval.json"
    args = ["score", str(out / "submission_main.zip"), "--data.root", str(tiny_stores), "--output", str(scores)]
    assert main(args) == 0
    args = ["evaluate", "--ckpt_path", ckpt, "--tiers", *MAIN, "--output", str(evals), "--accelerator", "cpu"]
    assert main([*args, "--quiet"]) == 0
    scored, evaluated = json.loads(scores.read_text())["tiers"], json.loads(evals.read_text())["tiers"]
    assert set(scored) == set(evaluated) == set(MAIN)
    for tier in MAIN:
        for name, value in evaluated[tier]["pooled"].items():
            assert scored[tier]["pooled"][name] == pytest.approx(value, abs=1e-6), (tier, name)
        for mouse, values in evaluated[tier]["per_mouse"].items():
            for name, value in values.items():
                assert scored[tier]["per_mouse"][mouse][name] == pytest.approx(value, abs=1e-6), (tier, mouse, name)


def test_parquet_files_read_as_the_site_reads_them(dm: SensoriumDataModule, tmp_path: Path) -> None:
    import pandas as pd

    written = _random_submission(dm, tmp_path / "bonus", track="bonus")
    names = sorted(p.name for p in written)
    assert names == sorted(
        [
            FILE_NAMES["live_test_bonus"],
            FILE_NAMES["final_test_bonus"],
            "submission_live_test_bonus.zip",
            "submission_final_test_bonus.zip",
        ]
    )
    for tier in ("live_test_bonus", "final_test_bonus"):
        with zipfile.ZipFile(tmp_path / "bonus" / f"submission_{tier}.zip") as zf:
            assert zf.namelist() == [FILE_NAMES[tier]]  # zipped separately, at the root
    path = tmp_path / "bonus" / FILE_NAMES["final_test_bonus"]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "BROTLI"
    # The schema the official `df.to_parquet(compression="brotli", engine="pyarrow", index=False)` writes.
    m0 = dm.mouse_ids[0]
    official = pd.DataFrame(
        {
            "mouse": [m0],
            "trial_indices": [3],
            "prediction": [np.zeros((2, 4), np.float32).tolist()],
            "neuron_ids": [np.asarray([1, 2]).astype(np.uint32)],
        }
    )
    official.to_parquet(tmp_path / "official.parquet.brotli", compression="brotli", engine="pyarrow", index=False)
    ours, theirs = pq.read_schema(path).remove_metadata(), pq.read_schema(tmp_path / "official.parquet.brotli")
    assert ours.names == theirs.names == ["mouse", "trial_indices", "prediction", "neuron_ids"]
    for name in ("trial_indices", "prediction", "neuron_ids"):
        assert ours.field(name).type == theirs.field(name).type, name
    assert pa.types.is_string(ours.field("mouse").type) or pa.types.is_large_string(ours.field("mouse").type)
    df = pd.read_parquet(path)
    for mouse in dm.mouse_ids:
        store = dm.stores[mouse]
        rows = store.trials("final_test_bonus")
        part = df[df["mouse"] == mouse]
        assert sorted(part["trial_indices"]) == sorted(store.trial_index[rows].tolist())
        row_of = {int(store.trial_index[r]): int(r) for r in rows}
        for _, rec in part.iterrows():
            pred = np.stack(rec["prediction"])  # (N, F)
            assert pred.shape == (store.num_neurons, int(store.length[row_of[rec["trial_indices"]]]) - 50)
            assert np.array_equal(np.asarray(rec["neuron_ids"]), store.unit_ids)


def _builder(dm: SensoriumDataModule, out: Path) -> tuple[SubmissionBuilder, str, int, int, int]:
    builder = SubmissionBuilder(out, dm.stores, track="main")
    mouse = dm.mouse_ids[0]
    row = int(dm.stores[mouse].trials("live_test_main")[0])
    return builder, mouse, row, int(dm.stores[mouse].length[row]), dm.stores[mouse].num_neurons


def test_every_validation_failure_writes_nothing(dm: SensoriumDataModule, tmp_path: Path) -> None:
    out = tmp_path / "out"

    def nothing_written() -> None:
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left

    def fails(match: str, action: Any) -> None:
        builder, mouse, row, length, n = _builder(dm, out)

        def run() -> None:
            action(builder, mouse, row, length, n)
            builder.finish()

        with pytest.raises(SubmissionError, match=match):
            run()
        builder.abort()
        nothing_written()

    good = np.ones
    index = int(dm.stores[dm.mouse_ids[0]].trial_index[dm.stores[dm.mouse_ids[0]].trials("live_test_main")[0]])

    def with_nan(b: SubmissionBuilder, m: str, r: int, t: int, n: int) -> None:
        pred = good((n, t), np.float32)
        pred[3, 60] = np.nan
        b.add(m, "live_test_main", r, pred, t)

    fails(rf"trial_indices {index}: 1 non-finite .* neuron row 3, frame 60", with_nan)
    fails(r"inf", lambda b, m, r, t, n: b.add(m, "live_test_main", r, np.full((n, t), np.inf, np.float32), t))
    fails(r"expected \(24 neurons", lambda b, m, r, t, n: b.add(m, "live_test_main", r, good((n - 1, t)), t))
    fails(r"does not cover", lambda b, m, r, t, n: b.add(m, "live_test_main", r, good((n, t - 5)), t))
    fails(r"frames predicted, the trial has", lambda b, m, r, t, n: b.add(m, "live_test_main", r, good((n, t)), t - 1))

    def twice(b: SubmissionBuilder, m: str, r: int, t: int, n: int) -> None:
        b.add(m, "live_test_main", r, good((n, t)), t)
        b.add(m, "live_test_main", r, good((n, t)), t)

    fails(r"predicted twice", twice)
    train_row = int(dm.stores[dm.mouse_ids[0]].trials("train")[0])
    fails(r"not a live_test_main trial", lambda b, m, r, t, n: b.add(m, "live_test_main", train_row, good((n, t)), t))
    fails(r"not a main-track tier", lambda b, m, r, t, n: b.add(m, "final_test_bonus", r, good((n, t)), t))
    fails(
        r"trial\(s\) without prediction, trial_indices",
        lambda b, m, r, t, n: b.add(m, "live_test_main", r, good((n, t)), t),
    )
    with pytest.raises(SubmissionError, match="track 'ood'"):
        SubmissionBuilder(out, dm.stores, track="ood")  # type: ignore[arg-type]
    nothing_written()


def _rewrite(src: Path, dst: Path, change: Any) -> Path:
    rows = pq.read_table(src).to_pylist()
    rows = change(rows)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if rows and "neuron_ids" not in rows[0]:
        pq.write_table(pa.Table.from_pylist(rows), dst)
    else:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema()), dst, compression="brotli")
    return dst


def test_score_rejects_malformed_submissions(dm: SensoriumDataModule, tiny_stores: Path, tmp_path: Path) -> None:
    _random_submission(dm, tmp_path / "good")
    good = tmp_path / "good" / FILE_NAMES["live_test_main"]
    root = str(tiny_stores)
    res = score_submission(good, root)  # random predictions: valid, near-zero correlation
    assert abs(res["tiers"]["live_test_main"]["pooled"]["single_trial_corr"]) < 0.2
    name = FILE_NAMES["live_test_main"]

    def bad(change: Any, match: str) -> None:
        path = _rewrite(good, tmp_path / "bad" / name, change)
        with pytest.raises(SubmissionError, match=match):
            score_submission(path, root)

    def drop_column(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "neuron_ids"} for r in rows]

    def set_first(key: str, value: Any) -> Any:
        return lambda rows: [{**rows[0], key: value}, *rows[1:]]

    bad(drop_column, r"missing column\(s\) \['neuron_ids'\]")
    bad(set_first("mouse", "nobody"), "unknown mouse 'nobody'")
    bad(set_first("trial_indices", 99999), "trial_indices 99999 is not a live_test_main trial")
    bad(lambda rows: rows[1:], r"trial\(s\) missing, trial_indices")
    bad(lambda rows: [rows[0], *rows], "appears twice")
    bad(lambda rows: [{**rows[0], "neuron_ids": rows[0]["neuron_ids"][::-1]}, *rows[1:]], "neuron_ids differ")
    bad(lambda rows: [{**rows[0], "prediction": [p[:-1] for p in rows[0]["prediction"]]}, *rows[1:]], "frames")
    bad(lambda rows: [{**rows[0], "prediction": rows[0]["prediction"][:-1]}, *rows[1:]], "23 neuron rows")
    nan_row = [[float("nan")] + p[1:] for p in pq.read_table(good).to_pylist()[0]["prediction"]]
    bad(lambda rows: [{**rows[0], "prediction": nan_row}, *rows[1:]], "non-finite")
    with pytest.raises(SubmissionError, match="cannot tell the tier"):
        score_submission(_rewrite(good, tmp_path / "x" / "predictions.parquet", lambda r: r), root)
    # Through the command line: one clear line, exit code 2.
    assert main(["score", str(tmp_path / "bad" / name), "--data.root", root]) == 2


def test_file_names_and_folders(dm: SensoriumDataModule, tmp_path: Path) -> None:
    _random_submission(dm, tmp_path / "plain")
    # Folders and the starter kit's own names are scored too.
    assert score_submission(tmp_path / "plain", str(dm.root))["tiers"].keys() == {"live_test_main", "final_test_main"}
    assert tier_of_file("predictions_file_live_test_main_main_track.parquet.brotli") == "live_test_main"
    assert tier_of_file("x/predictions_file_final_test_bonus_ood_track.parquet.brotli") == "final_test_bonus"


def _predictions(folder: Path) -> dict[tuple[str, int], np.ndarray]:
    """``{(mouse, trial_indices): (N, F)}`` of the final main file in ``folder``."""
    rows = pq.read_table(folder / FILE_NAMES["final_test_main"]).to_pylist()
    return {(r["mouse"], r["trial_indices"]): np.asarray(r["prediction"]) for r in rows}


def test_submit_scales_a_raw_scale_model_by_default(
    fits: dict[str, Any], tiny_stores: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A model trained on raw responses is submitted on the competition's scale by default (× the official
    per-frame precision, frame by frame, as DwiseNeuro's `make_submission`); `--no-scale-by-precision` writes its
    own scale; the default's score equals `evaluate`. An official model is never scaled: asking for it is an
    error, and nothing is written."""
    raw_ckpt = fitted_raw(tmp_path_factory, tiny_stores)
    common = ["--accelerator", "cpu", "--quiet"]
    for name, flags in (("default", []), ("explicit", ["--scale-by-precision"]), ("own", ["--no-scale-by-precision"])):
        assert main(["submit", "--ckpt_path", raw_ckpt, "--out", str(tmp_path / name), *flags, *common]) == 0
    default, explicit, own = (_predictions(tmp_path / n) for n in ("default", "explicit", "own"))
    assert default.keys() == own.keys() == explicit.keys()
    for (mouse, index), pred in default.items():
        store = MouseStore(tiny_stores / f"{mouse}.zarr")
        precision = _precision(store)[50 : 50 + pred.shape[1]].T  # (N, F)
        np.testing.assert_allclose(pred, own[mouse, index] * precision, rtol=1e-5)
        np.testing.assert_array_equal(pred, explicit[mouse, index])
    scores, evals = tmp_path / "scores.json", tmp_path / "eval.json"
    zipped = str(tmp_path / "default" / "submission_main.zip")
    assert main(["score", zipped, "--data.root", str(tiny_stores), "--output", str(scores)]) == 0
    assert main(["evaluate", "--ckpt_path", raw_ckpt, "--tiers", *MAIN, "--output", str(evals), *common]) == 0
    scored, evaluated = json.loads(scores.read_text())["tiers"], json.loads(evals.read_text())["tiers"]
    for tier in MAIN:
        for metric in ("single_trial_corr", "repeat_averaged_corr", "feve"):
            assert scored[tier]["pooled"][metric] == pytest.approx(evaluated[tier]["pooled"][metric], abs=1e-5)
    # An official model: never scaled; --scale-by-precision would scale it twice.
    out = tmp_path / "official"
    assert main(["submit", "--ckpt_path", fits["checkpoints"][0], "--out", str(out), "--scale-by-precision"]) == 2
    assert not out.exists()
    with pytest.raises(SubmissionError, match="data.normalization='official'"):
        submit([fits["checkpoints"][0]], out, scale_by_precision=True, accelerator="cpu", progress=False)


def test_submit_refuses_a_scale_that_cannot_apply(
    tiny_stores: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stores without the response statistics: the raw-scale model cannot be put on the competition's scale, so
    `submit` stops with the mouse and what is missing, and writes nothing."""
    from tests.test_normalization import copy_stores

    raw_ckpt = fitted_raw(tmp_path_factory, tiny_stores)

    def drop(g: Any) -> None:
        del g["statistics/responses"]["std"]

    root = copy_stores(tiny_stores, tmp_path / "stores", drop)
    out = tmp_path / "out"
    args = ["submit", "--ckpt_path", raw_ckpt, "--data.root", str(root), "--out", str(out), "--accelerator", "cpu"]
    assert main([*args, "--quiet"]) == 2
    assert re.search(r"mouse synthetic0-\S+: no readable statistics/responses/std", capsys.readouterr().err)
    assert not out.exists()
