"""One command line for everything: ``lightning-sensorium``, ``lightning`` and ``python -m lightning_sensorium``.

``fit``, ``validate``, ``test`` and ``predict`` go to :class:`lightning_sensorium.launch.SensoriumCLI` (a
LightningCLI); the project's own subcommands (``synth``, ``convert``, ...) are argparse parsers beside them. Nothing
imports this module; it imports the workflows inside the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_sensorium import __version__
from lightning_sensorium.atomic import DiskFullError

#: Subcommands handled by LightningCLI.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

PROG = "lightning-sensorium"


# ---------------------------------------------------------------------------------------------- own subcommands
def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write synthetic digital-twin mice in the official release layout",
        description=(
            "Write synthetic digital-twin mice in the exact official SENSORIUM 2023 release layout "
            "(data/{videos,responses,behavior,pupil_center}/<i>.npy, meta/...), with the generator's ground truth "
            "(noiseless rates, clip ids, stimulus types) beside the mice in OUT_DIR/ground_truth/."
        ),
    )
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="folder that receives one folder per mouse")
    p.add_argument("--mice", type=int, default=3, help="number of mice (default: %(default)s)")
    p.add_argument("--neurons", type=int, default=1000, help="neurons per mouse (default: %(default)s)")
    p.add_argument("--train-trials", type=int, default=200, help="unique train clips per mouse (default: %(default)s)")
    p.add_argument(
        "--clips-per-tier", type=int, default=6, help="unique clips per repeated tier (default: %(default)s)"
    )
    p.add_argument("--repeats", type=int, default=10, help="repeats of each clip (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default: %(default)s)")
    p.add_argument(
        "--hide-test", action="store_true", help="write all-zero responses for the 4 test tiers, as the release does"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_synth)


def _run_synth(ns: argparse.Namespace) -> int:
    from lightning_sensorium.data.synthetic import synthesize

    sessions = synthesize(
        ns.out_dir,
        mice=ns.mice,
        neurons=ns.neurons,
        train_trials=ns.train_trials,
        clips_per_tier=ns.clips_per_tier,
        repeats=ns.repeats,
        seed=ns.seed,
        hide_test=ns.hide_test,
        progress=not ns.quiet,
    )
    for s in sessions:
        print(s)
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="read every chunk and statistic of converted stores and report what is damaged",
        description=(
            "Check converted stores: metadata and small arrays readable, every trial chunk of videos, responses and "
            "ground-truth rates present, full-sized, finite and equal to the checksum recorded at conversion, "
            "statistics finite. Exit 0 when every store is intact, 1 otherwise."
        ),
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="<mouse_id>.zarr store folder(s) or URL(s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_verify)


def _run_verify(ns: argparse.Namespace) -> int:
    from lightning_sensorium.data.verify import verify

    reports = verify(ns.stores, progress=not ns.quiet)
    for r in reports:
        if r.ok:
            sums = "checksums match" if r.checksums else "no checksums recorded (converted before format 4)"
            print(f"ok      {r.path}: {r.chunks} trial chunks, {sums}")
            continue
        print(f"DAMAGED {r.path}:")
        for problem in r.problems:
            print(f"  - {problem}")
        if r.unlisted:
            print(f"  ... and {r.unlisted} more")
    damaged = sum(not r.ok for r in reports)
    if damaged:
        print(f"{damaged} of {len(reports)} store(s) damaged: convert their sessions again (`{PROG} convert ...`)")
    return 1 if damaged else 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert release sessions (folders or .zip) to one zarr v3 store per mouse",
        description=(
            "Convert SENSORIUM 2023 release sessions (session folders, the release's .zip archives, or a folder that "
            "holds several sessions) into one zarr v3 store per mouse, OUT/<mouse_id>.zarr. Idempotent: an up-to-date "
            "store is left alone. Atomic: nothing half-written is ever left in OUT."
        ),
    )
    p.add_argument("sources", nargs="+", metavar="SRC", help="session folder, release .zip, or folder of sessions")
    p.add_argument("--out", required=True, type=Path, help="output folder for the <mouse_id>.zarr stores")
    p.add_argument("--overwrite", action="store_true", help="replace existing stores built from another source")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_convert)


def _run_convert(ns: argparse.Namespace) -> int:
    from lightning_sensorium.data.convert import convert

    stores = convert(ns.sources, ns.out, overwrite=ns.overwrite, progress=not ns.quiet)
    for s in stores:
        print(s)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="official metrics of a checkpoint per tier and mouse (JSON + table)",
        description=(
            "Evaluate a checkpoint on whole trials: single-trial and repeat-averaged correlation, oracle correlation "
            "and FEVE per tier and mouse, pooled over neurons (the official neuron-weighted mean); on synthetic mice "
            "also the ground-truth oracle and the fraction of it reached; bonus tiers also per stimulus type. Several "
            "checkpoints are evaluated as their ensemble (mean firing rate). The data defaults to the checkpoint's."
        ),
    )
    _add_model_data_args(p, "mice to evaluate (default: as trained)")
    p.add_argument("--tiers", nargs="+", help="tiers to evaluate (default: every labelled tier but train)")
    p.add_argument("--max-trials", type=int, help="at most this many trials per mouse and tier (quick CPU estimate)")
    _add_result_args(p)
    p.add_argument("--tensorboard", type=Path, metavar="DIR", help="write table, scalars and figures to this run dir")
    p.set_defaults(handler=_run_evaluate)


def _add_model_data_args(p: argparse.ArgumentParser, mice_help: str) -> None:
    """--ckpt_path (one or several: an ensemble), --data.root, --data.mice, --accelerator, --quiet."""
    p.add_argument(
        "--ckpt_path", required=True, nargs="+", type=Path, help="checkpoint(s) written by `fit`; several = ensemble"
    )
    p.add_argument("--data.root", dest="root", help="folder or URL of <mouse_id>.zarr stores (default: as trained)")
    p.add_argument("--data.mice", dest="mice", nargs="+", help=mice_help)
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_result_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", type=Path, help="write the metrics as JSON to this file")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as Markdown to this file")


def _report(results: dict[str, Any], ns: argparse.Namespace) -> None:
    from lightning_sensorium.evaluate import print_table, write_json, write_markdown, write_tensorboard

    print_table(results)
    for path, write in ((ns.output, write_json), (ns.markdown, write_markdown)):
        if path:
            write(results, path)
            print(f"wrote {path}")
    if getattr(ns, "tensorboard", None):
        write_tensorboard(results, ns.tensorboard)
        print(f"TensorBoard: tensorboard --logdir {ns.tensorboard}")


def _run_evaluate(ns: argparse.Namespace) -> int:
    from lightning_sensorium.evaluate import evaluate

    results = evaluate(
        ns.ckpt_path,
        data={"root": ns.root, "mice": ns.mice},
        tiers=ns.tiers,
        accelerator=ns.accelerator,
        max_trials=ns.max_trials,
        progress=not ns.quiet,
    )
    _report(results, ns)
    return 0


def _add_infer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="predict any tier (hidden ones too) or new stimuli into a zarr store",
        description=(
            "Predict whole trials of any tiers (hidden test tiers included) with one checkpoint or an ensemble, "
            "streaming batch by batch into OUT (a zarr store: <mouse>/prediction (trial, frame, neuron), trial_index, "
            "tier, length, unit_ids). With --stimulus, predict one mouse's responses to new videos instead (the "
            "in-silico experiment): a (T, H, W) grey-level .npy in 0..255, or a folder of them with optional "
            "NAME.behavior.npy / NAME.pupil_center.npy (T, 2) beside each; missing behaviour = the mouse's train mean. "
            "(`lightning predict --config ...` is LightningCLI's: add ZarrPredictionWriter as a callback there.)"
        ),
    )
    _add_model_data_args(p, "mice to predict (default: as trained)")
    p.add_argument("--out", required=True, type=Path, help="output zarr store (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--tiers", nargs="+", help="tiers to predict (default: the checkpoint's data.infer_tiers)")
    p.add_argument("--max-trials", type=int, help="at most this many trials per mouse and tier")
    p.add_argument("--stimulus", type=Path, help="a video .npy (T, H, W) or a folder of them: predict these instead")
    p.add_argument("--mouse", help="with --stimulus: the mouse whose neurons to predict")
    p.add_argument("--behavior", type=Path, help="with one --stimulus video: its (T, 2) [pupil size, speed] .npy")
    p.add_argument("--pupil-center", type=Path, help="with one --stimulus video: its (T, 2) [x, y] .npy")
    p.set_defaults(handler=_run_infer)


def _run_infer(ns: argparse.Namespace) -> int:
    from lightning_sensorium.inference import infer_stimuli, infer_tiers

    if ns.out.exists() and not ns.overwrite:
        raise FileExistsError(f"--out {ns.out} exists; pass --overwrite to replace it")
    common = {"data": {"root": ns.root, "mice": ns.mice}, "accelerator": ns.accelerator, "progress": not ns.quiet}
    if ns.stimulus is not None:
        if ns.tiers or ns.max_trials:
            raise ValueError("--stimulus predicts user videos: --tiers and --max-trials do not apply")
        out = infer_stimuli(
            ns.ckpt_path,
            ns.stimulus,
            ns.out,
            mouse=ns.mouse,
            behavior=ns.behavior,
            pupil_center=ns.pupil_center,
            overwrite=ns.overwrite,
            **common,
        )
    else:
        if ns.mouse or ns.behavior or ns.pupil_center:
            raise ValueError("--mouse, --behavior and --pupil-center go with --stimulus (use --data.mice for tiers)")
        out = infer_tiers(
            ns.ckpt_path, ns.out, tiers=ns.tiers, max_trials=ns.max_trials, overwrite=ns.overwrite, **common
        )
    print(out)
    return 0


def _add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="write the competition's parquet files and zips (validated, atomic)",
        description=(
            "Predict every trial of the track's test tiers and write the files the SENSORIUM 2023 site expects: "
            "main = predictions_live_main.parquet.brotli + predictions_final_main.parquet.brotli and "
            "submission_main.zip holding both; bonus = predictions_{live,final}_test_bonus_ood.parquet.brotli, each "
            "zipped on its own. Columns mouse, trial_indices, prediction (neurons × frames 50..length-1), neuron_ids. "
            "Everything is validated first; on any problem nothing is written."
        ),
    )
    _add_model_data_args(p, "mice to submit (default: as trained; the site scores the 5 competition mice)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--track", choices=("main", "bonus"), default="main", help="competition track (default: main)")
    p.add_argument(
        "--scale-by-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "predictions go on the competition's scale (raw responses × the official per-frame precision) by "
            "default, as the checkpoints' data.normalization requires: raw and viv1t models are scaled frame by "
            "frame, official ones never. --scale-by-precision insists on that scaling (an error for an official "
            "model); --no-scale-by-precision writes a raw or viv1t model's own scale, unscaled"
        ),
    )
    p.set_defaults(handler=_run_submit)


def _run_submit(ns: argparse.Namespace) -> int:
    from lightning_sensorium.submission import submit

    written = submit(
        ns.ckpt_path,
        ns.out,
        data={"root": ns.root, "mice": ns.mice},
        track=ns.track,
        scale_by_precision=ns.scale_by_precision,
        accelerator=ns.accelerator,
        progress=not ns.quiet,
    )
    for path in written:
        print(path)
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a submission file or zip locally against stores with known responses",
        description=(
            "Score a submission (a .parquet.brotli file, a zip of them, or the folder `submit` wrote) with the same "
            "metrics as `evaluate`, against stores whose test responses are known (synthetic mice, the old mice). "
            "Malformed submissions (columns, shapes, unknown mice or trials, neuron ids) are reported clearly."
        ),
    )
    p.add_argument("submission", type=Path, metavar="SUBMISSION", help="parquet file, zip, or folder of them")
    p.add_argument("--data.root", dest="root", required=True, help="folder or URL of <mouse_id>.zarr stores")
    p.add_argument("--data.mice", dest="mice", nargs="+", help="restrict the stores to these mice")
    _add_result_args(p)
    p.set_defaults(handler=_run_score)


def _run_score(ns: argparse.Namespace) -> int:
    from lightning_sensorium.scoring import score_submission

    _report(score_submission(ns.submission, ns.root, mice=ns.mice), ns)
    return 0


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ensemble",
        help="the ensemble baseline: fit a config once per seed, evaluate the members' average",
        description=(
            "Fit CONFIG once per seed (sequentially, same data; --seed_everything SEED, TensorBoard version "
            "seed<SEED>), then evaluate the ensemble of the best checkpoints (mean firing rate). The paper's ensemble "
            "baseline is `ensemble --config experiments/factorized.yaml` (seeds 0..13). Options after `--` go to "
            "every fit, e.g. `-- --data.root data/stores --trainer.max_epochs 50`."
        ),
    )
    p.add_argument("--config", required=True, type=Path, help="experiment config, e.g. experiments/factorized.yaml")
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(14)), help="seeds (default: 0 … 13)")
    p.add_argument("--tiers", nargs="+", help="tiers to evaluate (default: every labelled tier but train)")
    p.add_argument("--accelerator", default="auto", help="evaluation accelerator (default: %(default)s)")
    _add_result_args(p)
    p.add_argument("fit_args", nargs=argparse.REMAINDER, help="`--` then options for every fit")
    p.set_defaults(handler=_run_ensemble)


def _run_ensemble(ns: argparse.Namespace) -> int:
    from lightning_sensorium.ensemble import train_ensemble
    from lightning_sensorium.evaluate import evaluate

    fit_args = ns.fit_args[1:] if ns.fit_args[:1] == ["--"] else ns.fit_args
    checkpoints = train_ensemble(ns.config, ns.seeds, fit_args)
    # The data comes from the checkpoints: every member was fitted with the same data settings.
    results = evaluate(checkpoints, tiers=ns.tiers, accelerator=ns.accelerator)
    results["seeds"] = list(ns.seeds)
    _report(results, ns)
    for path in checkpoints:
        print(path)
    return 0


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data.root", dest="root", help="folder or URL of <mouse_id>.zarr stores (needed to run)")
    p.add_argument("--out", type=Path, help="run folder: members, ensemble metrics, submission (required)")
    p.add_argument("--status", action="store_true", help="print the progress table and exit; runs nothing")
    p.add_argument("--accelerator", default="auto", help="evaluation and submission accelerator (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar while evaluating and submitting")


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="a published model's whole pipeline: members, stages, ensemble, submission (resumable)",
        description=(
            "Run the pipeline of PIPELINE (pipelines/<model>.yaml): fit every member of every stage (folds x seeds, "
            "a stage distilled from an earlier one), evaluate their ensemble and write the submission, each member "
            "in its own folder under --out. Run it again after a kill: finished members are never fitted again, an "
            "interrupted one resumes from its last.ckpt. Options after `--` go to every fit, e.g. "
            "`-- --trainer.precision bf16-mixed`. File format and the published pipelines: docs/pipelines.md."
        ),
        usage=f"{PROG} pipeline PIPELINE --data.root STORES --out RUN_DIR [--status] [--accelerator A] [--quiet] "
        "[-- FIT_OPTIONS]",
    )
    p.add_argument("pipeline_file", type=Path, metavar="PIPELINE", help="pipeline file, e.g. pipelines/viv1t.yaml")
    _pipeline_options(p)
    # Everything after PIPELINE: argparse cannot mix options after a positional with a `--` tail, so the options
    # there are parsed by _run_pipeline.
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- FIT_OPTIONS", help="options for every fit")
    p.set_defaults(handler=_run_pipeline)


def _run_pipeline(ns: argparse.Namespace) -> int:
    from lightning_sensorium.pipeline import load_pipeline, print_status, run_pipeline

    rest = list(ns.rest)
    split = rest.index("--") if "--" in rest else len(rest)
    options, fit_args = rest[:split], rest[split + 1 :]
    if options:
        parser = argparse.ArgumentParser(prog=f"{PROG} pipeline", add_help=False)
        _pipeline_options(parser)
        parser.parse_args(options, namespace=ns)
    if ns.out is None:
        raise ValueError("--out: give the run folder (RUN_DIR) of the pipeline")
    pipeline = load_pipeline(ns.pipeline_file)
    if ns.status:
        print_status(pipeline, ns.out)
        return 0
    if not ns.root:
        raise ValueError("--data.root: give the folder of <mouse_id>.zarr stores to run the pipeline on")
    run_pipeline(pipeline, ns.out, ns.root, fit_args, accelerator=ns.accelerator, progress=not ns.quiet)
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="Optuna hyper-parameter sweep of an experiment (TPE + Hyperband by default)",
        description=(
            "Run an Optuna sweep described by a sweep file (sweeps/<model>.yaml): each trial fits the experiment with "
            "the trial's values, pruned on the validation metric. Every worker runs the same command against one "
            "storage; a killed sweep continues where it stopped. With --export-best, write the best trial's "
            "complete experiment config instead."
        ),
    )
    p.add_argument("sweep_file", nargs="?", type=Path, metavar="SWEEP_FILE", help="sweep file (YAML)")
    p.add_argument("--n-trials", type=int, help="trials in the study in total (default: the file's n_trials)")
    p.add_argument(
        "--storage", help="Optuna database URL (default: sqlite:///<log_dir>/<study>/optuna.db; postgresql://...)"
    )
    p.add_argument("--study-name", help="study name (default: the file's study_name, else its file name)")
    p.add_argument("--create-only", action="store_true", help="create the database and the study, run no trial")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="extra fixed override for every trial, e.g. --set data.root=/data/stores (repeatable)",
    )
    p.add_argument("--export-best", metavar="STUDY", help="write the best trial's experiment config to --out")
    p.add_argument("--out", type=Path, help="output file of --export-best, e.g. experiments/viv1t_best.yaml")
    p.set_defaults(handler=_run_sweep)


def _parse_set(items: Sequence[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items → overrides; VALUE is read as YAML (``4``, ``[4, 4]``, ``true``, ``/path``)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set data.root=/data/stores")
        out[key.removeprefix("--")] = yaml.safe_load(value)
    return out


def _run_sweep(ns: argparse.Namespace) -> int:
    from lightning_sensorium.sweeps import default_storage, export_best, load_sweep, run_sweep

    if ns.export_best:
        if not ns.out:
            raise ValueError("--export-best needs --out FILE")
        log_dir = load_sweep(ns.sweep_file).log_dir if ns.sweep_file else "runs"
        out = export_best(ns.export_best, ns.storage or default_storage(ns.export_best, log_dir), ns.out)
        print(f"wrote {out}")
        return 0
    if not ns.sweep_file:
        raise ValueError("give a sweep file (sweeps/<model>.yaml), or --export-best STUDY --out FILE")
    sweep = load_sweep(ns.sweep_file, _parse_set(ns.set))
    try:
        run_sweep(sweep, n_trials=ns.n_trials, storage=ns.storage, study_name=ns.study_name, create_only=ns.create_only)
    except KeyboardInterrupt:
        print("sweep interrupted: the running trial is queued again; rerun the same command to continue")
        return 130
    return 0


def _add_insilico(sub: argparse._SubParsersAction) -> None:
    from lightning_sensorium.insilico import EXPERIMENTS  # the package's __init__ imports nothing

    p = sub.add_parser(
        "insilico",
        help="in-silico experiments (RFs, tuning, size, behaviour, MEIs) on a model or a synthetic mouse's generator",
        description=(
            "Run one in-silico experiment on a checkpoint (several = their ensemble) or, with --ground-truth alone, "
            "on a synthetic mouse's own generator; with both, the model's results are scored against the truth. "
            "rf: sparse-noise RF maps, centre, size; gradient_rf: linearised RF (models only); tuning: drifting "
            "gratings → preferred direction/orientation/SF/TF, OSI, DSI, F1/F0; size: RF + tuning, then disks of "
            "growing size → preferred size, suppression index; behavior: running vs quiet, large vs small pupil "
            "gains; clips: most/least activating of --clips videos; mei: most exciting image and video (models "
            "only). Results: OUT (zarr, named dimensions) and PNG figures. Guide: docs/insilico.md."
        ),
    )
    p.add_argument("experiment", choices=EXPERIMENTS, metavar="EXPERIMENT", help=", ".join(EXPERIMENTS))
    p.add_argument("--ckpt_path", nargs="+", type=Path, default=[], help="checkpoint(s) written by `fit`")
    p.add_argument("--ground-truth", type=Path, metavar="RELEASE", help="synthetic release (with ground_truth/)")
    p.add_argument("--mouse", help="the mouse whose neurons to study (needed when there are several)")
    p.add_argument("--neurons", nargs="+", type=int, help="unit ids to study (default: all)")
    p.add_argument("--out", required=True, type=Path, help="output zarr store (written atomically)")
    p.add_argument("--figures", type=Path, help="folder of PNG figures (default: OUT's name + _figures)")
    p.add_argument("--tensorboard", type=Path, metavar="DIR", help="also log the figures and recovery scores here")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--clips", type=Path, help="clips: a (T, H, W) video .npy or a folder of them (as for infer)")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of --clips (default: %(default)s)")
    p.add_argument(
        "--state",
        default="quiet",
        choices=("quiet", "running", "small_pupil", "large_pupil"),
        help="behaviour the stimuli are shown with (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of noise stimuli and MEI starts (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="stimuli per forward pass (default: %(default)s)")
    p.add_argument("--data.root", dest="root", help="folder or URL of <mouse_id>.zarr stores (default: as trained)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_insilico)


def _run_insilico(ns: argparse.Namespace) -> int:
    from lightning_sensorium.insilico.run import run_insilico

    out = run_insilico(
        ns.experiment,
        ns.out,
        ckpt_paths=ns.ckpt_path,
        ground_truth=ns.ground_truth,
        mouse=ns.mouse,
        neurons=ns.neurons,
        clips=ns.clips,
        fps=ns.fps,
        state=ns.state,
        data={"root": ns.root},
        device=ns.device,
        seed=ns.seed,
        batch_size=ns.batch_size,
        figures=ns.figures,
        tensorboard=ns.tensorboard,
        overwrite=ns.overwrite,
        progress=not ns.quiet,
    )
    print(out)
    return 0


def _add_import_weights(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-weights",
        help="the weights a team published (its own checkpoint format) → our checkpoint(s)",
        description=(
            "Read checkpoints exactly as an original's code writes them (starter kit: model.state_dict(); DwiseNeuro: "
            "argus model files, EMA included; ViV1T: a run folder with args.yaml and ckpt/model_state.pt; "
            "Dynamic-V1FM: its train.py checkpoint) and write our checkpoints at the original's sizes, for evaluate, "
            "infer, submit, ensemble and fit --ckpt_path. The original's mice are matched to the stores' mouse ids "
            "and their neurons checked; several files are one ensemble: --out is then a folder of member-NN.ckpt."
        ),
    )
    architectures = ("gru", "factorized", "dwiseneuro", "viv1t", "dynamic_v1fm")  # weights.ARCHITECTURES
    p.add_argument("--from", dest="architecture", required=True, choices=architectures, help="whose checkpoints")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="original checkpoint file(s) or run folder(s)")
    p.add_argument("--data.root", dest="root", required=True, type=Path, help="folder of the mice's <mouse_id>.zarr")
    p.add_argument("--out", required=True, type=Path, help="checkpoint file (one FILE) or folder (several)")
    p.add_argument(
        "--mouse",
        action="append",
        default=[],
        metavar="KEY=MOUSE_ID",
        help="the store of an original's mouse (KEY: its key, e.g. a ViV1T letter, or the session it names)",
    )
    p.add_argument("--experiments", type=Path, default=Path("experiments"), help="folder of <model>.yaml")
    p.set_defaults(handler=_run_import_weights)


def _run_import_weights(ns: argparse.Namespace) -> int:
    from lightning_sensorium.weights.importer import import_weights

    mouse_map = {}
    for item in ns.mouse:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--mouse {item!r}: expected KEY=MOUSE_ID, e.g. --mouse A=dynamic29156-11-10-Video-...")
        mouse_map[key] = value
    for path in import_weights(ns.architecture, ns.files, ns.root, ns.out, mouse_map, ns.experiments):
        print(f"wrote {path}")
    return 0


#: The project's own subcommands: name → function that adds its parser.
_OWN_SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "synth": _add_synth,
    "convert": _add_convert,
    "verify": _add_verify,
    "evaluate": _add_evaluate,
    "infer": _add_infer,
    "submit": _add_submit,
    "score": _add_score,
    "ensemble": _add_ensemble,
    "pipeline": _add_pipeline,
    "sweep": _add_sweep,
    "import-weights": _add_import_weights,
    "insilico": _add_insilico,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: the project's subcommands plus pointers to the LightningCLI ones."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "lightning_sensorium: train, evaluate and submit SENSORIUM 2023 mouse-V1 video models.\n\n"
            "Training subcommands (LightningCLI; see `%(prog)s fit --help`):\n"
            "  fit        train a model:      %(prog)s fit --config experiments/factorized.yaml\n"
            "  validate   validate a checkpoint\n"
            "  test       test a checkpoint\n"
            "  predict    predict with a checkpoint"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="data and evaluation subcommands", metavar="COMMAND")
    for add in _OWN_SUBCOMMANDS.values():
        add(sub)
    return parser


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of every console script. Lightning subcommands return the CLI object; others an exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["predict"] and any(a == "--out" or a.startswith("--out=") for a in argv):
        argv[0] = "infer"  # `predict --ckpt_path CKPT --out preds.zarr`: the streaming zarr writer, no config needed
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        from lightning_sensorium.launch import run_lightning, with_experiment_defaults

        full = with_experiment_defaults(argv)
        if args is None and full != argv:
            sys.argv[1:] = full  # LightningCLI reads sys.argv itself from the console
        if args is not None:
            return run_lightning(full)  # Python callers get the CLI object (and any exception)
        from lightning_sensorium.callbacks.memory import InsufficientMemoryError
        from lightning_sensorium.module import PretrainedError

        try:
            run_lightning(None)  # from the console: LightningCLI reads sys.argv (given again, it only warns)
        except (InsufficientMemoryError, PretrainedError) as err:  # before training: one line, what to do instead
            print(f"{PROG} {argv[0]}: error: {err}", file=sys.stderr)
            sys.exit(2)
        return None  # console scripts call sys.exit(main())
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not hasattr(ns, "handler"):
        parser.print_help()
        return 0 if not argv else 2
    try:
        code = ns.handler(ns)
    except (FileExistsError, FileNotFoundError, ValueError, DiskFullError) as err:
        # Bad input: one clear line naming the file/field, no traceback.
        print(f"{PROG} {argv[0]}: error: {err}", file=sys.stderr)
        code = 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        # A disk that filled up while writing (the writers remove their temporaries): one line, no traceback.
        print(
            f"{PROG} {argv[0]}: error: {err.filename or 'the output'}: the disk is full; free some space",
            file=sys.stderr,
        )
        code = 2
    if args is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
