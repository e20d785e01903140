"""`lightning-sensorium pipeline`: the whole recipe behind a published submission as one resumable command.

A pipeline file (``pipelines/<model>.yaml``) names the stages (experiment configs), the members of every stage
(variants × folds × seeds), which checkpoint of a member counts (best or last), which stage teaches which
(DwiseNeuro's distillation), the ensemble and the submission. :func:`run_pipeline` fits every member through
:func:`~lightning_sensorium.launch.run_lightning` into its own folder ``RUN_DIR/<stage>/<member>/``, then evaluates
the ensemble (:func:`~lightning_sensorium.evaluate.evaluate`) and writes the submission
(:func:`~lightning_sensorium.submission.submit`). A finished member is recorded in ``member.json`` in its folder
(written atomically) and never fitted again; an interrupted one resumes from its ``last.ckpt``. File format, the
published pipelines and resumption: docs/pipelines.md.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from lightning.pytorch.trainer.states import TrainerStatus

from lightning_sensorium.atomic import remove, write_text_atomic
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.data.layout import TIERS
from lightning_sensorium.evaluate import evaluate, print_table, write_json, write_markdown
from lightning_sensorium.launch import DEFAULTS_FILE, run_lightning, to_cli_args, with_experiment_defaults
from lightning_sensorium.submission import TRACK_TIERS, submit

log = logging.getLogger(__name__)

CheckpointChoice = Literal["best", "last"]
TeacherMembers = Literal["same_fold", "all"]
MemberStatus = Literal["finished", "interrupted", "pending"]

#: Competition tracks a submission can have (``submit --track``).
TRACKS = tuple(TRACK_TIERS)
#: A finished member's record, in its folder.
MEMBER_RECORD = "member.json"
#: The run folder's record: the pipeline's name, the ensemble's and the submission's inputs and outputs.
PIPELINE_RECORD = "pipeline.json"
#: The checkpoint a member resumes from (ModelCheckpoint ``save_last``).
LAST_CHECKPOINT = "last.ckpt"
#: Options every member gets from the pipeline itself; a stage or variant may not set them.
PIPELINE_OPTIONS = (
    "seed_everything",
    "data.root",
    "data.num_folds",
    "data.fold",
    "model.teachers",
    "trainer.logger",
    "trainer.default_root_dir",
    "ckpt_path",
    "config",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PipelineError(ValueError):
    """A pipeline file or run folder that cannot be used; the message names the file and the field."""


# ---------------------------------------------------------------------------------------------- pipeline file
@dataclass(frozen=True)
class Variant:
    """Members of a stage that differ by options (e.g. Dynamic-V1FM's readout levels and fusion)."""

    name: str
    overrides: dict[str, Any]


@dataclass(frozen=True)
class Teachers:
    """Where a stage's distillation targets come from: members of an earlier stage, either those of the same fold and
    seed (``same_fold``: they never saw the fold's validation trials) or all of them."""

    stage: str
    members: TeacherMembers = "same_fold"


@dataclass(frozen=True)
class Stage:
    """One experiment fitted once per member; ``configs`` as written in the file, ``paths`` resolved."""

    name: str
    configs: tuple[str, ...]
    paths: tuple[Path, ...]
    checkpoint: CheckpointChoice
    overrides: dict[str, Any]
    variants: tuple[Variant, ...]
    teachers: Teachers | None


@dataclass(frozen=True)
class Member:
    """One fit: a stage's variant (if any), fold (if any) and seed."""

    stage: Stage
    variant: Variant | None
    fold: int | None
    seed: int

    @property
    def name(self) -> str:
        parts = [self.variant.name] if self.variant else []
        parts += [f"fold{self.fold}"] if self.fold is not None else []
        return "_".join([*parts, f"seed{self.seed}"])

    @property
    def key(self) -> str:
        return f"{self.stage.name}/{self.name}"

    @property
    def overrides(self) -> dict[str, Any]:
        return {**self.stage.overrides, **(self.variant.overrides if self.variant else {})}


@dataclass(frozen=True)
class Pipeline:
    """A validated pipeline file (:func:`load_pipeline`)."""

    name: str
    path: Path
    folds: int | None
    seeds: tuple[int, ...]
    stages: tuple[Stage, ...]
    ensemble_stages: tuple[str, ...]
    ensemble_tiers: tuple[str, ...] | None
    tracks: tuple[str, ...]
    submission_mice: tuple[str, ...] | None

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def members(self, stage: Stage | None = None) -> list[Member]:
        """Every member of ``stage`` (default: of every stage, stage by stage): variants × folds × seeds."""
        folds: list[int | None] = list(range(self.folds)) if self.folds else [None]
        return [
            Member(s, variant, fold, seed)
            for s in ([stage] if stage else self.stages)
            for variant in (s.variants or (None,))
            for fold in folds
            for seed in self.seeds
        ]

    def teachers_of(self, member: Member) -> list[Member]:
        """The members whose checkpoints teach ``member`` (none without ``teachers``)."""
        teachers = member.stage.teachers
        if teachers is None:
            return []
        pool = self.members(self.stage(teachers.stage))
        if teachers.members == "all":
            return pool
        # A fold is a fold of one seed's split: the fold assignment follows data.seed, which is the member's seed.
        return [t for t in pool if t.fold == member.fold and t.seed == member.seed]

    def ensemble_members(self) -> list[Member]:
        return [m for m in self.members() if m.stage.name in self.ensemble_stages]


def _where(path: Path, field: str) -> str:
    return f"{path}: {field}" if field else str(path)


def _mapping(
    value: Any, path: Path, field: str, allowed: Sequence[str], required: Sequence[str] = ()
) -> dict[str, Any]:
    """``value`` as a mapping with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(value, dict):
        raise PipelineError(f"{_where(path, field or 'the file')}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise PipelineError(f"{_where(path, field)}: unknown key(s) {unknown}; expected some of {list(allowed)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise PipelineError(f"{_where(path, field)}: missing {missing}")
    return value


def _name(value: Any, path: Path, field: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise PipelineError(
            f"{path}: {field}: {value!r} is not a name (letters, digits, '_', '.', '-'; it names folders)"
        )
    return value


def _str_list(value: Any, path: Path, field: str, *, empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not empty):
        kind = "a list" if empty else "a non-empty list"
        raise PipelineError(f"{path}: {field}: expected {kind} of strings, got {value!r}")
    if len(set(value)) != len(value):
        raise PipelineError(f"{path}: {field}: {value} lists an item twice")
    return list(value)


def _overrides(value: Any, path: Path, field: str) -> dict[str, Any]:
    """Dotted option → value; options the pipeline sets itself are refused."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise PipelineError(f"{path}: {field}: expected a mapping of dotted options to values, got {value!r}")
    for key in value:
        if key.startswith("-"):
            raise PipelineError(f"{path}: {field}: {key!r}: write options without dashes (e.g. data.frames)")
        if any(key == o or key.startswith(f"{o}.") for o in PIPELINE_OPTIONS):
            raise PipelineError(f"{path}: {field}: {key!r} is set by the pipeline for every member; remove it")
    return dict(value)


def _checkpoint_settings(configs: Sequence[Path]) -> dict[str, Any] | None:
    """The ``init_args`` of the ModelCheckpoint a fit of ``configs`` uses, read from their YAML: ``defaults.yaml``
    beside the first, then each config in order (``trainer.callbacks`` replaces the list, ``callbacks+`` extends it,
    as in LightningCLI)."""
    defaults = configs[0].parent / DEFAULTS_FILE
    callbacks: list[Any] = []
    for file in ([defaults] if defaults.is_file() else []) + list(configs):
        doc = yaml.safe_load(file.read_text()) or {}
        trainer = doc.get("trainer") if isinstance(doc, dict) else None
        if not isinstance(trainer, dict):
            continue
        if "callbacks" in trainer:
            callbacks = list(trainer["callbacks"] or [])
        extra = trainer.get("callbacks+") or []
        callbacks += extra if isinstance(extra, list) else [extra]
    for cb in callbacks:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "ModelCheckpoint":
            return dict(cb.get("init_args") or {})
    return None


def _check_checkpoint(checkpoint: Any, configs: list[str], paths: tuple[Path, ...], path: Path, field: str) -> None:
    """``checkpoint`` is best or last, and the stage's ModelCheckpoint can give it (and a last.ckpt to resume from)."""
    if checkpoint not in ("best", "last"):
        raise PipelineError(f"{path}: {field}.checkpoint: {checkpoint!r}; expected 'best' or 'last'")
    settings = _checkpoint_settings(paths)
    if settings is None:
        raise PipelineError(
            f"{path}: {field}.configs: no ModelCheckpoint in trainer.callbacks; the pipeline needs one to find each "
            "member's checkpoint"
        )
    if checkpoint == "best" and not settings.get("monitor"):
        raise PipelineError(
            f"{path}: {field}.checkpoint: best, but the ModelCheckpoint of {configs} monitors nothing (it keeps the "
            "last epoch): use 'last'"
        )
    if not settings.get("save_last"):
        raise PipelineError(
            f"{path}: {field}.configs: the ModelCheckpoint needs save_last: true (members resume from last.ckpt)"
        )


def _load_variants(raw: Any, path: Path, field: str) -> tuple[Variant, ...]:
    if not isinstance(raw, list):
        raise PipelineError(f"{path}: {field}: expected a list of {{name, overrides}}, got {raw!r}")
    variants: list[Variant] = []
    for j, item in enumerate(raw):
        vfield = f"{field}[{j}]"
        doc = _mapping(item, path, vfield, ("name", "overrides"), ("name",))
        name = _name(doc["name"], path, f"{vfield}.name")
        if any(v.name == name for v in variants):
            raise PipelineError(f"{path}: {vfield}.name: variant {name!r} is defined twice")
        variants.append(Variant(name, _overrides(doc.get("overrides"), path, f"{vfield}.overrides")))
    return tuple(variants)


def _load_teachers(raw: Any, path: Path, field: str, earlier: Sequence[Stage]) -> Teachers:
    doc = _mapping(raw, path, field, ("stage", "members"), ("stage",))
    if not any(s.name == doc["stage"] for s in earlier):
        raise PipelineError(
            f"{path}: {field}.stage: {doc['stage']!r} is not an earlier stage; expected one of "
            f"{[s.name for s in earlier]}"
        )
    members = doc.get("members", "same_fold")
    if members not in ("same_fold", "all"):
        raise PipelineError(f"{path}: {field}.members: {members!r}; expected 'same_fold' or 'all'")
    return Teachers(doc["stage"], cast(TeacherMembers, members))


def _load_stage(raw: Any, i: int, path: Path, earlier: Sequence[Stage]) -> Stage:
    field = f"stages[{i}]"
    doc = _mapping(
        raw, path, field, ("name", "configs", "checkpoint", "overrides", "variants", "teachers"), ("name", "configs")
    )
    name = _name(doc["name"], path, f"{field}.name")
    if any(s.name == name for s in earlier):
        raise PipelineError(f"{path}: {field}.name: stage {name!r} is defined twice")
    configs = _str_list(doc["configs"], path, f"{field}.configs")
    paths = tuple((path.parent / c).resolve() for c in configs)
    for config, resolved in zip(configs, paths, strict=True):
        if not resolved.is_file():
            raise PipelineError(
                f"{path}: {field}.configs: {config!r}: no such file ({resolved}; paths are relative to the "
                "pipeline file's folder)"
            )
    _check_checkpoint(doc.get("checkpoint"), configs, paths, path, field)
    teachers = doc.get("teachers")
    return Stage(
        name,
        tuple(configs),
        paths,
        cast(CheckpointChoice, doc["checkpoint"]),
        _overrides(doc.get("overrides"), path, f"{field}.overrides"),
        _load_variants(doc.get("variants") or [], path, f"{field}.variants"),
        None if teachers is None else _load_teachers(teachers, path, f"{field}.teachers", earlier),
    )


def _load_members(raw: Any, path: Path) -> tuple[int | None, tuple[int, ...]]:
    """``members``: (folds or None, seeds)."""
    members = _mapping(raw, path, "members", ("folds", "seeds"), ("seeds",))
    folds = members.get("folds")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool) or folds < 2):
        raise PipelineError(f"{path}: members.folds: {folds!r}; expected an integer ≥ 2, or null for no folds")
    seeds = members["seeds"]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise PipelineError(f"{path}: members.seeds: {seeds!r}; expected a non-empty list of distinct integers")
    return folds, tuple(seeds)


