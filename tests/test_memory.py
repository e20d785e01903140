"""The pre-flight memory check: an allocation-free estimate of a training step, and a fit that stops before its first
step with the memory it needs when the device cannot hold it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sensorium.callbacks import memory
from lightning_sensorium.callbacks.memory import InsufficientMemoryError, MemoryCheck, estimate_training_memory
from lightning_sensorium.launch import run_lightning, with_experiment_defaults
from tests.test_experiments import tiny_args


class _Toy(nn.Module):
    """A stand-in encoder with the Encoder's call signature: two linear layers over the last axis."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(
        self, video: torch.Tensor, mouse: str, behavior: object = None, pupil_center: object = None
    ) -> torch.Tensor:
        return self.b(torch.relu(self.a(video)))


def _batch(b: int) -> dict[str, object]:
    return {"video": torch.randn(b, 1, 10, 16), "mouse_id": "m"}


def test_estimate_counts_weights_optimizer_state_and_saved_activations() -> None:
    toy = _Toy()
    est = estimate_training_memory(toy, _batch(4), optimizer_states=2, weight_copies=2)
    params = sum(p.numel() for p in toy.parameters()) * 4
    assert est.weights == 2 * params and est.gradients == params and est.optimizer == 2 * params
    # Saved for backward: the input of `a` (4·10·16), relu's output (4·10·32, also `b`'s input); float32.
    assert est.activations == (4 * 10 * 16 + 4 * 10 * 32) * 4
    assert estimate_training_memory(toy, _batch(8)).activations == 2 * est.activations  # linear in the batch
    assert estimate_training_memory(toy, _batch(4), low_precision=True).activations == est.activations // 2
    assert all(p.device.type == "cpu" for p in toy.parameters())  # the model itself is untouched


def test_fused_attention_is_counted_without_the_attention_matrix() -> None:
    """Meta tensors fall back to the math kernel, which saves the L × L attention matrix; the estimate counts what
    the fused kernels save (q, k, v, output, log-sum-exp) instead."""

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, video: torch.Tensor, mouse: str, **_: object) -> torch.Tensor:
            q = self.proj(video)  # (B, heads, L, d)
            return nn.functional.scaled_dot_product_attention(q, q, q)

    est = estimate_training_memory(Attention(), {"video": torch.randn(1, 2, 512, 8), "mouse_id": "m"})
    assert est.activations < 2 * 512 * 512 * 4  # far below one head's attention matrix
    assert est.activations >= 2 * 512 * 8 * 4 * 2  # at least the input and q


def _fit_args(tiny_stores: Path, tmp_path: Path) -> list[str]:
    return with_experiment_defaults(
        [
            "fit",
            *tiny_args("factorized.yaml", tiny_stores, tmp_path),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--data.batch_size",
            "2",
        ]
    )


def test_a_fit_that_cannot_fit_stops_before_its_first_step(
    tiny_stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)  # 1 KiB free
    with pytest.raises(InsufficientMemoryError) as err:
        run_lightning(_fit_args(tiny_stores, tmp_path))
    message = str(err.value)
    assert "GiB to train at batch size 2" in message and "activations" in message
    assert "experiments/cpu/" in message and "data.batch_size" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before any step
    assert "precision 32-true" in message
    assert "(not even batch size 1 fits)" in message


def test_the_message_names_the_largest_batch_that_fits(
    tiny_stores: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saved activations grow with the batch, the rest does not: 4 GiB of activations at batch size 2, 3 GiB of
    gradients and optimiser state, 6 GiB usable: batch size 1 fits."""
    gib = 2**30
    estimate = memory.MemoryEstimate(weights=0, gradients=gib, optimizer=2 * gib, activations=4 * gib)
    monkeypatch.setattr(memory, "estimate_training_memory", lambda *args, **kwargs: estimate)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(6 * gib / 0.9))
    with pytest.raises(InsufficientMemoryError, match=r"\(at most batch size 1 would fit\)"):
        run_lightning(_fit_args(tiny_stores, tmp_path))


def test_a_fit_that_fits_runs_and_keeps_its_estimate(tiny_stores: Path, tmp_path: Path) -> None:
    cli = run_lightning(_fit_args(tiny_stores, tmp_path))
    assert cli.trainer.global_step == 2
    check = next(c for c in cli.trainer.callbacks if isinstance(c, MemoryCheck))
    assert check.estimate is not None and 0 < check.estimate.activations < check.estimate.total
    assert check.estimate.optimizer == 2 * check.estimate.gradients > 0  # AdamW: two states per parameter


def test_the_example_batch_has_the_training_shapes_and_no_data(tiny_stores: Path, tmp_path: Path) -> None:
    cli = run_lightning(with_experiment_defaults(tiny_args("factorized.yaml", tiny_stores, tmp_path)), run=False)
    dm = cli.datamodule
    dm.setup("fit")
    real = next(iter(dm.train_dataloader()))
    example = dm.example_batch()
    for key in ("video", "behavior", "pupil_center"):
        assert example[key].shape == real[key].shape and example[key].device.type == "meta"
    assert isinstance(example["mouse_id"], str)


def test_headroom_must_be_a_fraction() -> None:
    with pytest.raises(ValueError, match="headroom"):
        MemoryCheck(headroom=1.5)
