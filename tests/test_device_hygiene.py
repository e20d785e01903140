"""Device and dtype hygiene without a GPU: nothing in the training hot path creates or reads a CPU tensor behind the
caller's back, and bf16 autocast creates no float64.

Every experiment's tiny model, its batch, the loss, the metrics, the EMA blend and CutMix run on the ``meta`` device
(shapes only) under :class:`DeviceRecorder`, a dispatch mode that sees every ATen op, including those of the
backward pass: any op that returns a CPU tensor (``torch.zeros(n)``, ``torch.arange(n)``, ``torch.tensor(...)``
without ``device=``) or reads one (a CPU constant mixed into device arithmetic, a host-to-device copy per step) is
what a GPU would pay for with a transfer and a sync, or fail on. The same models then take a real step under bf16
autocast on the CPU.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from lightning_sensorium.callbacks.cutmix import cutmix_batch
from lightning_sensorium.callbacks.ema import EMAMultiAvg
from lightning_sensorium.callbacks.memory import _to_meta
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from lightning_sensorium.metrics import MetricGroup
from tests.test_experiments import tiny_args

#: The five experiments that train from scratch (the distillation stage is DwiseNeuro's model again).
MODELS = ["factorized", "gru", "dwiseneuro", "dynamic_v1fm", "viv1t"]


class DeviceRecorder(TorchDispatchMode):
    """Records every ATen op that returns or reads a tensor on a device in ``devices`` (op, shapes, the caller).

    ``host_values``: values drawn on the host on purpose (CutMix's numpy draws) may become CPU tensors
    (``torch.from_numpy``: ``aten.lift_fresh``) and be copied to the device explicitly (``aten._to_copy``); any
    other op reading a CPU tensor is still recorded."""

    HOST_OPS = ("aten.lift_fresh.default", "aten._to_copy.default")

    def __init__(self, devices: tuple[str, ...] = ("cpu",), host_values: bool = False) -> None:
        super().__init__()
        self.devices, self.host_values = devices, host_values
        self.hits: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs, ins = tree_flatten(out)[0], tree_flatten((args, kwargs))[0]
        created = [t for t in outs if isinstance(t, torch.Tensor) and t.device.type in self.devices]
        read = [t for t in ins if isinstance(t, torch.Tensor) and t.device.type in self.devices]
        if self.host_values and str(func) in self.HOST_OPS:
            created, read = [], []
        if created or read:
            where = "".join(traceback.format_stack(limit=6)[:-1])
            self.hits.append(f"{func}: created {[tuple(t.shape) for t in created]}, read {len(read)}\n{where}")
        return out


def _experiment(model: str, stores: Path, tmp_path: Path) -> Any:
    args = tiny_args(f"{model}.yaml", stores, tmp_path, "--data.batch_size", "2", "--data.eval_batch_size", "2")
    cli = run_lightning(with_experiment_defaults(args), run=False)
    cli.datamodule.setup("fit")
    return cli


def _train_step(module: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The module's own ``training_step`` (loss + regularizer), logging switched off (no trainer attached)."""
    module.log = lambda *args, **kwargs: None
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss


@pytest.mark.parametrize("model", MODELS)
def test_training_step_on_meta_creates_no_cpu_tensor(model: str, tiny_stores: Path, tmp_path: Path) -> None:
    cli = _experiment(model, tiny_stores, tmp_path)
    batch = _to_meta(next(iter(cli.datamodule.train_dataloader())))
    module = cli.model.to("meta")
    recorder = DeviceRecorder()
    with recorder:
        loss = _train_step(module, batch)
    assert loss.device.type == "meta" and loss.dim() == 0
    assert not recorder.hits, "CPU tensors in the training step:\n" + "\n".join(recorder.hits[:5])
    core = [p for p in module.encoder.core.parameters() if p.requires_grad]
    assert core and all(p.grad is not None and p.grad.device.type == "meta" for p in core)


def test_the_recorder_catches_a_tensor_created_without_a_device() -> None:
    """The check above could fail: one ``torch.arange(n)`` or CPU constant in a meta computation is caught."""
    x = torch.ones(3, device="meta")
    cpu = torch.full((), 2.0)  # a CPU scalar tensor mixes into device arithmetic silently (a sync on a GPU)
    for bad in (lambda: x + torch.arange(3).to(x), lambda: x * cpu):
        recorder = DeviceRecorder()
        with recorder:
            bad()
        assert recorder.hits


@pytest.mark.parametrize("partner", ["batch", "fresh_window"])
def test_cutmix_on_meta(partner: str, tiny_stores: Path, tmp_path: Path) -> None:
    """CutMix mixes on the batch's device; only its host-drawn boxes and partners are copied there, explicitly."""
    cli = _experiment("dwiseneuro", tiny_stores, tmp_path)
    batch = _to_meta(next(iter(cli.datamodule.train_dataloader())))
    source = cli.datamodule.training_window if partner == "fresh_window" else None
    fresh = _meta_source(source) if source is not None else None
    recorder = DeviceRecorder(host_values=True)
    with recorder:
        out = cutmix_batch(batch, np.random.default_rng(0), prob=1.0, canvas=(64, 64), fresh_window=fresh)
    assert not recorder.hits, "\n".join(recorder.hits[:5])
    assert all(out[k].device.type == "meta" for k in ("video", "behavior", "pupil_center"))
    assert all(r.device.type == "meta" for r in out["responses"])


def _meta_source(source: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A window source whose samples arrive on the meta device, read from the store on the host (the loader's job,
    outside the recorder) as a GPU batch's fresh partners are read and then copied."""

    def read(*args: Any, **kwargs: Any) -> dict[str, Any]:
        with _disable_current_modes():
            return _to_meta(source(*args, **kwargs))

    return read


def test_metrics_update_on_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scored frames are picked by a boolean mask (a data-dependent shape: one sync per evaluation batch on a
    GPU, no copy); on meta, torch assumes every frame is kept."""
    monkeypatch.setattr(torch.fx.experimental._config, "meta_nonzero_assume_all_nonzero", True)
    group = MetricGroup(num_neurons=5, num_clips=2, skip_frames=2).to("meta")
    pred, target = torch.empty(3, 5, 8, device="meta"), torch.empty(3, 5, 8, device="meta")
    clips, lengths = torch.zeros(3, dtype=torch.long, device="meta"), torch.full((3,), 8, device="meta")
    recorder = DeviceRecorder()
    with recorder:
        group.update(pred, target, clips, lengths, rates=pred)
    assert not recorder.hits, "\n".join(recorder.hits[:5])
    assert all(state.device.type == "meta" for state in group.buffers())


def test_ema_blend_on_meta() -> None:
    averaged = [torch.empty(4, 3, device="meta"), torch.empty((), dtype=torch.long, device="meta")]
    current = [torch.empty(4, 3, device="meta"), torch.empty((), dtype=torch.long, device="meta")]
    recorder = DeviceRecorder()
    with recorder:
        for group in ([averaged[0]], [current[0]]), ([averaged[1]], [current[1]]):  # one dtype per call
            EMAMultiAvg(0.99)(*group, torch.ones((), device="meta"))
    assert not recorder.hits, "\n".join(recorder.hits[:5])


@pytest.mark.parametrize("model", MODELS)
def test_training_step_under_bf16_autocast(model: str, tiny_stores: Path, tmp_path: Path) -> None:
    """A real step under CPU bf16 autocast: no float64 tensor anywhere, convolutions or matmuls in bf16, finite
    float32 gradients (the parameters stay float32)."""
    cli = _experiment(model, tiny_stores, tmp_path)
    batch = next(iter(cli.datamodule.train_dataloader()))
    module = cli.model
    recorder = DtypeRecorder()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _train_step(module, batch)
    assert torch.isfinite(loss)
    assert not recorder.float64, "float64 under autocast:\n" + "\n".join(recorder.float64[:5])
    assert recorder.bf16_compute, "no convolution or matmul ran in bf16"
    grads = [p.grad for p in module.encoder.core.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


class DtypeRecorder(TorchDispatchMode):
    """Ops returning float64 tensors, and how many convolutions/matmuls returned bf16."""

    COMPUTE = ("convolution", "mm", "bmm", "addmm", "baddbmm", "_scaled_dot_product")

    def __init__(self) -> None:
        super().__init__()
        self.float64: list[str] = []
        self.bf16_compute = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in outs):
            self.float64.append(f"{func}\n" + "".join(traceback.format_stack(limit=6)[:-1]))
        name = str(func).split(".")[1]
        if name.startswith(self.COMPUTE) and any(t.dtype == torch.bfloat16 for t in outs):
            self.bf16_compute += 1
        return out
