"""`evaluate` and ensembles: the ensemble recipe, averaged predictions, per-type breakdown, JSON/Markdown/TensorBoard.

Two tiny factorized models are fitted once per session by the `ensemble` subcommand (seeds 0 and 1); the other
test modules of this task (`test_submission.py`, `test_inference.py`) reuse them through :func:`fitted`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_sensorium.cli import main
from lightning_sensorium.data.batch import NeuronInfo
from lightning_sensorium.data.datamodule import SensoriumDataModule
from lightning_sensorium.ensemble import EnsembleModule
from tests.test_training import FAST

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
#: A factorized model shrunk to seconds on CPU.
TINY_FIT = ["--model.core.init_args.hidden_channels", "[4, 4, 4]", *FAST]


def fitted(tmp_path_factory: pytest.TempPathFactory, stores: Path) -> dict[str, Any]:
    """Fit the two-seed ensemble once per test session (cached in the session's base temp folder)."""
    base = tmp_path_factory.getbasetemp() / "submission_helper_fits"
    done = base / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    base.mkdir(parents=True, exist_ok=True)
    metrics = base / "ensemble.json"
    args = ["ensemble", "--config", str(EXPERIMENTS / "factorized.yaml"), "--seeds", "0", "1"]
    args += ["--tiers", "final_test_main"]
    args += ["--accelerator", "cpu", "--output", str(metrics), "--markdown", str(base / "ensemble.md"), "--"]
    args += ["--data.root", str(stores), "--trainer.logger.init_args.save_dir", str(base / "runs"), *TINY_FIT]
    assert main(args) == 0
    results = json.loads(metrics.read_text())
    info = {
        "checkpoints": results["checkpoints"],
        "ensemble_json": str(metrics),
        "ensemble_md": str(base / "ensemble.md"),
    }
    done.write_text(json.dumps(info))
    return info


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory, tiny_stores: Path) -> dict[str, Any]:
    return fitted(tmp_path_factory, tiny_stores)


def fitted_raw(tmp_path_factory: pytest.TempPathFactory, stores: Path) -> str:
    """A tiny factorized model trained on raw responses (``data.normalization: raw``, as DwiseNeuro), fitted once
    per test session; returns its last checkpoint."""
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults

    base = tmp_path_factory.getbasetemp() / "raw_scale_fit"
    done = base / "checkpoint.txt"
    if done.is_file():
        return done.read_text()
    args = ["fit", "--config", str(EXPERIMENTS / "factorized.yaml"), "--data.root", str(stores)]
    args += ["--trainer.logger.init_args.save_dir", str(base / "runs"), *TINY_FIT, "--data.normalization", "raw"]
    cli = run_lightning(with_experiment_defaults(args))
    ckpt = str(cli.trainer.checkpoint_callback.last_model_path)
    done.write_text(ckpt)
    return ckpt


def _precision(store: Any) -> np.ndarray:
    """The official per-frame precision ``(T, N)`` by hand (neuralpredictors' NeuroNormalizer)."""
    s = np.asarray(store.statistics["responses"]["std"], dtype=np.float64)
    threshold = 0.01 * np.nanmean(s)
    return np.where(s > threshold, 1 / np.where(s > threshold, s, 1), 1 / threshold)


