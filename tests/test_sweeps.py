"""Optuna sweeps on tiny synthetic mice: pruning, resume after a killed worker, export-best, PostgreSQL workers.

Every trial is a real ``fit`` of experiments/factorized.yaml shrunk to seconds (4-channel core, 24-frame windows,
two training batches); the storage is a real SQLite file or a real PostgreSQL server started on loopback.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lightning_sensorium.cli import main
from lightning_sensorium.sweeps import SweepError, counted_trials, load_sweep, run_sweep, validate

ROOT = Path(__file__).parents[1]
FACTORIZED = ROOT / "experiments" / "factorized.yaml"
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))

#: Shrinks the factorized experiment to a few seconds per trial on CPU.
TINY_OVERRIDES: dict[str, Any] = {
    "model.core.init_args.hidden_channels": [4, 4, 4],
    "model.log_figures": False,
    "data.frames": 24,
    "data.batch_size": 2,
    "data.eval_batch_size": 6,
    "trainer.max_epochs": 1,
    "trainer.limit_train_batches": 2,
    "trainer.limit_val_batches": 0.5,  # one mouse's oracle clips: validation of whole trials dominates the time
    "trainer.num_sanity_val_steps": 0,
    "trainer.accelerator": "cpu",
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
}
PARAMETERS: dict[str, Any] = {
    "model.optimizer.init_args.lr": {"distribution": "log", "low": 1.0e-3, "high": 1.0e-2},
    "model.core.init_args.spatial_hidden_kernel": {"distribution": "int", "low": 3, "high": 5, "step": 2},
    # A bound that refers to an earlier parameter (Table 3's "patch stride ≤ patch size").
    "model.shifter.init_args.hidden_channels": {
        "distribution": "int",
        "low": 2,
        "high": "model.core.init_args.spatial_hidden_kernel",
    },
    "model.readout.init_args.bias": {"distribution": "categorical", "choices": [True, False]},
}


def write_sweep(path: Path, stores: Path, runs: Path, epochs: int = 1, **fields: Any) -> Path:
    """A sweep file over the tiny factorized experiment; ``fields`` replace or add top-level fields."""
    sweep = {
        "experiment": str(FACTORIZED),
        "study_name": "tiny",
        "n_trials": 2,
        "log_dir": str(runs),
        "sampler": {"class_path": "optuna.samplers.TPESampler", "init_args": {"n_startup_trials": 1, "seed": 0}},
        "pruner": {
            "class_path": "optuna.pruners.HyperbandPruner",
            "init_args": {"min_resource": 1, "max_resource": 2, "reduction_factor": 2},
        },
        "overrides": {"data.root": str(stores), **TINY_OVERRIDES, "trainer.max_epochs": epochs},
        "parameters": PARAMETERS,
        **fields,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def sweep_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_sensorium", "sweep", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# -------------------------------------------------------------------------------------------- sweep-file checks
@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[p.name for p in SWEEPS])
def test_repo_sweep_files_validate(sweep_file: Path) -> None:
    sweep = load_sweep(sweep_file)
    assert sweep.metric == "val/single_trial_corr" and sweep.direction == "maximize"
    config = yaml.safe_load(validate(sweep))  # every path exists; extremes and all choices parse
    assert config["model"]["core"]["class_path"]


def test_viv1t_sweep_has_table3_ranges() -> None:
    """Table 3 of the retrospective paper: the ranges, verbatim."""
    params = {p.path.rsplit(".", 1)[-1]: p for p in load_sweep(ROOT / "sweeps" / "viv1t.yaml").parameters}
    expected = {
        "dim": ("int", 8, 512, 8),
        "lr": ("uniform", 1e-4, 1e-2, None),
        "patch_dropout": ("uniform", 0, 0.5, None),
        "drop_path": ("uniform", 0, 0.5, None),
        "weight_decay": ("uniform", 0, 1, None),
        "batch_size": ("int", 1, 64, None),
        "spatial_depth": ("int", 1, 8, 1),
        "spatial_patch": ("int", 3, 16, 1),
        "spatial_stride": ("int", 1, "model.core.init_args.spatial_patch", 1),
        "temporal_depth": ("int", 1, 8, 1),
        "temporal_patch": ("int", 1, 50, 1),
        "heads": ("int", 1, 16, 1),
        "head_dim": ("int", 8, 512, 8),
        "attention_dropout": ("uniform", 0, 0.5, None),
        "ff_dim": ("int", 8, 512, 8),
        "ff_dropout": ("uniform", 0, 0.5, None),
    }
    for name, (dist, low, high, step) in expected.items():
        p = params[name]
        assert (p.distribution, p.low, p.high, p.step) == (dist, low, high, step), name


def _error(tmp_path: Path, capsys: pytest.CaptureFixture[str], sweep: dict[str, Any]) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"experiment": str(FACTORIZED), "n_trials": 1, **sweep}))
    assert main(["sweep", str(path), "--storage", f"sqlite:///{tmp_path / 'bad.db'}"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err, err
    return err


def test_bad_sweep_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr = "model.optimizer.init_args.lr"
    err = _error(tmp_path, capsys, {"parameters": {lr: {"distribution": "uniform", "low": 0.01, "high": 0.001}}})
    assert f"parameters.{lr}: empty range" in err
    err = _error(tmp_path, capsys, {"parameters": {lr: {"distribution": "normal", "low": 0, "high": 1}}})
    assert f"parameters.{lr}.distribution: unknown distribution 'normal'" in err
    err = _error(tmp_path, capsys, {"parameters": {"model.core.init_args.depthh": {"distribution": "int", "low": 1}}})
    assert "parameters.model.core.init_args.depthh.high: expected an integer" in err
    bogus = "model.core.init_args.bogus"
    err = _error(tmp_path, capsys, {"parameters": {bogus: {"distribution": "int", "low": 1, "high": 3}}})
    assert f"parameters.{bogus}: no such option in factorized.yaml" in err
    err = _error(tmp_path, capsys, {"parameters": {lr: {"distribution": "log", "low": 0, "high": 1}}})
    assert "needs low > 0" in err
    cat = {"model.data": {"distribution": "categorical", "choices": []}}
    assert "non-empty list of choices" in _error(tmp_path, capsys, {"parameters": cat})
    err = _error(tmp_path, capsys, {"sampler": "NoSuchSampler", "parameters": PARAMETERS})
    assert "sampler: cannot import class_path 'NoSuchSampler'" in err
    err = _error(tmp_path, capsys, {"parameterz": PARAMETERS})
    assert "unknown field(s) ['parameterz']" in err
    # A value the experiment rejects (a Literal option) is caught before any trial runs.
    choice = {"data.batch_mode": {"distribution": "categorical", "choices": ["per_mouse", "shuffled"]}}
    assert "rejects" in _error(tmp_path, capsys, {"parameters": choice})
    # DDP with the subprocess launcher would re-run the sweep in every rank.
    err = _error(tmp_path, capsys, {"parameters": PARAMETERS, "overrides": {"trainer.strategy": "ddp"}})
    assert "ddp_spawn or ddp_fork" in err


def test_create_only_then_export_needs_a_complete_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    assert main(["sweep", str(ROOT / "sweeps" / "factorized.yaml"), "--create-only", "--storage", storage]) == 0
    study = optuna.load_study(study_name="factorized", storage=storage)
    assert study.get_trials() == [] and "base_config" in study.user_attrs
    out = tmp_path / "best.yaml"
    assert main(["sweep", "--export-best", "factorized", "--storage", storage, "--out", str(out)]) == 2
    assert "no COMPLETE trial yet" in capsys.readouterr().err and not out.exists()
    assert main(["sweep", "--export-best", "nobody", "--storage", storage, "--out", str(out)]) == 2
    assert "no such study" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- sweeps (SQLite)
def test_sweep_prunes_resumes_records_failures_and_exports(tiny_stores: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", tiny_stores, runs))
    study = run_sweep(sweep, storage=storage)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for t in trials:
        log_dir = runs / "tiny" / f"trial_{t.number}"
        assert t.user_attrs["log_dir"] == str(log_dir)
        assert any(p.name.startswith("events") for p in log_dir.iterdir())
        assert (log_dir / "config.yaml").is_file()
        assert (
            t.params["model.shifter.init_args.hidden_channels"]
            <= t.params["model.core.init_args.spatial_hidden_kernel"]
        )
        assert t.value == max(t.intermediate_values.values())  # best epoch, not last
    # Same study, a pruner that prunes every trial at its first report: trial count continues, trial 2 PRUNED.
    always = {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 1.5}}
    pruning = load_sweep(write_sweep(tmp_path / "prune.yaml", tiny_stores, runs, epochs=2, pruner=always))
    study = run_sweep(pruning, storage=storage, n_trials=3)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED]
    assert list(trials[2].intermediate_values) == [0]  # stopped after epoch 0 of 2
    # A crashing trial is recorded as FAIL with its error; max_failures stops the worker with that message.
    crashing = load_sweep(
        write_sweep(tmp_path / "crash.yaml", tiny_stores, runs, max_failures=1),
        {"data.root": str(tmp_path / "missing")},
    )
    with pytest.raises(SweepError, match="no such folder"):
        run_sweep(crashing, storage=storage, n_trials=4)
    failed = study.get_trials()[3]
    assert failed.state == TrialState.FAIL and "FileNotFoundError" in failed.user_attrs["error"]
    # --export-best: a complete experiment config that fits as it is (beside a defaults.yaml, as in experiments/).
    out = tmp_path / "experiments" / "tiny_best.yaml"
    out.parent.mkdir()
    shutil.copy(ROOT / "experiments" / "defaults.yaml", out.parent)
    assert main(["sweep", "--export-best", "tiny", "--storage", storage, "--out", str(out)]) == 0
    exported = yaml.safe_load(out.read_text())
    best = study.best_trial
    assert best.number in (0, 1)
    assert exported["model"]["optimizer"]["init_args"]["lr"] == best.params["model.optimizer.init_args.lr"]
    assert exported["model"]["core"]["init_args"]["hidden_channels"] == [4, 4, 4]
    assert exported["data"]["root"] == str(tiny_stores)
    save_dir = str(tmp_path / "best_runs")
    cli = main(["fit", "--config", str(out), "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", save_dir])
    assert cli.trainer.state.finished
    core = cli.config.fit.model.core.init_args
    assert core.spatial_hidden_kernel == best.params["model.core.init_args.spatial_hidden_kernel"]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(best.params["model.optimizer.init_args.lr"])
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("PlateauRestore") == 1 and names.count("ModelCheckpoint") == 1  # not merged twice


def _wait_for(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"worker exited ({proc.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _trials(storage: str, name: str) -> list[Any]:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:
        return []


@pytest.mark.slow
def test_killed_worker_trial_is_retried(tiny_stores: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path / "sweep.yaml", tiny_stores, runs, n_trials=2, heartbeat_interval=1, grace_period=2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    worker = subprocess.Popen(sweep_cmd(str(path), "--storage", storage), env=env(), stderr=subprocess.DEVNULL)
    try:
        # Kill it while its first trial trains (the trial's log folder exists, the trial is RUNNING).
        _wait_for(
            lambda: (
                any(t.state == TrialState.RUNNING for t in _trials(storage, "tiny"))
                and (runs / "tiny" / "trial_0").is_dir()
            ),
            120,
            "trial 0 to start training",
            worker,
        )
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert [t.state for t in _trials(storage, "tiny")] == [TrialState.RUNNING]
    study = run_sweep(load_sweep(path), storage=storage)  # resume: the same command
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL  # no heartbeat: failed, then retried with the same parameters
    assert trials[1].system_attrs["retry_history"] == [0] and trials[1].params == trials[0].params
    assert all(t.state == TrialState.COMPLETE for t in trials[1:])
    assert len(counted_trials(trials)) == 2 and len(trials) == 3


@pytest.mark.slow
def test_ddp_inside_a_trial(tiny_stores: Path, tmp_path: Path) -> None:
    """Two CPU processes per trial (``ddp_fork``): the value and the pruning decision come back through the storage."""
    runs, storage = tmp_path / "runs", f"sqlite:///{tmp_path / 'study.db'}"
    ddp = {"trainer.strategy": "ddp_fork", "trainer.devices": 2, "trainer.limit_val_batches": 1.0}  # 1 batch/rank
    path = write_sweep(tmp_path / "ddp.yaml", tiny_stores, runs, n_trials=1)
    sweep = load_sweep(path, ddp)
    study = run_sweep(sweep, storage=storage)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.value == max(trial.intermediate_values.values())
    always = {"class_path": "optuna.pruners.ThresholdPruner", "init_args": {"lower": 1.5}}
    pruning = load_sweep(write_sweep(tmp_path / "p.yaml", tiny_stores, runs, epochs=2, n_trials=2, pruner=always), ddp)
    trial = run_sweep(pruning, storage=storage).get_trials()[1]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]


# ----------------------------------------------------------------------------------------- PostgreSQL workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL server on loopback (Debian's ``postgresql`` package); yields its URL."""
    pytest.importorskip("psycopg2", reason="PostgreSQL driver missing: pip install -e .[postgres]")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    bindir = Path(found[-1]).parent if found else None
    if bindir is None and shutil.which("initdb"):
        bindir = Path(shutil.which("initdb") or "").resolve().parent
    if bindir is None or not (bindir / "pg_ctl").is_file():
        pytest.skip("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    # initdb refuses to run as root: run the server as the `postgres` user in a folder it owns.
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="sweeps-pg-"))
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no `postgres` user: initdb refuses to run as root")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", _free_port()
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "sweeps", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(
        [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://sweeps@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_two_workers_one_study(postgres: str, tiny_stores: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    path = write_sweep(tmp_path / "sweep.yaml", tiny_stores, runs, n_trials=2)
    # Both workers start at once against a fresh database: schema and study creation must not race.
    workers = [
        subprocess.Popen(sweep_cmd(str(path), "--storage", postgres), env=env(), stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()[-3000:]
    summaries = optuna.get_all_study_summaries(postgres)
    assert [s.study_name for s in summaries] == ["tiny"]
    trials = _trials(postgres, "tiny")
    assert 2 <= len(trials) <= 3  # the budget; two workers finishing together may overshoot by one
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    for t in trials:
        assert any(p.name.startswith("events") for p in Path(t.user_attrs["log_dir"]).iterdir())
