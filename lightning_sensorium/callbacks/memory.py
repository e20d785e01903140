"""Pre-flight memory check: estimate a fit's peak memory before the first step and stop early if it cannot fit.

Without it, a full-size recipe on a machine too small for it (e.g. ``experiments/viv1t.yaml`` on a 24 GiB CPU
machine) is killed by the kernel minutes into training without a word. The estimate allocates nothing and reads no
data: the encoder's forward runs once on the ``meta`` device (shapes only) with a training batch's shapes, and every
tensor autograd saves for the backward pass is counted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

log = logging.getLogger(__name__)

GIB = 1024**3


#: What :class:`MemoryCheck` suggests when it knows nothing of the experiment's files.
DEFAULT_HINT = (
    "Train the CPU-sized recipe of the experiment (a second --config after it: experiments/cpu/<model>.yaml), "
    "or lower data.batch_size or data.frames, or use a device with more memory."
)


class InsufficientMemoryError(MemoryError):
    """The fit's estimated peak memory exceeds what the device has free."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory in bytes, by part.

    Attributes:
        weights: parameters and buffers (once, plus once per averaged copy such as an EMA).
        gradients: one gradient per trainable parameter.
        optimizer: the optimiser's state (Adam/AdamW: two tensors per trainable parameter).
        activations: tensors saved for the backward pass at the batch size (the bulk for video models).
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations")
        return ", ".join(f"{p} {_size(getattr(self, p))}" for p in parts)