def raw_model_scores_by_hand(ckpt: str, stores: Path, tier: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per mouse, the per-neuron single-trial correlation of a raw-scale model on ``tier``, by hand: on the
    competition's scale (predictions and raw responses × the official per-frame precision) and the old way
    (predictions against ReLU'd raw responses)."""
    from lightning_sensorium.module import SensoriumModule

    model = SensoriumModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    dm = SensoriumDataModule(root=str(stores), frames=24, normalization="raw")
    frames: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in dm.mouse_ids}
    with torch.no_grad():
        for batch in dm.trial_loader([tier]):
            batch.pop("response_scale")
            pred = model.predict_whole_trials(batch).double().numpy()  # (B, N, T) on the model's (raw) scale
            store = dm.stores[batch["mouse_id"]]
            for i, (trial, length) in enumerate(zip(batch["trial"].tolist(), batch["length"].tolist(), strict=True)):
                raw = store.read(trial, 0, length)["responses"][50:].astype(np.float64)  # (L − 50, N)
                frames[batch["mouse_id"]].append((pred[i, :, 50:length].T, raw, _precision(store)[50:length]))
    out = {}
    for mouse, parts in frames.items():
        p, r, s = (np.concatenate(x) for x in zip(*parts, strict=True))
        out[mouse] = (_pearson(p * s, r * s), _pearson(p, np.maximum(r, 0)))
    return out


def _pearson(x: np.ndarray, y: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Per-column Pearson correlation with population stds + eps (the official `corr`), ``(M, N)`` → ``(N,)``."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return (xc * yc).mean(0) / ((xc.std(0) + eps) * (yc.std(0) + eps))


def test_ensemble_recipe_equals_hand_averaged_predictions(fits: dict[str, Any], tiny_stores: Path) -> None:
    from lightning_sensorium.module import SensoriumModule

    results = json.loads(Path(fits["ensemble_json"]).read_text())
    assert results["seeds"] == [0, 1] and len(results["checkpoints"]) == 2
    assert "seed0" in results["checkpoints"][0] and "seed1" in results["checkpoints"][1]
    members = [SensoriumModule.load_from_checkpoint(c, map_location="cpu").eval() for c in results["checkpoints"]]
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    frames: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {m: ([], []) for m in dm.mouse_ids}
    differ = False
    with torch.no_grad():
        for batch in dm.trial_loader(["final_test_main"]):
            a, b = (m.predict_whole_trials(batch) for m in members)  # (B, N, T)
            differ |= not torch.allclose(a[..., 50:], b[..., 50:])
            avg = (a + b) / 2
            for i, length in enumerate(batch["length"].tolist()):
                frames[batch["mouse_id"]][0].append(avg[i, :, 50:length].T.numpy())  # (T', N)
                frames[batch["mouse_id"]][1].append(batch["responses"][i, :, 50:length].T.numpy())
    assert differ, "two seeds should give two different models"
    per_neuron = {m: _pearson(np.concatenate(p).astype(np.float64), np.concatenate(t)) for m, (p, t) in frames.items()}
    tier = results["tiers"]["final_test_main"]
    pooled = np.concatenate(list(per_neuron.values())).mean()  # the official neuron-weighted mean
    assert tier["pooled"]["single_trial_corr"] == pytest.approx(pooled, abs=1e-5)
    for mouse, corr in per_neuron.items():
        assert tier["per_mouse"][mouse]["single_trial_corr"] == pytest.approx(corr.mean(), abs=1e-5)
    md = Path(fits["ensemble_md"]).read_text()
    assert "Ensemble members" in md and "| final_test_main |" in md


class _Fake(nn.Module):
    """A member whose prediction is fixed: lets the averaging rule be checked exactly."""

    def __init__(self, pred: torch.Tensor, neurons: dict[str, NeuronInfo]) -> None:
        super().__init__()
        self.pred, self.neurons = pred, neurons

    def predict_whole_trials(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.pred


def _neurons(ids: list[int]) -> dict[str, NeuronInfo]:
    n = len(ids)
    return {"m": NeuronInfo("m", np.array(ids), np.zeros((n, 3)), np.zeros(n))}


def test_ensemble_averages_where_members_predict() -> None:
    a = torch.tensor([[[math.nan, math.nan, 1.0, 3.0]]])  # (1, 1, 4): loses 2 leading frames
    b = torch.tensor([[[math.nan, 2.0, 3.0, 5.0]]])  # loses 1
    ens = EnsembleModule([_Fake(a, _neurons([1])), _Fake(b, _neurons([1]))])
    out = ens.predict_whole_trials({})
    assert torch.isnan(out[0, 0, 0])
    assert out[0, 0, 1:].tolist() == [2.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="other neurons"):
        EnsembleModule([_Fake(a, _neurons([1])), _Fake(b, _neurons([2]))], checkpoints=["a.ckpt", "b.ckpt"])


def test_evaluate_outputs_and_stimulus_types(fits: dict[str, Any], tiny_stores: Path, tmp_path: Path) -> None:
    out, md, tb = tmp_path / "m.json", tmp_path / "m.md", tmp_path / "tb"
    ckpt = fits["checkpoints"][0]
    args = ["evaluate", "--ckpt_path", ckpt, "--tiers", "oracle", "final_test_bonus", "--max-trials", "5"]
    args += ["--output", str(out), "--markdown", str(md), "--tensorboard", str(tb), "--accelerator", "cpu", "--quiet"]
    assert main(args) == 0
    results = json.loads(out.read_text())
    assert list(results["tiers"]) == ["oracle", "final_test_bonus"] and results["max_trials"] == 5
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24)
    bonus = results["tiers"]["final_test_bonus"]
    assert all(n == 5 for n in bonus["trials"].values())
    expected_types = set()
    for mouse in dm.mouse_ids:
        store = dm.stores[mouse]
        rows = dm.selected_trials(mouse, "final_test_bonus", max_trials=5)
        expected_types |= {store.stimulus_labels[int(c)] for c in store.stimulus_code[rows]}
    assert set(bonus["per_stimulus_type"]) == expected_types and len(expected_types) >= 2
    for sub in bonus["per_stimulus_type"].values():
        assert -1 <= sub["pooled"]["single_trial_corr"] <= 1 and "oracle_corr" in sub["pooled"]
    assert sum(sum(s["trials"].values()) for s in bonus["per_stimulus_type"].values()) == 10
    assert "fraction_of_ground_truth" in results["tiers"]["oracle"]["per_mouse"][dm.mouse_ids[0]]
    text = md.read_text()
    assert "| oracle | **pooled** |" in text and "final_test_bonus · " in text and "at most 5 trials" in text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"evaluate/stimulus_types", "evaluate/oracle/correlation_vs_oracle"} <= set(tags["images"])
    assert "evaluate/oracle/single_trial_corr" in tags["scalars"]
    assert any("evaluate/table" in t for t in tags["tensors"])


def test_evaluate_rejects_bad_options(fits: dict[str, Any], tmp_path: Path) -> None:
    ckpt = fits["checkpoints"][0]
    assert main(["evaluate", "--ckpt_path", ckpt, "--tiers", "validation", "--accelerator", "cpu"]) == 2
    assert main(["evaluate", "--ckpt_path", ckpt, str(tmp_path / "missing.ckpt"), "--accelerator", "cpu"]) == 2
    assert main(["evaluate", "--ckpt_path", ckpt, "--max-trials", "0", "--accelerator", "cpu"]) == 2


def test_ensemble_members_must_agree_on_the_data_scale(fits: dict[str, Any], tmp_path: Path) -> None:
    """Members trained with and without ``data.response_scale`` (or another normalisation) are refused."""
    first = fits["checkpoints"][0]
    for key, value in (("response_scale", True), ("normalization", "raw"), ("input_statistics", "time_averaged")):
        ckpt = torch.load(first, map_location="cpu", weights_only=False)
        ckpt["datamodule_hyper_parameters"][key] = value
        other = tmp_path / f"{key}.ckpt"
        torch.save(ckpt, other)
        with pytest.raises(ValueError, match=f"data.{key}="):
            EnsembleModule.from_checkpoints([first, other])


def test_raw_scale_model_is_scored_on_the_competition_scale(
    tiny_stores: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A model trained on raw responses: `evaluate` and the validation metrics (what ModelCheckpoint and
    PlateauRestore monitor) are the competition's numbers — predictions and raw responses × the official per-frame
    precision, no ReLU — computed by hand, not the old correlation with ReLU'd raw responses."""
    import lightning as L

    from lightning_sensorium.module import SensoriumModule

    ckpt = fitted_raw(tmp_path_factory, tiny_stores)
    out = tmp_path / "m.json"
    args = ["evaluate", "--ckpt_path", ckpt, "--tiers", "final_test_main", "--output", str(out)]
    assert main([*args, "--accelerator", "cpu", "--quiet"]) == 0
    results = json.loads(out.read_text())
    assert results["normalization"] == "raw"
    tier = results["tiers"]["final_test_main"]
    hand = raw_model_scores_by_hand(ckpt, tiny_stores, "final_test_main")
    for mouse, (new, old) in hand.items():
        got = tier["per_mouse"][mouse]["single_trial_corr"]
        assert got == pytest.approx(new.mean(), abs=1e-5)
        assert abs(got - old.mean()) > 1e-3, "the old ReLU'd-raw number"
    pooled = np.concatenate([new for new, _ in hand.values()]).mean()
    assert tier["pooled"]["single_trial_corr"] == pytest.approx(pooled, abs=1e-5)

    model = SensoriumModule.load_from_checkpoint(ckpt, map_location="cpu")
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    dm = SensoriumDataModule(root=str(tiny_stores), frames=24, normalization="raw")
    logged = trainer.validate(model, datamodule=dm, verbose=False)[0]
    oracle = raw_model_scores_by_hand(ckpt, tiny_stores, "oracle")
    expected = np.concatenate([new for new, _ in oracle.values()]).mean()
    assert logged["val/single_trial_corr"] == pytest.approx(expected, abs=1e-5)
    old = np.concatenate([o for _, o in oracle.values()]).mean()
    assert abs(logged["val/single_trial_corr"] - old) > 1e-3
