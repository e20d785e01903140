"""`lightning-sensorium pipeline`: the published pipeline files, their validation, and one two-stage pipeline run end
to end on the tiny synthetic mice (fits, distillation, ensemble, submission, resumption after a kill)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import lightning_sensorium.pipeline as pipeline_module
from lightning_sensorium.cli import main
from lightning_sensorium.data.convert import convert
from lightning_sensorium.pipeline import (
    MEMBER_RECORD,
    PIPELINE_RECORD,
    PipelineError,
    load_pipeline,
    member_args,
    member_dir,
)
from lightning_sensorium.scoring import score_submission

ROOT = Path(__file__).parents[1]
PIPELINES = ROOT / "pipelines"
MAIN = ("live_test_main", "final_test_main")
#: The tier the tiny run's ensemble is evaluated on (one, to keep the test short).
SCORED = "final_test_main"
#: The tiny DwiseNeuro of both stages (tests/configs/dwiseneuro.yaml, equal to dwiseneuro_distill.yaml's), one
#: epoch of two batches, on the unpadded frame: seconds per fit on a CPU.
TINY_FIT = [
    "--config",
    str(ROOT / "tests" / "configs" / "dwiseneuro.yaml"),
    "--model.core.init_args.pad_to",
    "null",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.num_sanity_val_steps",
    "0",
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--data.batch_size",
    "2",
    "--data.eval_batch_size",
    "6",
]


def _published(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((PIPELINES / name).read_text())
    for stage in doc["stages"]:  # absolute: the copy is written elsewhere
        stage["configs"] = [str((PIPELINES / c).resolve()) for c in stage["configs"]]
    return doc


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _tiny_dwiseneuro(path: Path) -> Path:
    """pipelines/dwiseneuro.yaml with 2 folds and seed 0; to keep the test short, the ensemble of stage 2 only,
    scored on one tier, and the main track."""
    doc = _published("dwiseneuro.yaml")
    doc["members"] = {"folds": 2, "seeds": [0]}
    doc["ensemble"] = {"stages": ["stage2"], "tiers": [SCORED]}
    doc["submission"]["tracks"] = ["main"]
    return _write(path, doc)


def _pipeline(file: Path, out: Path, stores: Path, *extra: str, fit: list[str] | None = None) -> int:
    args = ["pipeline", str(file), "--data.root", str(stores), "--out", str(out), "--accelerator", "cpu"]
    return main([*args, "--quiet", *extra, "--", *(TINY_FIT if fit is None else fit)])


@pytest.fixture
def fits(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The arguments of every fit the pipeline starts (the real fits still run)."""
    calls: list[list[str]] = []
    real: Callable[..., Any] = pipeline_module.run_lightning

    def spy(args: list[str], *a: Any, **kw: Any) -> Any:
        calls.append(list(args))
        return real(args, *a, **kw)

    monkeypatch.setattr(pipeline_module, "run_lightning", spy)
    return calls


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pipeline")
    file = _tiny_dwiseneuro(base / "dwiseneuro.yaml")
    assert _pipeline(file, base / "run", tiny_stores) == 0
    return {"file": file, "out": base / "run"}


def _checkpoint_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob("*/*/checkpoints/*.ckpt"))}


def _assert_score_equals_ensemble(out: Path, stores: Path) -> None:
    """``score`` of the submission's zip = the ensemble's metrics that ``evaluate`` wrote."""
    evaluated = json.loads((out / "ensemble" / "metrics.json").read_text())["tiers"]
    scored = score_submission(out / "submission" / "submission_main.zip", str(stores))["tiers"]
    assert set(scored) == set(MAIN) and set(evaluated) == {SCORED}
    for tier in (SCORED,):
        for name, value in evaluated[tier]["pooled"].items():
            assert scored[tier]["pooled"][name] == pytest.approx(value, abs=1e-6, nan_ok=True), (tier, name)
        for mouse, values in evaluated[tier]["per_mouse"].items():
            for name, value in values.items():
                assert scored[tier]["per_mouse"][mouse][name] == pytest.approx(value, abs=1e-6, nan_ok=True)


