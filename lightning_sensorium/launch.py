"""Run LightningCLI on an experiment: the project's CLI class, ``defaults.yaml`` spliced in, options as arguments.

``fit``/``validate``/``test``/``predict``, the ensemble recipe and every sweep trial start a run through
:func:`run_lightning`. Importing this module loads Lightning and the model: ``cli`` imports it only inside the
handlers that run something, so that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningCLI

from lightning_sensorium.callbacks import MemoryCheck, ProgressBar
from lightning_sensorium.callbacks.progress import quiet_console
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.module import SensoriumModule

#: Name of the shared trainer/logger/callbacks config that sits beside the experiment configs.
DEFAULTS_FILE = "defaults.yaml"


class SensoriumCLI(LightningCLI):
    """LightningCLI with the project's argument links (data-derived values flow once, data → model) and the project's
    progress bar where the configuration names none (``Epoch 14``, not ``Epoch 14/-2``, without an epoch cap)."""

    def __init__(self, *args: Any, memory_hint: str | None = None, **kwargs: Any) -> None:
        self.memory_hint = memory_hint  # given to MemoryCheck callbacks that have no hint of their own
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for name in ("neurons", "dataset_sizes", "video_shape"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.link_arguments("data.frame_step", "model.frame_step")

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path <save_dir>/<name>/<version>/checkpoints/last.ckpt`` continues in that run's folder (its
        TensorBoard curves and checkpoints go on where they stopped) rather than starting a new version."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if self.subcommand != "fit" or config is None or not config.get("ckpt_path"):
            return
        logger = config.get("trainer.logger")
        init = getattr(logger, "init_args", None)
        if init is None or not str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger"):
            return
        run = Path(str(config["ckpt_path"])).resolve().parent.parent  # <save_dir>/<name>/<version>
        same = run.parent == (Path(str(init.save_dir)) / str(init.name)).resolve()
        if same and init.get("version") is None and run.name.startswith("version_"):
            init.version = run.name

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wanted = config.get("enable_progress_bar") is not False
        if wanted and not any(isinstance(c, LightningProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, ProgressBar()]
        for callback in callbacks:
            if isinstance(callback, MemoryCheck) and callback.hint is None:
                callback.hint = self.memory_hint
        return super().instantiate_trainer(**kwargs)


def cpu_recipe(config: str | Path) -> Path | None:
    """The CPU-sized recipe of an experiment: ``<its folder>/cpu/<its name>``, or None where there is none."""
    path = Path(config).parent / "cpu" / Path(config).name
    return path if path.is_file() else None


def memory_hint(configs: Sequence[str]) -> str | None:
    """What to do when the experiment of ``configs`` (the ``--config`` files, in order) does not fit in memory:
    its CPU recipe where it has one that is not applied yet; None otherwise (the generic advice)."""
    applied = {Path(c).resolve() for c in configs}
    for config in reversed(configs):
        cpu = cpu_recipe(config)
        if cpu is not None and cpu.resolve() not in applied:
            return (
                f"Train its CPU-sized recipe (add `--config {cpu}` after `--config {config}`), or lower "
                "data.batch_size or data.frames, or use a device with more memory."
            )
    return None


def run_lightning(args: Sequence[str] | dict[str, Any] | None = None, run: bool = True) -> Any:
    """Run :class:`SensoriumCLI` on ``args`` (a list of strings, a config dict, or None for ``sys.argv``).

    Returns the CLI object; with ``run=False`` it only builds the model, datamodule and trainer (the caller runs
    ``cli.trainer.fit(...)``).
    """
    # `omegaconf+` resolves ${...} after every config and override is merged; this setting makes an absolute
    # interpolation such as ${data.frames} resolve inside the subcommand's config (jsonargparse's
    # `set_parsing_settings`: https://jsonargparse.readthedocs.io/en/stable/#parsing-settings).
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    quiet_console()
    argv = sys.argv[1:] if args is None else args if not isinstance(args, dict) else []
    hint = memory_hint([path for _, _, path in config_options(list(argv))])
    with contextlib.nullcontext() if args is None else _bare_argv():
        return SensoriumCLI(
            SensoriumModule,
            SensoriumDataModule,
            parser_kwargs={"parser_mode": "omegaconf+"},
            save_config_kwargs={"overwrite": True},
            args=list(args) if isinstance(args, Sequence) and not isinstance(args, str) else args,
            run=run,
            memory_hint=hint,
        )


@contextlib.contextmanager
def _bare_argv() -> Iterator[None]:
    """LightningCLI warns when given ``args=`` while ``sys.argv`` has items (the caller's own command line: the
    demo's, a sweep's, pytest's): hide them while it parses ``args``."""
    saved = sys.argv[1:]
    del sys.argv[1:]
    try:
        yield
    finally:
        sys.argv[1:] = saved


def to_cli_args(values: dict[str, Any]) -> list[str]:
    """Dotted path → value pairs as LightningCLI arguments (``{"data.frames": 40}`` → ``["--data.frames", "40"]``).

    Strings go as they are (jsonargparse keeps a ``str`` option's text verbatim, quotes included); everything else
    as JSON, which is valid YAML, so numbers, booleans, ``null`` and lists keep their types.
    """
    out: list[str] = []
    for key, value in values.items():
        out += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return out


def config_options(argv: Sequence[str]) -> list[tuple[int, int, str]]:
    """The ``--config`` options of ``argv`` as ``(first index, index after it, path)``, in order
    (``--config PATH``, ``-c PATH``, ``--config=PATH``)."""
    found = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            found.append((i, i + 2, argv[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, i + 1, arg.split("=", 1)[1]))
    return found


def with_experiment_defaults(argv: list[str]) -> list[str]:
    """Put ``defaults.yaml`` from the first ``--config``'s folder before it (shared trainer, logger, callbacks).

    Every ``experiments/<model>.yaml`` is complete relative to ``experiments/defaults.yaml``; this makes
    ``lightning fit --config experiments/viv1t.yaml`` read both, in that order. An explicit
    ``--config .../defaults.yaml`` anywhere disables it.
    """
    options = config_options(argv)
    if not options:
        return argv
    start, stop, path = options[0]
    defaults = Path(path).parent / DEFAULTS_FILE
    if Path(path).name == DEFAULTS_FILE or not defaults.is_file() or any(DEFAULTS_FILE in a for a in argv):
        return argv
    return [*argv[:start], "--config", str(defaults), "--config", path, *argv[stop:]]