def _size(n: int) -> str:
    """Bytes as GiB from 1 GiB on, else MiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def _to_meta(x: Any) -> Any:
    """Tensors of a (nested) batch on the meta device; everything else as it is."""
    if isinstance(x, Tensor):
        return x.to("meta")
    if isinstance(x, Mapping):
        return {k: _to_meta(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_to_meta(v) for v in x)
    return x


class _FusedAttention(torch.autograd.Function):
    """Shapes-only stand-in for the fused attention kernels (flash, memory-efficient) that a real device runs: it
    saves q, k, v, the output and a per-row log-sum-exp, not the ``L × L`` attention matrix that the meta device's
    fallback (the math kernel) would save."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, heads, L, d_v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))  # log-sum-exp: (B, heads, L)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Route unmasked ``F.scaled_dot_product_attention`` calls through :class:`_FusedAttention`."""
    original = F.scaled_dot_product_attention

    def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if attn_mask is None and kwargs.get("attn_mask") is None:
            return _FusedAttention.apply(q, k, v)
        return original(q, k, v, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = sdpa  # type: ignore[assignment]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activation_bytes(encoder: nn.Module, batch: Mapping[str, Any], low_precision: bool = False) -> int:
    """Bytes autograd saves for the backward pass of ``encoder`` on ``batch`` (each mouse of a mixed batch through
    its own readout), measured on the meta device: no memory is allocated and no arithmetic is done.

    ``low_precision`` halves floating-point activations (bf16/fp16 autocast saves most of them in 16 bits).
    """
    params = {
        n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in encoder.named_parameters()
    }
    buffers = {n: torch.empty_like(b, device="meta") for n, b in encoder.named_buffers()}
    skip = {id(t) for t in params.values()}
    seen: set[int] = set()
    keep: list[Tensor] = []  # holds the saved tensors so that their ids stay unique while counting
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        root = t._base if t._base is not None else t  # views share their base's memory: count the base once
        if id(root) in skip or id(root) in seen:
            return t
        seen.add(id(root))
        keep.append(root)
        size = root.numel() * root.element_size()
        total += size // 2 if low_precision and root.is_floating_point() and root.element_size() == 4 else size
        return t

    meta = _to_meta(batch)
    mice = meta["mouse_id"]
    groups = [(mice, slice(None))] if isinstance(mice, str) else [(m, _rows(mice, m)) for m in sorted(set(mice))]
    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for mouse, rows in groups:
            inputs = {k: (v[rows] if isinstance(v, Tensor) else None) for k, v in meta.items()}
            args = (inputs["video"], mouse)
            kwargs = {"behavior": inputs.get("behavior"), "pupil_center": inputs.get("pupil_center")}
            functional_call(encoder, {**params, **buffers}, args, kwargs)
    return total


def _rows(mice: list[str], mouse: str) -> Tensor:
    return torch.tensor([i for i, m in enumerate(mice) if m == mouse], dtype=torch.long)


def estimate_training_memory(
    encoder: nn.Module,
    batch: Mapping[str, Any],
    optimizer_states: int = 2,
    weight_copies: int = 1,
    low_precision: bool = False,
) -> MemoryEstimate:
    """Peak memory of a training step of ``encoder`` on ``batch``: weights × ``weight_copies`` (1 + averaged
    copies), gradients, ``optimizer_states`` tensors per trainable parameter, and the saved activations."""
    trainable = sum(p.numel() * p.element_size() for p in encoder.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in encoder.parameters())
    weights += sum(b.numel() * b.element_size() for b in encoder.buffers())
    return MemoryEstimate(
        weights=weights * weight_copies,
        gradients=trainable,
        optimizer=trainable * optimizer_states,
        activations=saved_activation_bytes(encoder, batch, low_precision),
    )


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device``: a CUDA device's free memory, the host's ``MemAvailable`` for the CPU; None where
    it cannot be read (then nothing is checked)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemoryCheck(L.Callback):
    """Before the first training step, estimates the fit's peak memory and stops with a clear message if the device
    cannot hold it (the memory needed, what it is made of, and what to change), instead of an out-of-memory kill
    minutes later. The estimate takes about a second (one forward pass on the meta device with the shapes of
    ``datamodule.example_batch()``) and runs once per fit, before the sanity check.

    Args:
        headroom: the fraction of the free memory the step may use (the rest: the data loader, the allocator's
            fragmentation, the evaluation batches).
        hint: what to suggest when the fit does not fit; None: :data:`DEFAULT_HINT` (the CLI names the experiment's
            own CPU recipe here).
    """

    def __init__(self, headroom: float = 0.9, hint: str | None = None) -> None:
        if not 0 < headroom <= 1:
            raise ValueError(f"MemoryCheck headroom={headroom}: expected a fraction in (0, 1]")
        self.headroom = headroom
        self.hint = hint
        self.estimate: MemoryEstimate | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Runs before the sanity check and the first step; needs a datamodule with ``example_batch()``."""
        encoder = getattr(pl_module, "encoder", None)
        example = getattr(getattr(trainer, "datamodule", None), "example_batch", None)
        free = available_bytes(pl_module.device)
        if encoder is None or example is None or free is None:
            return
        batch = example()
        states = max((len(_state_kinds(opt)) for opt in trainer.optimizers), default=0)
        callbacks: list[L.Callback] = getattr(trainer, "callbacks", [])
        copies = 1 + sum(type(cb).__name__ == "EMA" for cb in callbacks)
        precision = str(trainer.precision)
        try:
            estimate = estimate_training_memory(
                encoder, batch, states, copies, low_precision=precision.startswith(("bf16", "16"))
            )
        except (NotImplementedError, RuntimeError) as err:  # an op without a meta kernel: no estimate, no check
            log.debug("memory estimate skipped: %s", err)
            return
        self.estimate = estimate
        # The weights (and their averaged copies) are resident already and not counted in `free`.
        more = estimate.total - estimate.weights
        processes = trainer.world_size if trainer.strategy.root_device.type == "cpu" else 1
        more *= processes  # CPU processes share the host's memory
        if more > self.headroom * free:
            # The saved activations grow with the batch, the rest does not: the largest batch that would fit.
            per_sample = estimate.activations / _batch_size(batch)
            room = self.headroom * free / processes - (estimate.gradients + estimate.optimizer)
            largest = int(room // per_sample) if per_sample > 0 and room > 0 else 0
            fits = f"at most batch size {largest} would fit" if largest else "not even batch size 1 fits"
            raise InsufficientMemoryError(
                f"this fit needs about {estimate.total / GIB:.1f} GiB to train at batch size {_batch_size(batch)} "
                f"({estimate.describe()}; precision {precision}), {more / GIB:.1f} GiB more than it holds now, but the "
                f"{pl_module.device.type} has {free / GIB:.1f} GiB free ({fits}). {self.hint or DEFAULT_HINT}"
            )


def _state_kinds(optimizer: torch.optim.Optimizer) -> list[str]:
    """Per-parameter state tensors the optimiser keeps (Adam/AdamW: exp_avg, exp_avg_sq; SGD with momentum: one)."""
    name = type(optimizer).__name__.lower()
    defaults = optimizer.defaults
    if "adam" in name:
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if defaults.get("amsgrad") else [])
    if name == "sgd":
        return ["momentum_buffer"] if defaults.get("momentum", 0) else []
    return ["state"]


def _batch_size(batch: Mapping[str, Any]) -> int:
    return int(batch["video"].shape[0])
