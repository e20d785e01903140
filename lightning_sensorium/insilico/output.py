"""Results of in-silico experiments on disk: one zarr group per experiment with named dimensions, and PNG figures.

Layout of ``results.zarr`` (zarr v3, ``dimension_names`` on every array): ``<experiment>/unit_ids (neuron)`` and
one array per result (``rf_x (neuron)``, ``sta_energy (neuron, y, x)``, ``responses (neuron, direction, sf,
tf)``, ...); text labels of a dimension (behaviour states) and the recovery scores against the ground truth are
group attributes. Both the store and the figure folder are written atomically.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_sensorium.atomic import atomic_dir
from lightning_sensorium.insilico.experiments import Result

#: Neurons drawn per figure, and side by side in the MEI-video GIF.
FIGURE_NEURONS = 12
GIF_NEURONS = 4


def _json_safe(value: Any) -> Any:
    """Attributes as strict JSON: NaN/inf → None, NumPy scalars → Python ones."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(
    results: Sequence[Result],
    out: str | Path,
    attrs: dict[str, Any],
    figures: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``results`` into the zarr store ``out`` and their PNGs into ``figures`` (if given), both atomically:
    on failure neither is left behind."""
    import zarr

    with contextlib.ExitStack() as stack:
        fig_tmp = stack.enter_context(atomic_dir(figures, overwrite=overwrite)) if figures is not None else None
        tmp = stack.enter_context(atomic_dir(out, overwrite=overwrite))
        root = zarr.open_group(str(tmp), mode="w")
        root.attrs.update(_json_safe(attrs))
        for res in results:
            group = root.create_group(res.experiment)
            labels: dict[str, list[str]] = {}
            group.create_array("unit_ids", data=np.asarray(res.unit_ids, dtype=np.int64), dimension_names=("neuron",))
            for name, (dims, arr) in res.variables.items():
                arr = np.asarray(arr)
                if arr.dtype.kind in "US":
                    labels[dims[0]] = [str(v) for v in arr]
                    continue
                if arr.dtype.kind == "f":
                    arr = arr.astype(np.float32) if arr.dtype.itemsize > 4 else arr
                group.create_array(name, data=arr, dimension_names=dims)
            group.attrs.update(_json_safe({"mouse_id": res.mouse_id, **res.attrs, "labels": labels}))
        if fig_tmp is not None:
            _draw(results, fig_tmp)
    return Path(out)


def read_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """``experiment → {name: array, "attrs": dict}`` of a results store."""
    import zarr

    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such results store")
    root = zarr.open_group(str(path), mode="r")
    out: dict[str, dict[str, Any]] = {}
    for name, group in root.groups():
        entry: dict[str, Any] = {k: np.asarray(a[...]) for k, a in group.arrays()}
        entry["attrs"] = dict(group.attrs)
        out[name] = entry
    return out


# ------------------------------------------------------------------------------------------------ figures
def _grid(n: int, cols: int = 4) -> tuple[Any, np.ndarray]:
    import matplotlib.pyplot as plt

    from lightning_sensorium import figures  # noqa: F401  (the Agg backend)

    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 1.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes


def _truth(res: Result, name: str) -> np.ndarray | None:
    return res.variables[name][1] if name in res.variables else None


def _rf_maps(res: Result, n: int) -> Any:
    maps = res["sta_energy" if "sta_energy" in res.variables else "grad_energy"]
    tx, ty = _truth(res, "true_rf_x"), _truth(res, "true_rf_y")
    fig, axes = _grid(n)
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(maps[i], cmap="magma")
        ax.plot(res["rf_x"][i], res["rf_y"][i], "c+", ms=8, label="found")
        if tx is not None and ty is not None:
            ax.plot(tx[i], ty[i], "wx", ms=6, label="truth")
        ax.set_title(f"unit {res.unit_ids[i]}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=6, frameon=False, loc="lower left")
    return fig


def _direction_curves(res: Result, n: int) -> Any:
    dirs = res["direction"]
    truth = _truth(res, "true_direction")
    fig, axes = _grid(n)
    for i, ax in enumerate(axes.flat[:n]):
        ax.plot(dirs, res["direction_curve"][i], "o-", ms=3)
        if truth is not None:
            ax.axvline(truth[i], color="0.5", ls="--", lw=0.8)
        ax.set_title(f"unit {res.unit_ids[i]}  OSI {res['osi'][i]:.2f} DSI {res['dsi'][i]:.2f}", fontsize=7)
        ax.set_xticks(dirs[::2])
    axes[-1, 0].set_xlabel("direction (deg); dashed: truth")
    return fig


def _size_curves(res: Result, n: int) -> Any:
    d = res["diameter"]
    x = np.where(np.isfinite(d), d, 2 * np.nanmax(np.where(np.isfinite(d), d, np.nan)))
    fig, axes = _grid(n)
    for i, ax in enumerate(axes.flat[:n]):
        ax.plot(x, res["size_curve"][i], "o-", ms=3)
        ax.set_title(f"unit {res.unit_ids[i]}  SSI {res['suppression_index'][i]:.2f}", fontsize=7)
    axes[-1, 0].set_xlabel("diameter (px; last: full screen)")
    return fig


def _gains(res: Result, n: int) -> Any:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7, 3), layout="constrained", squeeze=False)
    pairs = (("running_gain", "true_run_weight"), ("pupil_gain", "true_pupil_weight"))
    for ax, (gain, weight) in zip(axes[0], pairs, strict=True):
        truth = _truth(res, weight)
        if truth is not None:
            ax.scatter(truth, np.log(res[gain]), s=4)
            ax.set_xlabel(f"{weight.removeprefix('true_')} (truth)")
        else:
            ax.hist(np.log(res[gain]), bins=30)
            ax.set_xlabel("neurons")
        ax.set_ylabel(f"log {gain.replace('_', ' ')}")
    return fig


def _meis(res: Result, n: int) -> Any:
    fig, axes = _grid(n)
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(res["mei_image"][i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"unit {res.unit_ids[i]}  ×{res['image_vs_natural'][i]:.2f} natural", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


_FIGURES = {
    "receptive_field": _rf_maps,
    "gradient_receptive_field": _rf_maps,
    "tuning": _direction_curves,
    "size_tuning": _size_curves,
    "annulus_tuning": _size_curves,
    "behavior": _gains,
    "mei": _meis,
}


def figure_of(res: Result) -> Any | None:
    """The figure of one result (RF maps, direction tuning curves, size curves, behaviour gains, MEI images), or
    None for results without one."""
    from lightning_sensorium.figures import mouse_label

    draw = _FIGURES.get(res.experiment)
    if draw is None:
        return None
    fig = draw(res, min(len(res.unit_ids), FIGURE_NEURONS))
    fig.suptitle(f"{mouse_label(res.mouse_id)}: {res.experiment.replace('_', ' ')}", fontsize=8)
    return fig


def _draw(results: Sequence[Result], folder: Path) -> None:
    """One PNG per result (that has a figure) in ``folder``."""
    import matplotlib.pyplot as plt

    for res in results:
        fig = figure_of(res)
        if fig is not None:
            fig.savefig(folder / f"{res.experiment}.png", dpi=110)
            plt.close(fig)
        if "mei_video" in res.variables:
            write_gif(res["mei_video"][:GIF_NEURONS], folder / "mei_video.gif")


def write_tensorboard(results: Sequence[Result], log_dir: str | Path, attrs: dict[str, Any]) -> None:
    """The figures, the recovery scores against the truth (where known) and the run's settings into a TensorBoard
    run at ``log_dir`` (``insilico/<experiment>/...``)."""
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        writer.add_text("insilico/settings", "\n".join(f"    {k}: {v}" for k, v in _json_safe(attrs).items()))
        for res in results:
            fig = figure_of(res)
            if fig is not None:
                writer.add_figure(f"insilico/{res.experiment}", fig)
                plt.close(fig)
            for name, value in dict(res.attrs.get("recovery") or {}).items():
                if isinstance(value, int | float) and np.isfinite(value):
                    writer.add_scalar(f"insilico/{res.experiment}/recovery/{name}", float(value))
    finally:
        writer.close()


def write_gif(videos: np.ndarray, path: Path, fps: float = 30.0) -> None:
    """Grey-level videos ``(n, T, H, W)`` side by side (2-px black gaps) as one looping GIF."""
    from PIL import Image

    n, t, h, w = videos.shape
    canvas = np.zeros((t, h, n * (w + 2) - 2), np.uint8)  # (T, H, n·(W + 2) − 2)
    for i in range(n):
        canvas[:, :, i * (w + 2) : i * (w + 2) + w] = np.clip(videos[i], 0, 255).astype(np.uint8)
    frames = [Image.fromarray(f).resize((f.shape[1] * 3, f.shape[0] * 3), Image.Resampling.NEAREST) for f in canvas]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
