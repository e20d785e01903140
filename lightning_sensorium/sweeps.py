"""`lightning-sensorium sweep`: Optuna hyper-parameter searches over an experiment config.

A sweep file (``sweeps/<model>.yaml``) names the experiment, the search space as dotted paths into its config, the
objective, and the sampler and pruner; every trial is one ``fit`` with the trial's values as overrides. The
defaults reproduce the competition teams' searches: TPE + Hyperband (ViV1T's "Hyperband Bayesian optimization").
Pattern of the objective: https://github.com/optuna/optuna-examples/blob/main/pytorch/pytorch_lightning_simple.py.
File format, storage, workers, DDP and failure handling: docs/sweeps.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from lightning_sensorium.atomic import write_text_atomic
from lightning_sensorium.launch import run_lightning, to_cli_args, with_experiment_defaults

#: Distributions a parameter can have. ``step`` (uniform, int) and ``log`` scales are fields, not distributions.
Distribution = Literal["uniform", "log", "int", "categorical"]
DISTRIBUTIONS: tuple[str, ...] = ("uniform", "log", "int", "categorical")

#: Study user attribute that holds the experiment config the sweep tunes (with its fixed overrides), as YAML.
BASE_CONFIG_ATTR = "base_config"
#: Trial system attribute that names the trials a retry replaces (the format of optuna's retry callback).
RETRY_HISTORY_ATTR = "retry_history"
#: Attempts at creating the schema/study when several workers start against a fresh database.
CREATE_ATTEMPTS = 12


class SweepError(ValueError):
    """A sweep file, storage or study that cannot be used; the message names the file and the field."""


# ------------------------------------------------------------------------------------------------- sweep file
@dataclass(frozen=True)
class Parameter:
    """One searched value: a dotted path into the experiment config and its distribution.

    ``low``/``high`` may name an earlier parameter (its dotted path) instead of a number, e.g. a patch stride
    bounded by the sampled patch size (Table 3: "MAX: PATCH SIZE").
    """

    path: str
    distribution: Distribution
    low: float | str | None = None
    high: float | str | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def bound(self, value: float | str | None, assigned: dict[str, Any]) -> float:
        """A numeric bound: the number itself, or the value already drawn for the parameter it names."""
        if isinstance(value, str):
            return float(assigned[value])
        assert value is not None
        return float(value)

    def suggest(self, trial: Any, assigned: dict[str, Any]) -> Any:
        """Draw this parameter for an Optuna ``trial``; ``assigned`` holds the values drawn before it."""
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.path, list(self.choices))
        low, high = self.bound(self.low, assigned), self.bound(self.high, assigned)
        if high < low:
            raise SweepError(f"parameter {self.path}: empty range low={low} > high={high} for this trial")
        if self.distribution == "int":
            return trial.suggest_int(self.path, int(low), int(high), step=int(self.step or 1))
        if self.distribution == "log":
            return trial.suggest_float(self.path, low, high, log=True)
        return trial.suggest_float(self.path, low, high, step=self.step)

    def corners(self, k: int, assigned: dict[str, Any]) -> Any:
        """A value for the ``k``-th validation parse: low/high alternately, or the ``k``-th choice (cyclic)."""
        if self.distribution == "categorical":
            return self.choices[k % len(self.choices)]
        value = self.bound(self.low if k % 2 == 0 else self.high, assigned)
        return int(value) if self.distribution == "int" else value


@dataclass(frozen=True)
class ClassSpec:
    """``class_path`` + ``init_args`` of a sampler or pruner, as in LightningCLI configs."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)

    def build(self, module: str, base: type, where: str) -> Any:
        """Import and instantiate; a bare class name is looked up in ``module`` (optuna.samplers / .pruners)."""
        import importlib

        mod_name, _, name = self.class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod_name or module), name)
        except (ImportError, AttributeError) as err:
            raise SweepError(f"{where}: cannot import class_path {self.class_path!r} ({err})") from None
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise SweepError(f"{where}: {self.class_path!r} is not a subclass of {base.__module__}.{base.__name__}")
        try:
            return cls(**self.init_args)
        except (TypeError, ValueError) as err:
            raise SweepError(f"{where}: {self.class_path}({self.init_args}) failed: {err}") from None


