"""One command line for everything: ``lightning-sensorium``, ``lightning`` and ``python -m lightning_sensorium``.

``fit``, ``validate``, ``test`` and ``predict`` go to :class:`SensoriumCLI` (a LightningCLI); the project's own
subcommands (``synth``, ``convert``, ...) are argparse parsers that sit beside them. Heavy imports happen inside
the handlers so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_sensorium import __version__

#: Subcommands handled by LightningCLI.
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

PROG = "lightning-sensorium"


# --------------------------------------------------------------------------------------------------- LightningCLI
def lightning_main(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True) -> Any:
    """Run LightningCLI on ``args`` (a list of strings or a config dict); returns the CLI object."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from lightning_sensorium.data.datamodule import SensoriumDataModule
    from lightning_sensorium.module import SensoriumModule

    # `omegaconf+` resolves ${...} after every config and override is merged; absolute paths work under
    # subcommands with this setting (ecosystem.md §1).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    class SensoriumCLI(LightningCLI):
        """LightningCLI with the project's argument links: data-derived values flow once, data → model."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            for name in ("neurons", "dataset_sizes", "video_shape"):
                parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
            parser.link_arguments("data.frame_step", "model.frame_step")

    return SensoriumCLI(
        SensoriumModule,
        SensoriumDataModule,
        parser_kwargs={"parser_mode": "omegaconf+"},
        save_config_kwargs={"overwrite": True},
        args=list(args) if isinstance(args, Sequence) and not isinstance(args, str) else args,  # type: ignore[arg-type]
        run=run,
    )


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
            "also the ground-truth oracle and the fraction of it reached. The data defaults to the checkpoint's."
        ),
    )
    p.add_argument("--ckpt_path", required=True, type=Path, help="checkpoint written by `fit`")
    p.add_argument("--data.root", dest="root", help="folder or URL of <mouse_id>.zarr stores (default: as trained)")
    p.add_argument("--data.mice", dest="mice", nargs="+", help="mice to evaluate (default: as trained)")
    p.add_argument("--tiers", nargs="+", help="tiers to evaluate (default: every labelled tier but train)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu or auto (default: %(default)s)")
    p.add_argument("--output", type=Path, help="write the metrics as JSON to this file")
    p.set_defaults(handler=_run_evaluate)


def _run_evaluate(ns: argparse.Namespace) -> int:
    from lightning_sensorium.evaluate import evaluate, print_table, write_json

    results = evaluate(
        ns.ckpt_path, data={"root": ns.root, "mice": ns.mice}, tiers=ns.tiers, accelerator=ns.accelerator
    )
    print_table(results)
    if ns.output:
        write_json(results, ns.output)
        print(f"wrote {ns.output}")
    return 0


#: The project's own subcommands: name → function that adds its parser.
_OWN_SUBCOMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "synth": _add_synth,
    "convert": _add_convert,
    "evaluate": _add_evaluate,
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


def with_defaults(argv: list[str]) -> list[str]:
    """Put ``defaults.yaml`` from the first ``--config``'s folder before it (shared trainer, logger, callbacks).

    Every ``experiments/<model>.yaml`` is complete relative to ``experiments/defaults.yaml``; this makes
    ``lightning fit --config experiments/viv1t.yaml`` read both, in that order. An explicit
    ``--config .../defaults.yaml`` anywhere disables it.
    """
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            path, head = argv[i + 1], argv[:i]
            tail = argv[i + 2 :]
        elif arg.startswith("--config="):
            path, head, tail = arg.split("=", 1)[1], argv[:i], argv[i + 1 :]
        else:
            continue
        defaults = Path(path).parent / "defaults.yaml"
        if Path(path).name == "defaults.yaml" or not defaults.is_file() or any("defaults.yaml" in a for a in argv):
            return argv
        return [*head, "--config", str(defaults), "--config", path, *tail]
    return argv


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of every console script. Lightning subcommands return the CLI object; others an exit code."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in LIGHTNING_SUBCOMMANDS:
        full = with_defaults(argv)
        if args is None and full != argv:
            sys.argv[1:] = full  # LightningCLI reads sys.argv itself from the console
        # From the console pass None: giving LightningCLI sys.argv again only triggers a warning.
        cli = lightning_main(None if args is None else full)
        # Console scripts call sys.exit(main()): return None there, the CLI object to Python callers.
        return cli if args is not None else None
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not hasattr(ns, "handler"):
        parser.print_help()
        return 0 if not argv else 2
    try:
        code = ns.handler(ns)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        # Bad input: one clear line naming the file/field, no traceback.
        print(f"{PROG} {argv[0]}: error: {err}", file=sys.stderr)
        code = 2
    if args is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