# ------------------------------------------------------------------------------------------ end to end (tiny)
def test_every_stage_runs_and_stage_two_distils_from_stage_one(run: dict[str, Path]) -> None:
    out = run["out"]
    pipeline = load_pipeline(run["file"])
    members = pipeline.members()
    assert [m.key for m in members] == [f"stage{s}/fold{k}_seed0" for s in (1, 2) for k in (0, 1)]
    for k, (stage1, stage2) in enumerate(zip(members[:2], members[2:], strict=True)):
        records = {m.key: json.loads((member_dir(out, m) / MEMBER_RECORD).read_text()) for m in (stage1, stage2)}
        teacher = (member_dir(out, stage1) / records[stage1.key]["checkpoint"]).resolve()
        assert records[stage1.key]["checkpoint"] == "checkpoints/last.ckpt" and teacher.is_file()
        assert records[stage2.key]["spec"]["teachers"] == [stage1.key]
        # LightningCLI's own copy of the fit's configuration: fold k, taught by stage 1's fold k, seeded, its folder.
        config = yaml.safe_load((member_dir(out, stage2) / "config.yaml").read_text())
        assert config["model"]["teachers"] == [str(teacher)]
        assert (config["data"]["num_folds"], config["data"]["fold"]) == (2, k)
        assert config["model"]["core"]["init_args"]["expansion"] == 2  # the options after `--` reached the fit
        assert config["seed_everything"] == 0
        assert config["trainer"]["logger"]["init_args"]["version"] == stage2.name == f"fold{k}_seed0"
    metrics = json.loads((out / "ensemble" / "metrics.json").read_text())
    assert metrics["members"] == [m.key for m in members[2:]] and len(metrics["checkpoints"]) == 2
    assert sorted(p.name for p in (out / "submission").iterdir()) == sorted(
        ["predictions_live_main.parquet.brotli", "predictions_final_main.parquet.brotli", "submission_main.zip"]
    )


def test_the_submission_scores_as_the_ensemble_evaluates(run: dict[str, Path], tiny_stores: Path) -> None:
    _assert_score_equals_ensemble(run["out"], tiny_stores)