DEFAULT_SAMPLER = ClassSpec("optuna.samplers.TPESampler", {"n_startup_trials": 10})
DEFAULT_PRUNER = ClassSpec("optuna.pruners.HyperbandPruner", {"min_resource": 1, "reduction_factor": 3})


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file. Field names are the YAML keys (docs/sweeps.md, "Sweep file format")."""

    path: Path
    experiment: Path
    parameters: tuple[Parameter, ...]
    study_name: str
    metric: str = "val/single_trial_corr"
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = 20
    log_dir: str = "runs"
    sampler: ClassSpec = DEFAULT_SAMPLER
    pruner: ClassSpec = DEFAULT_PRUNER
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 3
    max_failures: int = 3
    overrides: dict[str, Any] = field(default_factory=dict)

    def build_sampler(self) -> Any:
        import optuna

        return self.sampler.build("optuna.samplers", optuna.samplers.BaseSampler, f"{self.path}: sampler")

    def build_pruner(self) -> Any:
        import optuna

        return self.pruner.build("optuna.pruners", optuna.pruners.BasePruner, f"{self.path}: pruner")

    def default_storage(self, study_name: str | None = None) -> str:
        """SQLite file beside the study's TensorBoard logs: ``<log_dir>/<study>/optuna.db``."""
        return default_storage(study_name or self.study_name, self.log_dir)


def default_storage(study_name: str, log_dir: str = "runs") -> str:
    """The storage a sweep uses when none is given: ``<log_dir>/<study>/optuna.db``."""
    return f"sqlite:///{Path(log_dir) / study_name / 'optuna.db'}"


_TOP_KEYS = {
    "experiment",
    "parameters",
    "study_name",
    "metric",
    "direction",
    "n_trials",
    "log_dir",
    "sampler",
    "pruner",
    "heartbeat_interval",
    "grace_period",
    "max_retry",
    "max_failures",
    "overrides",
}
_PARAM_KEYS = {"distribution", "low", "high", "step", "choices"}


def _number(value: Any, where: str, *, integer: bool = False, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not float(value).is_integer()):
        raise SweepError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if positive and value <= 0:
        raise SweepError(f"{where}: must be > 0, got {value!r}")
    return float(value)


def _parse_categorical(path: str, raw: dict[str, Any], where: str) -> Parameter:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise SweepError(f"{where}.choices: a categorical parameter needs a non-empty list of choices")
    if set(raw) - {"distribution", "choices"}:
        raise SweepError(f"{where}: a categorical parameter takes only 'choices'")
    bad = [c for c in choices if c is not None and not isinstance(c, bool | int | float | str)]
    if bad:
        raise SweepError(f"{where}.choices: Optuna choices are null, booleans, numbers or strings; got {bad}")
    return Parameter(path, "categorical", choices=tuple(choices))


def _parse_bound(value: Any, dist: str, earlier: dict[str, Parameter], where: str) -> float | str:
    """A number, or the path of an earlier numeric parameter."""
    if isinstance(value, str):
        ref = earlier.get(value)
        if ref is None or ref.distribution == "categorical":
            raise SweepError(f"{where}: {value!r} is neither a number nor an earlier numeric parameter of this file")
        return value
    return _number(value, where, integer=dist == "int")


def _parse_parameter(path: str, raw: Any, earlier: dict[str, Parameter], where: str) -> Parameter:
    """Check one ``parameters:`` entry: known keys and distribution, numeric bounds, a non-empty range."""
    where = f"{where}: parameters.{path}"
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping with 'distribution', got {raw!r}")
    unknown = set(raw) - _PARAM_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(_PARAM_KEYS)}")
    dist = raw.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise SweepError(f"{where}.distribution: unknown distribution {dist!r}; expected one of {list(DISTRIBUTIONS)}")
    if dist == "categorical":
        return _parse_categorical(path, raw, where)
    if "choices" in raw:
        raise SweepError(f"{where}.choices: only a categorical parameter takes choices (distribution is {dist!r})")
    low = _parse_bound(raw.get("low"), dist, earlier, f"{where}.low")
    high = _parse_bound(raw.get("high"), dist, earlier, f"{where}.high")
    step = raw.get("step")
    if step is not None:
        if dist == "log":
            raise SweepError(f"{where}.step: a log distribution takes no step")
        step = _number(step, f"{where}.step", integer=dist == "int", positive=True)
    if isinstance(low, float) and isinstance(high, float) and low >= high:
        raise SweepError(f"{where}: empty range, low ({low:g}) must be < high ({high:g})")
    if dist == "log" and isinstance(low, float) and low <= 0:
        raise SweepError(f"{where}.low: a log distribution needs low > 0, got {low:g}")
    return Parameter(path, cast(Distribution, dist), low=low, high=high, step=step)