def _load_ensemble(raw: Any, path: Path, names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """``ensemble``: (its stages, the tiers to evaluate or None)."""
    ensemble = _mapping(raw or {}, path, "ensemble", ("stages", "tiers"))
    stages = _str_list(ensemble.get("stages", names), path, "ensemble.stages")
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise PipelineError(f"{path}: ensemble.stages: unknown stage(s) {unknown}; expected some of {names}")
    if ensemble.get("tiers") is None:
        return tuple(stages), None
    tiers = _str_list(ensemble["tiers"], path, "ensemble.tiers")
    bad = [t for t in tiers if t not in TIERS]
    if bad:
        raise PipelineError(f"{path}: ensemble.tiers: unknown tier(s) {bad}; expected some of {list(TIERS)}")
    return tuple(stages), tuple(tiers)


def _load_submission(raw: Any, path: Path) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """``submission``: (tracks, mice or None); no submission: no tracks."""
    if raw is None:
        return (), None
    submission = _mapping(raw, path, "submission", ("tracks", "mice"), ("tracks",))
    tracks = _str_list(submission["tracks"], path, "submission.tracks")
    bad = [t for t in tracks if t not in TRACKS]
    if bad:
        raise PipelineError(f"{path}: submission.tracks: unknown track(s) {bad}; expected some of {list(TRACKS)}")
    mice = submission.get("mice")
    return tuple(tracks), None if mice is None else tuple(_str_list(mice, path, "submission.mice"))


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline file; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pipeline file {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML: {err}") from err
    keys = ("name", "members", "stages", "ensemble", "submission")
    doc = _mapping(raw, path, "", keys, ("name", "members", "stages"))
    name = _name(doc["name"], path, "name")
    folds, seeds = _load_members(doc["members"], path)
    raw_stages = doc["stages"]
    if not isinstance(raw_stages, list) or not raw_stages:
        raise PipelineError(f"{path}: stages: expected a non-empty list of stages")
    stages: list[Stage] = []
    for i, raw_stage in enumerate(raw_stages):
        stages.append(_load_stage(raw_stage, i, path, stages))
    ensemble_stages, tiers = _load_ensemble(doc.get("ensemble"), path, [s.name for s in stages])
    tracks, mice = _load_submission(doc.get("submission"), path)
    return Pipeline(
        name=name,
        path=path,
        folds=folds,
        seeds=seeds,
        stages=tuple(stages),
        ensemble_stages=ensemble_stages,
        ensemble_tiers=tiers,
        tracks=tracks,
        submission_mice=mice,
    )


# ------------------------------------------------------------------------------------------------- run folder
@dataclass(frozen=True)
class MemberState:
    """Where a member stands in a run folder: ``checkpoint`` is the counted one (finished) or ``last.ckpt``
    (interrupted); ``metric`` the validation metric of the counted checkpoint (finished members)."""

    member: Member
    status: MemberStatus
    checkpoint: Path | None = None
    metric_name: str | None = None
    metric: float | None = None


def member_dir(run_dir: Path, member: Member) -> Path:
    """``RUN_DIR/<stage>/<member>``: the member's TensorBoard version folder (logs, config, checkpoints, record)."""
    return run_dir / member.stage.name / member.name


def member_spec(pipeline: Pipeline, member: Member) -> dict[str, Any]:
    """What makes a member the member it is; a finished member recorded with another spec is an error."""
    spec = {
        "stage": member.stage.name,
        "configs": list(member.stage.configs),
        "overrides": member.overrides,
        "num_folds": pipeline.folds if member.fold is not None else None,
        "fold": member.fold,
        "seed": member.seed,
        "checkpoint": member.stage.checkpoint,
        "teachers": [t.key for t in pipeline.teachers_of(member)],
    }
    return cast(dict[str, Any], json.loads(json.dumps(spec)))  # as read back from JSON (tuples → lists)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: not valid JSON ({err}); delete it to start that part again") from err
    return value if isinstance(value, dict) else None


def member_state(pipeline: Pipeline, run_dir: Path, member: Member) -> MemberState:
    """Finished (recorded, its checkpoint there as recorded), interrupted (a ``last.ckpt``) or pending."""
    folder = member_dir(run_dir, member)
    record = _read_json(folder / MEMBER_RECORD)
    if record is not None:
        spec = member_spec(pipeline, member)
        if record.get("spec") != spec:
            changed = sorted(k for k in spec if (record.get("spec") or {}).get(k) != spec[k])
            raise PipelineError(
                f"{folder / MEMBER_RECORD}: member {member.key} finished with other settings ({changed} differ from "
                f"{pipeline.path}); use another --out, or delete {folder} to fit it again"
            )
        checkpoint = folder / str(record.get("checkpoint"))
        if checkpoint.is_file() and checkpoint.stat().st_size == record.get("checkpoint_bytes"):
            metric = record.get("metric") or {}
            return MemberState(member, "finished", checkpoint, metric.get("name"), metric.get("value"))
        log.warning("%s: its recorded checkpoint %s is missing or changed: fitting it again", member.key, checkpoint)
    last = folder / "checkpoints" / LAST_CHECKPOINT
    if last.is_file():
        return MemberState(member, "interrupted", last)
    return MemberState(member, "pending")


def _readable(checkpoint: Path) -> bool:
    """Whether a checkpoint file is complete: a zip archive (``torch.save``) whose every member reads back."""
    try:
        with zipfile.ZipFile(checkpoint) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def member_args(
    pipeline: Pipeline,
    member: Member,
    run_dir: Path,
    root: str,
    fit_args: Sequence[str],
    teachers: Sequence[Path],
    resume: Path | None,
) -> list[str]:
    """The ``fit`` arguments of a member: the stage's configs, then ``fit_args`` (options after ``--``), then what
    makes the member (its options, seed, fold, teachers), the data root and its folder, which always win."""
    args = ["fit"]
    for config in member.stage.paths:
        args += ["--config", str(config)]
    args += list(fit_args)
    args += to_cli_args(member.overrides)
    args += ["--seed_everything", str(member.seed)]
    if member.fold is not None:
        args += ["--data.num_folds", str(pipeline.folds), "--data.fold", str(member.fold)]
    if member.stage.teachers is not None:
        args += ["--model.teachers", json.dumps([str(t) for t in teachers])]
    args += ["--data.root", root]
    # TensorBoardLogger's folder is save_dir/name/version: RUN_DIR/<stage>/<member>; checkpoints go in it.
    args += ["--trainer.logger.init_args.save_dir", str(run_dir)]
    args += ["--trainer.logger.init_args.name", member.stage.name]
    args += ["--trainer.logger.init_args.version", member.name]
    args += ["--trainer.default_root_dir", str(member_dir(run_dir, member))]
    if resume is not None:
        args += ["--ckpt_path", str(resume)]
    return with_experiment_defaults(args)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN: no metric


def fit_member(pipeline: Pipeline, member: Member, run_dir: Path, root: str, fit_args: Sequence[str]) -> MemberState:
    """Fit (or resume) one member and record it as finished; its teachers must have finished."""
    folder = member_dir(run_dir, member)
    teacher_states = [member_state(pipeline, run_dir, t) for t in pipeline.teachers_of(member)]
    waiting = [s.member.key for s in teacher_states if s.status != "finished"]
    if waiting:
        raise PipelineError(f"{member.key}: its teachers {waiting} have not finished; fit them first")
    last = folder / "checkpoints" / LAST_CHECKPOINT
    resume = last if last.is_file() and _readable(last) else None
    if last.is_file() and resume is None:
        log.warning("%s: %s is incomplete (killed while writing it?): fitting from scratch", member.key, last)
    if resume is None and folder.exists():
        remove(folder)  # a killed attempt without a checkpoint to resume from: start from an empty folder
    teachers = [cast(Path, s.checkpoint).resolve() for s in teacher_states]
    args = member_args(pipeline, member, run_dir, root, fit_args, teachers, resume)
    log.info("pipeline %s: %s %s", pipeline.name, "resuming" if resume else "fitting", member.key)
    with warnings.catch_warnings():
        if resume is not None:  # a resumed fit writes into its own checkpoint folder, as it should
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        cli = run_lightning(args)
    trainer = cli.trainer
    if trainer.state.status != TrainerStatus.FINISHED or trainer.interrupted:
        raise RuntimeError(f"{member.key}: the fit did not finish ({trainer.state.status}); run again to resume it")
    cb = trainer.checkpoint_callback
    if cb is None:
        raise PipelineError(f"{member.key}: the fit had no ModelCheckpoint; keep one in {list(member.stage.configs)}")
    if member.stage.checkpoint == "best":
        path, metric_name, metric = cb.best_model_path, cb.monitor, _float(cb.best_model_score)
    else:
        path = cb.last_model_path or (str(last) if last.is_file() else "")
        metric_name = getattr(cli.model, "monitor", None)
        metric = _float(trainer.callback_metrics.get(metric_name)) if metric_name else None
    checkpoint = Path(path)
    if not path or not checkpoint.is_file():
        raise PipelineError(f"{member.key}: the fit wrote no {member.stage.checkpoint} checkpoint ({path!r})")
    if not checkpoint.resolve().is_relative_to(folder.resolve()):
        raise PipelineError(
            f"{member.key}: its checkpoint {checkpoint} is outside its folder {folder}: keep the TensorBoard logger "
            "and the ModelCheckpoint's default dirpath in the stage's configs"
        )
    record = {
        "member": member.key,
        "spec": member_spec(pipeline, member),
        "checkpoint": str(checkpoint.resolve().relative_to(folder.resolve())),
        "checkpoint_bytes": checkpoint.stat().st_size,
        "metric": {"name": metric_name, "value": metric},
        "resumed_from": str(resume.relative_to(folder)) if resume else None,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_text_atomic(folder / MEMBER_RECORD, json.dumps(record, indent=2))
    return MemberState(member, "finished", checkpoint, metric_name, metric)


# ---------------------------------------------------------------------------------------------------- progress
def _fingerprint(checkpoints: Sequence[Path]) -> list[dict[str, Any]]:
    """The ensemble's identity: each checkpoint's path, size and modification time (a resumed member changes it)."""
    return [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for p in checkpoints]


def _fmt_metric(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def status_table(pipeline: Pipeline, run_dir: str | Path) -> Any:
    """A rich table: one row per member (stage, status, checkpoint, validation metric of that checkpoint), and a
    caption with the ensemble's and the submission's state."""
    from rich.table import Table

    run_dir = Path(run_dir)
    states = {m.key: member_state(pipeline, run_dir, m) for m in pipeline.members()}
    names = {s.metric_name for s in states.values() if s.metric is not None}
    table = Table(title=f"pipeline {pipeline.name} ({pipeline.path}) in {run_dir}")
    for column in ("member", "stage", "status", "checkpoint"):
        table.add_column(column)
    table.add_column(str(next(iter(names))) if len(names) == 1 else "validation", justify="right")
    for state in states.values():
        status: str = state.status
        if state.status == "interrupted":
            status = "interrupted: resumes from last.ckpt"
        elif state.status == "pending" and any(
            states[t.key].status != "finished" for t in pipeline.teachers_of(state.member)
        ):
            status = "pending: waits for its teachers"
        checkpoint = str(state.checkpoint.relative_to(run_dir)) if state.checkpoint else "–"
        metric = _fmt_metric(state.metric) + (f" {state.metric_name}" if len(names) > 1 and state.metric else "")
        table.add_row(state.member.name, state.member.stage.name, status, checkpoint, metric)
    done = sum(s.status == "finished" for s in states.values())
    record = _read_json(run_dir / PIPELINE_RECORD) or {}
    ensemble = record.get("ensemble", {}).get("metrics", "pending")
    tracks = ", ".join(sorted(record.get("submission", {}).get("tracks", {}))) or "pending"
    table.caption = (
        f"{done} of {len(states)} members finished · ensemble of {len(pipeline.ensemble_members())}: {ensemble} · "
        f"submission: {tracks if pipeline.tracks else 'none'}"
    )
    return table


def print_status(pipeline: Pipeline, run_dir: str | Path) -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze the columns into 80
    console.print(status_table(pipeline, run_dir))


# ------------------------------------------------------------------------------------------------------- run
def _check_run_dir(pipeline: Pipeline, run_dir: Path) -> dict[str, Any]:
    """The run folder's record; a folder that holds another pipeline is refused."""
    record = _read_json(run_dir / PIPELINE_RECORD) or {}
    if record.get("pipeline", pipeline.name) != pipeline.name:
        raise PipelineError(
            f"--out {run_dir} holds pipeline {record['pipeline']!r}, not {pipeline.name!r}: use another folder"
        )
    record.update({"pipeline": pipeline.name, "file": str(pipeline.path)})
    return record


def submission_mice(root: str, track: str) -> list[str] | None:
    """The mice a submission holds by default: those whose test responses of ``track`` are hidden in the stores (the
    competition's five mice of the release, the only ones the site scores); None (every mouse the ensemble knows)
    where no store hides any (synthetic mice, a local release with known responses)."""
    stores = SensoriumDataModule(root=root).stores
    tiers = list(TRACK_TIERS[track])
    hidden = [m for m, s in stores.items() if s.hidden[s.trials(tiers)].any()]
    return hidden or None


def run_pipeline(
    pipeline: Pipeline,
    run_dir: str | Path,
    root: str,
    fit_args: Sequence[str] = (),
    *,
    accelerator: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Fit every member that has not finished (stage by stage), then evaluate the ensemble and write the submission
    where their inputs changed. Returns the run folder's record (``pipeline.json``)."""
    run_dir = Path(run_dir)
    record = _check_run_dir(pipeline, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / PIPELINE_RECORD, json.dumps(record, indent=2))
    print_status(pipeline, run_dir)
    for member in pipeline.members():
        if member_state(pipeline, run_dir, member).status == "finished":
            continue
        fit_member(pipeline, member, run_dir, root, fit_args)
        print_status(pipeline, run_dir)

    checkpoints = [cast(Path, member_state(pipeline, run_dir, m).checkpoint) for m in pipeline.ensemble_members()]
    inputs = _fingerprint(checkpoints)
    metrics_json = run_dir / "ensemble" / "metrics.json"
    done = record.get("ensemble", {})
    if done.get("checkpoints") != inputs or not metrics_json.is_file():
        results = evaluate(
            [str(p) for p in checkpoints],
            data={"root": root},
            tiers=pipeline.ensemble_tiers,
            accelerator=accelerator,
            progress=progress,
        )
        results["pipeline"] = pipeline.name
        results["members"] = [m.key for m in pipeline.ensemble_members()]
        write_json(results, metrics_json)
        write_markdown(results, metrics_json.with_suffix(".md"))
        record["ensemble"] = {"checkpoints": inputs, "metrics": str(metrics_json.relative_to(run_dir))}
        write_text_atomic(run_dir / PIPELINE_RECORD, json.dumps(record, indent=2))
    else:
        results = json.loads(metrics_json.read_text())
    print_table(results)

    submission = record.get("submission", {})
    if submission.get("checkpoints") != inputs:
        submission = {"checkpoints": inputs, "tracks": {}}
    for track in pipeline.tracks:
        files = submission["tracks"].get(track)
        if files and all((run_dir / f).is_file() for f in files):
            continue
        mice = list(pipeline.submission_mice) if pipeline.submission_mice else submission_mice(root, track)
        written = submit(
            [str(p) for p in checkpoints],
            run_dir / "submission",
            data={"root": root, "mice": mice},
            track=cast(Literal["main", "bonus"], track),
            accelerator=accelerator,
            progress=progress,
        )
        submission["tracks"][track] = [str(p.relative_to(run_dir)) for p in written]
        record["submission"] = submission
        write_text_atomic(run_dir / PIPELINE_RECORD, json.dumps(record, indent=2))
    print_status(pipeline, run_dir)
    return record