def test_status_prints_the_table_and_runs_nothing(
    run: dict[str, Path], tmp_path: Path, fits: list[list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pipeline", str(run["file"]), "--out", str(run["out"]), "--status"]) == 0
    text = capsys.readouterr().out
    assert text.count("finished") >= 4 and "4 of 4 members finished" in text
    assert "ensemble of 2: ensemble/metrics.json" in text and "submission: main" in text
    assert main(["pipeline", str(run["file"]), "--out", str(tmp_path / "fresh"), "--status"]) == 0
    text = capsys.readouterr().out
    assert "0 of 4 members finished" in text and "waits for its teachers" in text
    assert fits == [] and not (tmp_path / "fresh").exists()


def test_a_changed_member_or_another_pipeline_in_the_run_folder_is_refused(
    run: dict[str, Path], tmp_path: Path
) -> None:
    doc = yaml.safe_load(run["file"].read_text())
    doc["stages"][0]["overrides"] = {"model.distill_ratio": 0.5}
    changed = _write(tmp_path / "changed.yaml", doc)
    with pytest.raises(
        PipelineError, match=r"member stage1/fold0_seed0 finished with other settings \(\['overrides'\]"
    ):
        pipeline_module.status_table(load_pipeline(changed), run["out"])
    doc["name"] = "other"
    other = _write(tmp_path / "other.yaml", doc)
    with pytest.raises(PipelineError, match="holds pipeline 'dwiseneuro', not 'other'"):
        pipeline_module.run_pipeline(load_pipeline(other), run["out"], "unused")


def test_a_checkpoint_cut_short_is_not_resumed_from(run: dict[str, Path], tmp_path: Path) -> None:
    last = next(run["out"].glob("stage1/*/checkpoints/last.ckpt"))
    data = last.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "flipped.ckpt").write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    assert pipeline_module._readable(last)
    assert not pipeline_module._readable(tmp_path / "cut.ckpt")
    assert not pipeline_module._readable(tmp_path / "flipped.ckpt")


def test_a_second_run_fits_nothing_and_a_killed_member_resumes(
    run: dict[str, Path], tiny_stores: Path, fits: list[list[str]]
) -> None:
    out = run["out"]
    before = _checkpoint_mtimes(out)
    record = json.loads((out / PIPELINE_RECORD).read_text())
    assert _pipeline(run["file"], out, tiny_stores) == 0
    assert fits == [] and _checkpoint_mtimes(out) == before
    assert json.loads((out / PIPELINE_RECORD).read_text()) == record  # nothing evaluated or written again

    # Killed half-way through stage 2's fold 1: its last.ckpt is there, its record is not. The next run resumes it
    # (to a second epoch here) and leaves the other members alone.
    pipeline = load_pipeline(run["file"])
    stage2 = pipeline.members(pipeline.stage("stage2"))[1]
    (member_dir(out, stage2) / MEMBER_RECORD).unlink()
    last = member_dir(out, stage2) / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    fit = [*TINY_FIT]
    fit[fit.index("--trainer.max_epochs") + 1] = "2"
    assert _pipeline(run["file"], out, tiny_stores, fit=fit) == 0
    assert len(fits) == 1 and fits[0][fits[0].index("--ckpt_path") + 1] == str(last)
    assert fits[0][fits[0].index("--trainer.logger.init_args.version") + 1] == stage2.name
    after, resumed_dir = _checkpoint_mtimes(out), f"stage2/{stage2.name}/"
    assert {k: v for k, v in after.items() if not k.startswith(resumed_dir)} == {
        k: v for k, v in before.items() if not k.startswith(resumed_dir)
    }
    assert after[f"{resumed_dir}checkpoints/last.ckpt"] != before[f"{resumed_dir}checkpoints/last.ckpt"]
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # trained on from epoch 0
    resumed = json.loads((member_dir(out, stage2) / MEMBER_RECORD).read_text())
    assert resumed["resumed_from"] == "checkpoints/last.ckpt"
    assert json.loads((out / PIPELINE_RECORD).read_text())["ensemble"] != record["ensemble"]  # evaluated again
    _assert_score_equals_ensemble(out, tiny_stores)

    # Killed before its first checkpoint: fitted again from an empty folder (the member alone; no ensemble here).
    shutil.rmtree(member_dir(out, stage2) / "checkpoints")
    (member_dir(out, stage2) / MEMBER_RECORD).unlink()
    (member_dir(out, stage2) / "stale.txt").write_text("from the killed attempt")
    fits.clear()
    assert pipeline_module.member_state(pipeline, out, stage2).status == "pending"
    pipeline_module.fit_member(pipeline, stage2, out, str(tiny_stores), TINY_FIT)
    assert len(fits) == 1 and "--ckpt_path" not in fits[0]
    assert not (member_dir(out, stage2) / "stale.txt").exists()
    assert json.loads((member_dir(out, stage2) / MEMBER_RECORD).read_text())["resumed_from"] is None
    assert pipeline_module.member_state(pipeline, out, stage2).status == "finished"


# ------------------------------------------------------------------------------------------- the files themselves
def test_the_published_pipelines() -> None:
    dwise = load_pipeline(PIPELINES / "dwiseneuro.yaml")
    assert [s.name for s in dwise.stages] == ["stage1", "stage2"] and dwise.folds == 7
    assert [s.checkpoint for s in dwise.stages] == ["last", "last"] and dwise.tracks == ("main", "bonus")
    assert len(dwise.members()) == 14 and len(dwise.ensemble_members()) == 14
    for member in dwise.members(dwise.stage("stage2")):  # fold k's teacher: stage 1's fold k, nothing else
        assert [t.key for t in dwise.teachers_of(member)] == [f"stage1/fold{member.fold}_seed42"]
    assert dwise.teachers_of(dwise.members()[0]) == []

    dynamic = load_pipeline(PIPELINES / "dynamic_v1fm.yaml")
    readouts = {
        (m.overrides["model.readout.init_args.fusion"], tuple(m.overrides["model.readout.init_args.levels"]))
        for m in dynamic.members()
    }
    level_sets = [(2, 4, 8, 16), (2, 4, 8), (2, 4, 16), (2, 8, 16), (4, 8, 16), (2, 4), (2, 8), (2, 16), (4, 8)]
    level_sets += [(4, 16), (8, 16), (2,), (4,), (8,), (16,)]
    assert len(dynamic.members()) == 31 and {m.seed for m in dynamic.members()} == {42}
    assert readouts == {(f, lv) for f in ("mean", "adaptive") for lv in level_sets} | {("adaptive", ())}
    assert dynamic.stages[0].checkpoint == "last"

    viv1t = load_pipeline(PIPELINES / "viv1t.yaml")
    assert len(viv1t.members()) == 5 and len({m.seed for m in viv1t.members()}) == 5
    baseline = load_pipeline(PIPELINES / "ensemble_baseline.yaml")
    assert baseline.seeds == tuple(range(14)) and baseline.stages[0].checkpoint == "best"
    assert baseline.stages[0].paths == (ROOT / "experiments" / "factorized.yaml",)
    for name in ("factorized", "gru"):
        single = load_pipeline(PIPELINES / f"{name}.yaml")
        assert len(single.members()) == 1 and single.stages[0].checkpoint == "best"
    assert sorted(p.name for p in PIPELINES.glob("*.yaml")) == sorted(
        ["dwiseneuro.yaml", "dynamic_v1fm.yaml", "viv1t.yaml", "factorized.yaml", "gru.yaml", "ensemble_baseline.yaml"]
    )


def test_a_fold_members_fit_arguments(tmp_path: Path, tiny_stores: Path) -> None:
    dwise = load_pipeline(PIPELINES / "dwiseneuro.yaml")
    member = dwise.members(dwise.stage("stage2"))[3]
    teacher = tmp_path / "t.ckpt"
    args = member_args(dwise, member, tmp_path, "stores", ["--trainer.max_epochs", "1"], [teacher], None)
    assert args[0] == "fit" and args[args.index("--config") + 1].endswith("experiments/defaults.yaml")
    assert args[args.index("--data.num_folds") + 1] == "7" and args[args.index("--data.fold") + 1] == "3"
    assert json.loads(args[args.index("--model.teachers") + 1]) == [str(teacher)]
    assert args[args.index("--seed_everything") + 1] == "42" and "--ckpt_path" not in args
    # Options after `--` come after the stage's configs and before what makes the member.
    assert args.index("--trainer.max_epochs") < args.index("--seed_everything")
    assert args[-2:] == ["--trainer.default_root_dir", str(tmp_path / "stage2" / "fold3_seed42")]

    # The options reach the datamodule and the module (built, not fitted): 2 folds of the tiny mice, fold 1 held out.
    doc = _published("dwiseneuro.yaml")
    doc["members"]["folds"] = 2
    two = load_pipeline(_write(tmp_path / "two.yaml", doc))
    member = two.members(two.stage("stage2"))[1]
    args = member_args(two, member, tmp_path, str(tiny_stores), TINY_FIT, [teacher], None)
    cli = pipeline_module.run_lightning(args[1:], run=False)  # without the subcommand: build only
    assert (cli.datamodule.num_folds, cli.datamodule.fold, cli.datamodule.seed) == (2, 1, 42)
    assert cli.model.teacher_paths == [str(teacher)] and cli.trainer.log_dir == str(member_dir(tmp_path, member))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("members"), r"bad.yaml: missing \['members'\]"),
        (lambda d: d.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda d: d["members"].update(seeds=[1, 1]), "members.seeds: .*distinct"),
        (lambda d: d["members"].update(folds=1), r"members.folds: 1; expected an integer ≥ 2"),
        (lambda d: d["stages"][0].update(checkpoint="first"), r"stages\[0\].checkpoint: 'first'"),
        (lambda d: d["stages"][0].update(checkpoint="best"), r"stages\[0\].checkpoint: best, .*monitors nothing"),
        (lambda d: d["stages"][0].update(configs=["nope.yaml"]), r"stages\[0\].configs: 'nope.yaml': no such file"),
        (lambda d: d["stages"][1].update(name="stage1"), r"stages\[1\].name: stage 'stage1' is defined twice"),
        (lambda d: d["stages"][1]["teachers"].update(stage="stage2"), r"stages\[1\].teachers.stage: 'stage2' is not"),
        (lambda d: d["stages"][1]["teachers"].update(members="some"), r"stages\[1\].teachers.members: 'some'"),
        (lambda d: d["stages"][0].update(overrides={"data.fold": 2}), r"'data.fold' is set by the pipeline"),
        (lambda d: d["stages"][0].update(variants=[{"name": "a b"}]), r"stages\[0\].variants\[0\].name: 'a b'"),
        (lambda d: d["ensemble"].update(stages=["stage3"]), r"ensemble.stages: unknown stage\(s\) \['stage3'\]"),
        (lambda d: d["ensemble"].update(tiers=["test"]), r"ensemble.tiers: unknown tier\(s\) \['test'\]"),
        (lambda d: d["submission"].update(tracks=["ood"]), r"submission.tracks: unknown track\(s\) \['ood'\]"),
    ],
)
def test_pipeline_file_errors_name_the_field(
    change: Callable[[dict[str, Any]], Any], message: str, tmp_path: Path
) -> None:
    doc = _published("dwiseneuro.yaml")
    change(doc)
    file = _write(tmp_path / "bad.yaml", doc)
    with pytest.raises(PipelineError, match=message):
        load_pipeline(file)
    assert main(["pipeline", str(file), "--out", str(tmp_path / "run"), "--status"]) == 2  # one line, no traceback


def test_the_submission_holds_the_mice_whose_test_responses_are_hidden(
    tiny_release_hidden: Path, tiny_stores: Path, tmp_path: Path
) -> None:
    convert([tiny_release_hidden], tmp_path / "stores", progress=False)
    mouse = next(p.name.removesuffix(".zarr") for p in (tmp_path / "stores").glob("*.zarr"))
    assert pipeline_module.submission_mice(str(tmp_path / "stores"), "main") == [mouse]
    assert pipeline_module.submission_mice(str(tiny_stores), "bonus") is None  # none hidden: every mouse


def test_the_command_line_needs_the_data_root_and_the_run_folder(tmp_path: Path) -> None:
    file = str(PIPELINES / "factorized.yaml")
    assert main(["pipeline", file, "--out", str(tmp_path / "run")]) == 2
    assert main(["pipeline", file, "--data.root", str(tmp_path)]) == 2
    with pytest.raises(FileNotFoundError, match="pipeline file nope.yaml: no such file"):
        load_pipeline("nope.yaml")
