"""`lightning-sensorium insilico EXPERIMENT`: one experiment on a checkpoint (or ensemble) or on a synthetic mouse's
generator, results to zarr and PNG figures, scored against the ground truth where the mouse is synthetic.

Every input is checked (mouse, neuron ids, clips' size and frame rate, output paths) before any stimulus is shown,
and both outputs are written atomically: a failed run leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sensorium.data.layout import FPS
from lightning_sensorium.data.synthetic import ground_truth_mice, load_neuron_parameters
from lightning_sensorium.insilico import EXPERIMENTS
from lightning_sensorium.insilico import experiments as ex
from lightning_sensorium.insilico.responders import GroundTruth, Responder, load_trained
from lightning_sensorium.insilico.stimuli import standard_states
from lightning_sensorium.insilico.truth import recovery, truth_variables


def figures_folder(out: str | Path) -> Path:
    """Default figure folder of a results store: ``results.zarr`` → ``results_figures/``."""
    out = Path(out)
    stem = out.name[: -len(".zarr")] if out.name.endswith(".zarr") else out.name
    return out.with_name(f"{stem}_figures")


def make_responder(
    ckpt_paths: Sequence[str | Path],
    ground_truth: str | Path | None,
    mouse: str | None,
    data: dict[str, Any] | None = None,
    device: str = "cpu",
) -> Responder:
    """The checkpoint(s) as a responder, or without checkpoints the generator of ``ground_truth``'s ``mouse``."""
    if ckpt_paths:
        return load_trained(ckpt_paths, mouse, data, device)
    if ground_truth is None:
        raise ValueError("give --ckpt_path (a trained model) or --ground-truth RELEASE (the generator), or both")
    mice = ground_truth_mice(ground_truth)
    if mouse is None:
        if len(mice) != 1:
            raise ValueError(f"--mouse: choose the mouse whose neurons to study, one of {mice}")
        mouse = mice[0]
    if mouse not in mice:
        raise ValueError(f"--mouse {mouse}: not a mouse of {ground_truth}; its mice are {mice}")
    return GroundTruth.from_release(ground_truth, mouse)