def _class_spec(raw: Any, default: ClassSpec, where: str) -> ClassSpec:
    if raw is None:
        return default
    if isinstance(raw, str):
        return ClassSpec(raw)
    if not isinstance(raw, dict) or "class_path" not in raw or set(raw) - {"class_path", "init_args"}:
        raise SweepError(f"{where}: expected {{class_path: ..., init_args: {{...}}}}, got {raw!r}")
    return ClassSpec(str(raw["class_path"]), dict(raw.get("init_args") or {}))


def _scalar_fields(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """The scalar top-level fields, type-checked."""
    out: dict[str, Any] = {}
    for key in ("metric", "log_dir", "study_name"):  # study_name: checked here, defaulted by the caller
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise SweepError(f"{where}: {key}: expected a non-empty string, got {raw[key]!r}")
            out[key] = raw[key]
    if "direction" in raw:
        if raw["direction"] not in ("maximize", "minimize"):
            raise SweepError(f"{where}: direction: expected 'maximize' or 'minimize', got {raw['direction']!r}")
        out["direction"] = raw["direction"]
    for key in ("n_trials", "heartbeat_interval", "grace_period", "max_retry", "max_failures"):
        if key in raw:
            out[key] = int(_number(raw[key], f"{where}: {key}", integer=True, positive=key != "max_retry"))
    if out.get("grace_period", 180) <= out.get("heartbeat_interval", 60):
        raise SweepError(f"{where}: grace_period must be longer than heartbeat_interval")
    return out


def load_sweep(path: str | Path, extra_overrides: dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep file (structure only; :func:`validate` checks it against the experiment).

    ``extra_overrides`` (the command line's ``--set``) are added to the file's ``overrides``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    where = str(path)
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a mapping of sweep fields, got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise SweepError(f"{where}: unknown field(s) {sorted(unknown)}; expected some of {sorted(_TOP_KEYS)}")
    if not isinstance(raw.get("experiment"), str):
        raise SweepError(f"{where}: experiment: the experiment config to tune (a path relative to this file)")
    experiment = (path.parent / raw["experiment"]).resolve()
    if not experiment.is_file():
        raise SweepError(f"{where}: experiment: no such file {experiment}")
    params_raw = raw.get("parameters")
    if not isinstance(params_raw, dict) or not params_raw:
        raise SweepError(f"{where}: parameters: expected a non-empty mapping of dotted config paths")
    parameters: dict[str, Parameter] = {}
    for name, spec in params_raw.items():
        parameters[str(name)] = _parse_parameter(str(name), spec, parameters, where)
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise SweepError(f"{where}: overrides: expected a mapping of dotted config paths to values")
    clash = set(overrides) & set(parameters)
    if clash:
        raise SweepError(f"{where}: overrides: {sorted(clash)} are also searched parameters")
    sweep = Sweep(
        path=path,
        experiment=experiment,
        parameters=tuple(parameters.values()),
        sampler=_class_spec(raw.get("sampler"), DEFAULT_SAMPLER, f"{where}: sampler"),
        pruner=_class_spec(raw.get("pruner"), DEFAULT_PRUNER, f"{where}: pruner"),
        overrides={**overrides, **(extra_overrides or {})},
        **{"study_name": path.stem, **_scalar_fields(raw, where)},
    )
    # Bad class paths / init_args fail now, not after the config parses.
    sweep.build_sampler()
    sweep.build_pruner()
    return sweep


# ----------------------------------------------------------------------------------------------- config parsing
def experiment_args(experiment: Path, values: dict[str, Any]) -> list[str]:
    """``--config defaults.yaml --config <experiment> --<path> <value> ...`` (without a subcommand)."""
    return with_experiment_defaults(["--config", str(experiment), *to_cli_args(values)])


def print_config(experiment: Path, values: dict[str, Any], where: str) -> str:
    """The complete config of ``experiment`` with ``values`` applied, as ``fit --print_config`` writes it.

    Parses only (nothing is instantiated, no data is read). A rejected value raises :class:`SweepError` with
    jsonargparse's message.
    """
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_lightning(["fit", *experiment_args(experiment, values), "--print_config"])
        except SystemExit as exit_:
            code = exit_.code
    if code not in (0, None):
        message = err.getvalue()
        message = message[message.rfind("error:") :].strip() if "error:" in message else message.strip()
        raise SweepError(f"{where}: {experiment.name} rejects {values}: {message}")
    return out.getvalue()


def _lookup(config: dict[str, Any], path: str) -> bool:
    node: Any = config
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def set_path(config: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in a nested config dict (every level but the last must exist)."""
    *head, last = path.split(".")
    node = config
    for key in head:
        node = node[key]
    node[last] = value


def trial_logger(sweep: Sweep, study_name: str, number: int | str) -> dict[str, Any]:
    """Overrides that put a trial's TensorBoard logs (and checkpoints) in ``<log_dir>/<study>/trial_<n>``."""
    return {
        "trainer.logger.init_args.save_dir": sweep.log_dir,
        "trainer.logger.init_args.name": study_name,
        "trainer.logger.init_args.version": f"trial_{number}",
    }


def _check_distributed(config: dict[str, Any], where: str) -> bool:
    """Reject the DDP launcher that re-runs the command; return whether a trial runs on several processes."""
    trainer = config.get("trainer", {})
    strategy, devices, nodes = trainer.get("strategy", "auto"), trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if isinstance(strategy, dict):
        strategy = str(strategy.get("init_args", {}).get("start_method", strategy.get("class_path", "")))
    several = (
        (isinstance(devices, int) and (devices > 1 or devices == -1))
        or (isinstance(devices, list) and len(devices) > 1)
        or devices in ("auto", "-1")
        or (isinstance(nodes, int) and nodes > 1)
    )
    spawning = any(s in str(strategy) for s in ("spawn", "fork", "notebook"))
    if ("ddp" in str(strategy) and not spawning) or (several and strategy == "auto"):
        raise SweepError(
            f"{where}: trainer.strategy={strategy!r}, trainer.devices={devices!r}: the 'ddp' launcher re-runs the "
            "sweep command in every rank and each rank would draw its own trial. For DDP inside a trial set "
            "trainer.strategy to ddp_spawn or ddp_fork; or run one single-device worker per GPU on one storage."
        )
    return several or spawning


def validate(sweep: Sweep, study_name: str | None = None) -> str:
    """Check a sweep against its experiment; return the experiment's complete config (fixed overrides applied).

    Every parameter path must exist in the parsed config, and the config must accept the parameters' values (the
    lows, and every categorical choice; one ``--print_config`` parse per choice, nothing is instantiated).
    """
    where = str(sweep.path)
    base_text = print_config(sweep.experiment, sweep.overrides, f"{where}: overrides")
    config = yaml.safe_load(base_text)
    for p in sweep.parameters:
        if not _lookup(config, p.path):
            raise SweepError(
                f"{where}: parameters.{p.path}: no such option in {sweep.experiment.name} "
                f"(see `lightning-sensorium fit --config {sweep.experiment} --print_config`)"
            )
    _check_distributed(config, where)
    logger = trial_logger(sweep, study_name or sweep.study_name, 0)
    rounds = max([1] + [len(p.choices) for p in sweep.parameters])  # lows, then highs; every choice once
    for k in range(rounds):
        assigned: dict[str, Any] = {}
        for p in sweep.parameters:
            assigned[p.path] = p.corners(k, assigned)
        try:
            print_config(sweep.experiment, {**sweep.overrides, **assigned, **logger}, f"{where}: parameters")
        except SweepError as err:
            hint = " (a sweep logs each trial with the experiment's TensorBoardLogger)" if "logger" in str(err) else ""
            raise SweepError(f"{err}{hint}") from None
    return base_text


# ------------------------------------------------------------------------------------------------- the study
def _quiet_optuna() -> None:
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def open_storage(url: str, sweep: Sweep | None = None) -> Any:
    """An Optuna RDB storage (SQLite / PostgreSQL / MySQL URL) with heartbeats, created under retries.

    Several workers creating the schema of a fresh database at once collide (``table studies already exists``,
    Postgres ``UniqueViolation``); the loser retries after a random pause and then finds the schema in place.
    """
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from sqlalchemy.exc import SQLAlchemyError

    _quiet_optuna()
    if "://" not in url:
        raise SweepError(f"storage {url!r}: expected a database URL (sqlite:///file.db, postgresql://...)")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    heartbeat: dict[str, Any] = {}
    if sweep is not None:
        heartbeat = {
            "heartbeat_interval": sweep.heartbeat_interval,
            "grace_period": sweep.grace_period,
            "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry),
        }
    for attempt in range(CREATE_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
            if attempt == CREATE_ATTEMPTS - 1:
                raise SweepError(f"storage {url}: cannot open the database: {err}") from None
            time.sleep(random.uniform(0.2, 1.0) * (1 + attempt / 2))
        except ImportError as err:
            raise SweepError(
                f"storage {url}: missing database driver ({err}); for PostgreSQL install the "
                "`postgres` extra: pip install -e .[postgres]"
            ) from None
    raise AssertionError("unreachable")


def open_study(storage: Any, sweep: Sweep, study_name: str, base_config: str) -> Any:
    """Create the study (or load it), race-free; record the base config for ``--export-best``."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    sampler, pruner = sweep.build_sampler(), sweep.build_pruner()
    for attempt in range(CREATE_ATTEMPTS):
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                direction=sweep.direction,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
            break
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError):
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.2, 1.0) * (1 + attempt / 2))
    expected = (
        optuna.study.StudyDirection.MAXIMIZE
        if sweep.direction == "maximize"
        else (optuna.study.StudyDirection.MINIMIZE)
    )
    if study.direction != expected:
        raise SweepError(
            f"{sweep.path}: direction: study {study_name!r} already exists with direction "
            f"{study.direction.name.lower()}, the sweep file says {sweep.direction}"
        )
    attrs = study.user_attrs
    if BASE_CONFIG_ATTR not in attrs:
        study.set_user_attr(BASE_CONFIG_ATTR, base_config)
        study.set_user_attr("experiment", str(sweep.experiment))
        study.set_user_attr("sweep_file", str(sweep.path))
        study.set_user_attr("metric", sweep.metric)
    return study


def counted_trials(trials: Sequence[Any]) -> list[Any]:
    """Trials that count against the budget: all but those a retry replaced (dead workers, interruptions)."""
    superseded = {n for t in trials for n in t.system_attrs.get(RETRY_HISTORY_ATTR, [])}
    return [t for t in trials if t.number not in superseded]


# --------------------------------------------------------------------------------------------- the objective
class Objective:
    """One trial = one ``fit`` of the experiment with the trial's values; returns the best validation metric.

    The value is the best per-epoch value of ``metric`` the trial reported (ViV1T's ``best_corr``), read back from
    the storage, so it is also right when the trial ran on several DDP processes.
    """

    def __init__(self, sweep: Sweep, study_name: str) -> None:
        self.sweep, self.study_name = sweep, study_name

    def suggest(self, trial: Any) -> dict[str, Any]:
        """The trial's values, in file order (later bounds may refer to earlier values)."""
        assigned: dict[str, Any] = {}
        for p in self.sweep.parameters:
            assigned[p.path] = p.suggest(trial, assigned)
        return assigned

    def __call__(self, trial: Any) -> float:
        import optuna

        try:
            self.fit(trial)
            return self.best(trial)
        except optuna.TrialPruned:
            raise
        except (KeyboardInterrupt, SystemExit):
            # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown.
            trial.set_user_attr("error", "interrupted; queued again with the same parameters")
            _requeue(trial)
            raise KeyboardInterrupt from None  # optuna marks the trial FAIL and stops the worker
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            trial.set_user_attr("traceback", traceback.format_exc()[-8000:])
            raise

    def fit(self, trial: Any) -> None:
        """Fit the experiment with the trial's values, reporting ``metric`` after every validation."""
        from optuna_integration import PyTorchLightningPruningCallback

        values = self.suggest(trial)
        logger = trial_logger(self.sweep, self.study_name, trial.number)
        trial.set_user_attr("log_dir", str(Path(self.sweep.log_dir) / self.study_name / f"trial_{trial.number}"))
        args = experiment_args(self.sweep.experiment, {**self.sweep.overrides, **values, **logger})
        cli = run_lightning(args, run=False)
        pruning = PyTorchLightningPruningCallback(trial, monitor=self.sweep.metric)
        cli.trainer.callbacks.append(pruning)  # at run time only: not in the trial's saved config.yaml
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        pruning.check_pruned()  # DDP: the decision rank 0 made, read back from the storage (docs/sweeps.md)

    def best(self, trial: Any) -> float:
        """The best reported value of ``metric`` over the trial's epochs."""
        reported = trial.storage.get_trial(trial._trial_id).intermediate_values
        if not reported:
            raise SweepError(
                f"metric {self.sweep.metric!r} was never logged (is validation running? is the name right?)"
            )
        pick = max if self.sweep.direction == "maximize" else min
        epoch = pick(reported, key=reported.__getitem__)
        trial.set_user_attr("best_epoch", int(epoch))
        value = float(reported[epoch])
        if not math.isfinite(value):
            raise SweepError(f"metric {self.sweep.metric!r} is {value} at epoch {epoch}")
        return value


def _requeue(trial: Any) -> None:
    """Queue a WAITING copy of an interrupted trial, in the format of optuna's heartbeat retry callback."""
    import optuna

    frozen = trial.storage.get_trial(trial._trial_id)
    history = [*frozen.system_attrs.get(RETRY_HISTORY_ATTR, []), trial.number]
    trial.study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING,
            params=frozen.params,
            distributions=frozen.distributions,
            system_attrs={"failed_trial": history[0], RETRY_HISTORY_ATTR: history},
        )
    )


def run_sweep(
    sweep: Sweep,
    *,
    n_trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    create_only: bool = False,
) -> Any:
    """Run trials until the study holds ``n_trials`` (the file's by default) counted trials; returns the study.

    Call it from every worker with the same arguments. ``create_only`` creates the schema and the study and
    returns, for setups that prefer one explicit creation step before the workers start.
    """
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    name = study_name or sweep.study_name
    budget = n_trials if n_trials is not None else sweep.n_trials
    if budget < 1:
        raise SweepError(f"n_trials: expected ≥ 1, got {budget}")
    base_config = validate(sweep, name)
    url = storage or sweep.default_storage(name)
    study = open_study(open_storage(url, sweep), sweep, name, base_config)
    print(f"sweep {name}: storage {url}", flush=True)
    if create_only:
        return study
    objective = Objective(sweep, name)
    failures: list[Any] = []

    def after(study: Any, frozen: Any) -> None:
        if frozen.state == TrialState.FAIL:
            failures.append(frozen)
        else:
            failures.clear()

    while True:
        fail_stale_trials(study)  # a dead worker's trial → FAIL + a WAITING retry with the same parameters
        trials = study.get_trials(deepcopy=False)
        states = {t.state for t in trials}
        if TrialState.WAITING not in states and len(counted_trials(trials)) >= budget:
            if TrialState.RUNNING not in states:
                break
            # Budget reached, but another worker's trial runs: if that worker is dead, its heartbeat stops and
            # the trial is retried here; if alive, it finishes.
            time.sleep(min(sweep.heartbeat_interval, 2))
            continue
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[after], gc_after_trial=True)
        if len(failures) >= sweep.max_failures:
            last = failures[-1]
            raise SweepError(
                f"sweep {name}: {len(failures)} trials in a row failed; the last, trial {last.number}: "
                f"{last.user_attrs.get('error', 'see its log')}"
            )
    _summary(study, optuna)
    return study


def _summary(study: Any, optuna: Any) -> None:
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(states))
    print(f"sweep {study.study_name}: {len(states)} trials ({counts})", flush=True)
    with contextlib.suppress(ValueError):
        best = study.best_trial
        print(f"best: trial {best.number} value {best.value:.6g} params {best.params}", flush=True)


# ------------------------------------------------------------------------------------------------- export-best
def export_best(study_name: str, storage: str, out: str | Path) -> Path:
    """Write the experiment config with the best trial's values: a file ``lightning fit --config`` runs as is."""
    import optuna

    _quiet_optuna()
    try:
        study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    except KeyError:
        raise SweepError(f"study {study_name!r}: no such study in {storage}") from None
    try:
        best = study.best_trial
    except ValueError:
        raise SweepError(f"study {study_name!r}: the study has no COMPLETE trial yet") from None
    base = study.user_attrs.get(BASE_CONFIG_ATTR)
    if base is None:
        raise SweepError(f"study {study_name!r}: not created by a sweep (it has no {BASE_CONFIG_ATTR} attribute)")
    config = yaml.safe_load(base)
    for path, value in best.params.items():
        set_path(config, path, value)
    out = Path(out)
    header = (
        f"# Best trial {best.number} of study {study_name!r} ({study.user_attrs.get('metric', 'value')} = "
        f"{best.value:.6g}),\n# exported by `lightning-sensorium sweep --export-best`. Complete: base experiment "
        f"{Path(study.user_attrs.get('experiment', '?')).name} + fixed overrides + the trial's values:\n"
        + "".join(f"#   {k}: {json.dumps(v)}\n" for k, v in best.params.items())
    )
    write_text_atomic(out, header + yaml.safe_dump(config, sort_keys=False))
    print_config(out, {}, str(out))  # the written file must parse as an experiment
    return out