def run_experiment(
    experiment: str,
    responder: Responder,
    neurons: Sequence[int] | None = None,
    *,
    clips: Sequence[Any] = (),
    state: str = "quiet",
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[ex.Result]:
    """The results of ``experiment`` (several for ``size``: RF and tuning first)."""
    common: dict[str, Any] = {"batch_size": batch_size, "progress": progress}
    if experiment == "rf":
        return [ex.receptive_fields(responder, neurons, state=state, seed=seed, **common)]
    if experiment == "gradient_rf":
        return [ex.gradient_receptive_fields(responder, neurons, state=state, **common)]
    if experiment == "tuning":
        return [ex.grating_tuning(responder, neurons, state=state, **common)]
    if experiment == "size":
        rf = ex.receptive_fields(responder, neurons, state=state, seed=seed, **common)
        tuning = ex.grating_tuning(responder, neurons, state=state, **common)
        centers = np.stack([rf["rf_x"], rf["rf_y"]], 1)
        size = ex.size_tuning(
            responder,
            neurons,
            centers=centers,
            directions=tuning["pref_direction"],
            sf=tuning["pref_sf"],
            tf=tuning["pref_tf"],
            state=state,
            **common,
        )
        return [rf, tuning, size]
    if experiment == "behavior":
        return [ex.behavior_modulation(responder, neurons, **common)]
    if experiment == "clips":
        return [
            ex.clip_responses(
                responder,
                [c.video for c in clips],
                neurons,
                names=[c.name for c in clips],
                behaviors=[c.behavior for c in clips],
                state=state,
                progress=progress,
            )
        ]
    if experiment == "mei":
        from lightning_sensorium.insilico.mei import most_exciting_inputs

        return [most_exciting_inputs(responder, neurons, seed=seed, progress=progress)]
    raise ValueError(f"experiment {experiment!r}: expected one of {', '.join(EXPERIMENTS)}")


def _truth_of(responder: Responder, ground_truth: str | Path | None) -> Any:
    """The ground-truth parameters of the responder's mouse (None without a release); their neurons must match."""
    if ground_truth is None:
        return None
    params = load_neuron_parameters(ground_truth, responder.mouse_id)
    if len(params.channel) != len(responder.unit_ids):
        raise ValueError(
            f"--ground-truth {ground_truth}: {len(params.channel)} neurons for mouse {responder.mouse_id}, "
            f"the model has {len(responder.unit_ids)}"
        )
    return params


def _clips_of(responder: Responder, clips: str | Path | None) -> list[Any]:
    """The ``--clips`` stimuli, every one checked against the responder's frame size and grey range."""
    if clips is None:
        return []
    from lightning_sensorium.inference import check_stimulus, load_stimuli

    stimuli = load_stimuli(clips)
    for s in stimuli:
        check_stimulus(s, responder.video_shape)
    return stimuli


def run_insilico(
    experiment: str,
    out: str | Path,
    *,
    ckpt_paths: Sequence[str | Path] = (),
    ground_truth: str | Path | None = None,
    mouse: str | None = None,
    neurons: Sequence[int] | None = None,
    clips: str | Path | None = None,
    fps: float = FPS,
    state: str = "quiet",
    data: dict[str, Any] | None = None,
    device: str = "cpu",
    seed: int = 0,
    batch_size: int = 8,
    figures: str | Path | None = None,
    tensorboard: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run ``experiment`` and write ``out`` (zarr) and its figures (default :func:`figures_folder`), and with
    ``tensorboard`` the figures and recovery scores into that TensorBoard run."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment {experiment!r}: expected one of {', '.join(EXPERIMENTS)}")
    out = Path(out)
    fig_dir = Path(figures) if figures is not None else figures_folder(out)
    for path, what in ((out, "--out"), (fig_dir, "--figures")):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it")
    if (experiment == "clips") != (clips is not None):
        raise ValueError("--clips (a video .npy or a folder of them) goes with the clips experiment, and only there")
    if state not in ("quiet", "running", "small_pupil", "large_pupil"):
        raise ValueError(f"--state {state!r}: expected quiet, running, small_pupil or large_pupil")
    responder = make_responder(ckpt_paths, ground_truth, mouse, data, device)
    if not np.isclose(fps, responder.fps):
        raise ValueError(f"--fps {fps:g}: the model's stimuli run at {responder.fps:g} Hz; resample them first")
    index = responder.neuron_index(neurons)  # unknown ids fail here, before any stimulus
    params = _truth_of(responder, ground_truth)
    stimuli = _clips_of(responder, clips)
    results = run_experiment(
        experiment,
        responder,
        neurons,
        clips=stimuli,
        state=state,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    if params is not None:
        for res in results:
            per, summary = recovery(res, params, index)
            res.variables.update(truth_variables(params, index))
            res.variables.update(per)
            res.attrs["recovery"] = summary
    states = standard_states(responder.behavior_mean, responder.behavior_std)
    attrs = {
        "experiment": experiment,
        "mouse_id": responder.mouse_id,
        "responder": type(responder).__name__,
        "checkpoints": [str(c) for c in ckpt_paths],
        "ground_truth": None if ground_truth is None else str(ground_truth),
        "state": {"name": state, "pupil_size": states[state].pupil_size, "speed": states[state].speed},
        "seed": seed,
        "gaze": [float(v) for v in responder.rest_pupil_center],
    }
    from lightning_sensorium.insilico.output import write_results, write_tensorboard

    written = write_results(results, out, attrs, figures=fig_dir, overwrite=overwrite)
    if tensorboard is not None:
        write_tensorboard(results, tensorboard, attrs)
    return written
