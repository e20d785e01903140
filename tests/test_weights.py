"""import-weights: the starter-kit baselines (and DwiseNeuro) imported from files their original code wrote
(tests/fixtures/weights/, made by tools/make_weight_fixtures.py) predict what the original predicted, alone and as
an ensemble; bad files, mice and neurons are refused with one clear error and nothing written."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sensorium.cli import main as cli_main
from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.synthetic import synthesize
from lightning_sensorium.ensemble import EnsembleModule
from lightning_sensorium.module import SensoriumModule
from lightning_sensorium.weights import WeightsError
from lightning_sensorium.weights.importer import import_weights

FIXTURES = Path(__file__).parent / "fixtures" / "weights"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
STARTER_KIT = ("gru", "factorized")


def expected(architecture: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / architecture / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def fixture_mice(data: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(k.split("/", 1)[1] for k in data if k.startswith("unit_ids/"))


def stores_with_neurons(root: Path, neurons: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> tuple[Path, list[str]]:
    """Tiny synthetic stores, one per entry of ``neurons`` (in order), with exactly those unit ids and coordinates
    (``(N,)``, ``(N, 3)``); returns the stores folder and their mouse ids."""
    sessions = []
    for i, (unit_ids, coordinates) in enumerate(neurons.values()):
        release = root / f"release{i}"
        (session,) = synthesize(
            release, mice=1, neurons=len(unit_ids), train_trials=4, clips_per_tier=1, repeats=2, seed=i,
            progress=False, workers=1,
        )  # fmt: skip
        np.save(session / "meta" / "neurons" / "unit_ids.npy", np.asarray(unit_ids, dtype=np.int64))
        np.save(session / "meta" / "neurons" / "cell_motor_coordinates.npy", np.asarray(coordinates))
        sessions.append(session)
    stores = root / "stores"
    convert(sessions, stores, progress=False)
    return stores, [s.name for s in sessions]


@pytest.fixture(scope="module")
def starter_kit_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Stores with the starter-kit fixture's neurons (both baselines' fixtures share them); fixture key → mouse_id."""
    data = expected("gru")
    mice = fixture_mice(data)
    root = tmp_path_factory.mktemp("starter_kit")
    stores, ids = stores_with_neurons(root, {m: (data[f"unit_ids/{m}"], data[f"coordinates/{m}"]) for m in mice})
    return stores, dict(zip(mice, ids, strict=True))


def our_outputs(module: torch.nn.Module, data: Mapping[str, np.ndarray], mouse: str) -> torch.Tensor:
    """The imported model's eval-mode output on the fixture's input, ``(B, N, T')``."""
    module.eval()
    with torch.no_grad():
        return module.encoder(
            torch.as_tensor(data["video"], dtype=torch.float32),
            mouse,
            behavior=torch.as_tensor(data["behavior"]),
            pupil_center=torch.as_tensor(data["pupil_center"]),
        )


def assert_close(ours: torch.Tensor, theirs: np.ndarray) -> None:
    expected_t = torch.as_tensor(theirs)
    assert ours.shape == expected_t.shape
    assert ((ours - expected_t).abs().max() / expected_t.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("architecture", STARTER_KIT)
def test_starter_kit_import_predicts_what_the_original_predicted(
    architecture: str, starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    stores, mouse_map = starter_kit_stores
    data = expected(architecture)
    out = tmp_path / "model.ckpt"
    written = import_weights(
        architecture, [FIXTURES / architecture / "seed0_final.pth"], stores, out, mouse_map, EXPERIMENTS
    )
    assert written == [out]
    module = SensoriumModule.load_from_checkpoint(out, map_location="cpu")
    assert sorted(module.neurons) == sorted(mouse_map.values())
    for key, mouse in mouse_map.items():
        np.testing.assert_array_equal(module.neurons[mouse].unit_ids, data[f"unit_ids/{key}"])
        assert_close(our_outputs(module, data, mouse), data[f"output/seed0_final.pth/{key}"])


@pytest.mark.parametrize("architecture", STARTER_KIT)
def test_starter_kit_files_import_as_one_ensemble(
    architecture: str, starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """Two files → a folder of two member checkpoints; the ensemble's mean equals the mean of the originals'."""
    stores, mouse_map = starter_kit_stores
    data = expected(architecture)
    names = ["seed0_final.pth", "seed1_final.pth"]
    out = tmp_path / "members"
    files = [FIXTURES / architecture / n for n in names]
    written = import_weights(architecture, files, stores, out, mouse_map, EXPERIMENTS)
    assert [p.name for p in written] == ["member-00.ckpt", "member-01.ckpt"]
    ensemble = EnsembleModule.from_checkpoints(written)
    for key, mouse in mouse_map.items():
        ours = torch.stack([our_outputs(m, data, mouse) for m in ensemble.members]).mean(0)
        assert_close(ours, np.mean([data[f"output/{n}/{key}"] for n in names], axis=0))


def _import(architecture: str, file: Path, stores: Path, out: Path, mouse_map: Mapping[str, str] | None) -> None:
    import_weights(architecture, [file], stores, out, mouse_map, EXPERIMENTS)


def _edited(src: Path, dest: Path, edit: str) -> Path:
    state = torch.load(src, map_location="cpu", weights_only=True)
    if edit == "unknown_key":
        state["modulator.x.weight"] = torch.zeros(3)
    elif edit == "neuron_order":
        key = next(k for k in state if k.endswith("source_grid"))
        state[key] = state[key].flip(0)  # the same neurons in another order
    torch.save(state, dest)
    return dest


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("other_architecture", "not a gru baseline state dict"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("not_a_checkpoint", "not a readable PyTorch checkpoint"),
        ("missing_mouse", "has no store"),
        ("unknown_mouse_key", r"no mouse \['A'\] in the file"),
        ("neuron_count", "neurons in the file but the store of"),
        ("neuron_order", "neuron positions differ"),
        ("unknown_key", "unknown entry 'modulator.x.weight'"),
    ],
)
def test_bad_starter_kit_input_is_refused_and_nothing_written(
    case: str, message: str, starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    stores, mouse_map = starter_kit_stores
    good = FIXTURES / "gru" / "seed0_final.pth"
    file, mapping = good, dict(mouse_map)
    if case == "other_architecture":
        file = FIXTURES / "factorized" / "seed0_final.pth"
    elif case == "truncated":
        file = tmp_path / "truncated.pth"
        file.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "not_a_checkpoint":
        file = tmp_path / "notes.pth"
        file.write_text("not weights\n")
    elif case == "missing_mouse":
        mapping = {}  # the file's own keys: release mice these stores do not hold
    elif case == "unknown_mouse_key":
        mapping["A"] = next(iter(mouse_map.values()))  # a ViV1T letter: not a key of this file
    elif case == "neuron_count":
        a, b = list(mouse_map)
        mapping = {a: mouse_map[b], b: mouse_map[a]}  # 12 and 15 neurons swapped
    elif case in ("neuron_order", "unknown_key"):
        file = _edited(good, tmp_path / f"{case}.pth", case)
    out = tmp_path / "out" / "model.ckpt"
    with pytest.raises(WeightsError, match=message) as err:
        _import("gru", file, stores, out, mapping)
    assert str(file) in str(err.value)
    assert not out.exists() and not out.parent.exists()


def test_an_ensemble_with_one_bad_file_writes_nothing(
    starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    stores, mouse_map = starter_kit_stores
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "members"
    with pytest.raises(WeightsError, match="bad.pth"):
        import_weights("gru", [FIXTURES / "gru" / "seed0_final.pth", bad], stores, out, mouse_map, EXPERIMENTS)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".members")]


def test_cli_import_weights(
    starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The subcommand writes the checkpoint; bad input is one line on stderr, exit 2, nothing written."""
    stores, mouse_map = starter_kit_stores
    maps = [x for k, v in mouse_map.items() for x in ("--mouse", f"{k}={v}")]
    file = FIXTURES / "factorized" / "seed0_final.pth"
    out = tmp_path / "model.ckpt"
    common = ["--data.root", str(stores), "--experiments", str(EXPERIMENTS), *maps]
    assert cli_main(["import-weights", "--from", "factorized", str(file), "--out", str(out), *common]) == 0
    assert out.is_file()
    assert str(out) in capsys.readouterr().out
    bad = tmp_path / "bad.ckpt"
    assert cli_main(["import-weights", "--from", "gru", str(file), "--out", str(bad), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a gru baseline state dict" in err[0]
    assert not bad.exists()


def test_cli_offers_every_format() -> None:
    """The subcommand's --from choices (spelled out in cli.py: --help loads no torch) are the importer's."""
    from lightning_sensorium.cli import build_parser
    from lightning_sensorium.weights import ARCHITECTURES

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    action = next(a for a in sub.choices["import-weights"]._actions if a.dest == "architecture")
    assert tuple(action.choices) == ARCHITECTURES


def test_imported_checkpoint_evaluates_and_fine_tunes(
    starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """``evaluate`` scores the imported checkpoint on its stores and ``fit --ckpt_path`` continues from it."""
    from lightning_sensorium.evaluate import evaluate
    from lightning_sensorium.launch import run_lightning, with_experiment_defaults
    from lightning_sensorium.weights import starter_kit

    stores, mouse_map = starter_kit_stores
    out = tmp_path / "model.ckpt"
    file = FIXTURES / "factorized" / "seed0_final.pth"
    import_weights("factorized", [file], stores, out, mouse_map, EXPERIMENTS)
    results = evaluate([out], data={}, accelerator="cpu", max_trials=1, progress=False)
    assert results
    args = [
        "fit", "--config", str(EXPERIMENTS / "factorized.yaml"), "--data.root", str(stores),
        "--data.mouse_selection", "all", "--data.frames", "16", "--data.batch_size", "2",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--trainer.default_root_dir", str(tmp_path),  # where LightningCLI saves its config.yaml
        *starter_kit.read(file, "factorized").config_args,
    ]  # fmt: skip
    cli = run_lightning(with_experiment_defaults(args[1:]), run=False)  # the original's sizes, as the import built
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(out))
    assert cli.trainer.global_step == 2


# ------------------------------------------------------------------------------------------------- DwiseNeuro
@pytest.fixture(scope="module")
def dwiseneuro_stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """Stores with the DwiseNeuro fixture's neurons; the mouse_id its readout index names → the store's."""
    from lightning_sensorium.weights.dwiseneuro import MICE

    data = expected("dwiseneuro")
    indexes = fixture_mice(data)
    root = tmp_path_factory.mktemp("dwiseneuro")
    stores, ids = stores_with_neurons(root, {i: (data[f"unit_ids/{i}"], data[f"coordinates/{i}"]) for i in indexes})
    return stores, {MICE[int(i)]: mouse for i, mouse in zip(indexes, ids, strict=True)}


def _by_index(mouse_map: Mapping[str, str]) -> dict[str, str]:
    from lightning_sensorium.weights.dwiseneuro import MICE

    return {str(MICE.index(name)): mouse for name, mouse in mouse_map.items()}


@pytest.mark.parametrize("name", ["true_batch_001_fold_0_ema.pth", "true_batch_001_fold_0_raw.pth"])
def test_dwiseneuro_import_predicts_what_argus_predicted(
    name: str, dwiseneuro_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The EMA file and the raw argus file, each as ``argus.load_model(file).predict`` predicted."""
    stores, mouse_map = dwiseneuro_stores
    data = expected("dwiseneuro")
    out = tmp_path / "model.ckpt"
    import_weights("dwiseneuro", [FIXTURES / "dwiseneuro" / name], stores, out, mouse_map, EXPERIMENTS)
    module = SensoriumModule.load_from_checkpoint(out, map_location="cpu")
    assert module.frame_step == 2  # the file's frame_stack.step
    for index, mouse in _by_index(mouse_map).items():
        assert_close(our_outputs(module, data, mouse), data[f"output/{name}/{index}"])


def test_dwiseneuro_stages_import_as_one_ensemble(
    dwiseneuro_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """A fold of each stage (their sizes differ: expansion 2 and 3) → one ensemble of two members."""
    stores, mouse_map = dwiseneuro_stores
    data = expected("dwiseneuro")
    names = ["true_batch_001_fold_0_ema.pth", "distillation_001_fold_0_ema.pth"]
    files = [FIXTURES / "dwiseneuro" / n for n in names]
    written = import_weights("dwiseneuro", files, stores, tmp_path / "members", _by_index(mouse_map), EXPERIMENTS)
    ensemble = EnsembleModule.from_checkpoints(written)
    for index, mouse in _by_index(mouse_map).items():
        ours = torch.stack([our_outputs(m, data, mouse) for m in ensemble.members]).mean(0)
        assert_close(ours, np.mean([data[f"output/{n}/{index}"] for n in names], axis=0))


def _argus_edited(dest: Path, edit: str) -> Path:
    checkpoint = torch.load(FIXTURES / "dwiseneuro" / "true_batch_001_fold_0_ema.pth", weights_only=True)
    if edit == "unknown_config_key":
        checkpoint["params"]["nn_module"][1]["attention_heads"] = 4
    elif edit == "other_model":
        checkpoint["params"]["nn_module"] = ("resnet", checkpoint["params"]["nn_module"][1])
    elif edit == "other_size":
        checkpoint["params"]["nn_module"][1]["core_features"] = (4, 16)
    torch.save(checkpoint, dest)
    return dest


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("starter_kit_file", "not an argus model file"),
        ("unknown_config_key", r"unknown DwiseNeuro config keys \['nn_module.attention_heads'\]"),
        ("other_model", "not DwiseNeuro"),
        ("other_size", "does not fit the DwiseNeuroCore"),
        ("missing_mouse", "has no store"),
        ("neuron_count", "neurons in the file but the store of"),
    ],
)
def test_bad_dwiseneuro_input_is_refused_and_nothing_written(
    case: str, message: str, dwiseneuro_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    stores, mouse_map = dwiseneuro_stores
    file, mapping = FIXTURES / "dwiseneuro" / "true_batch_001_fold_0_ema.pth", dict(mouse_map)
    if case == "starter_kit_file":
        file = FIXTURES / "gru" / "seed0_final.pth"
    elif case in ("unknown_config_key", "other_model", "other_size"):
        file = _argus_edited(tmp_path / f"{case}.pth", case)
    elif case == "missing_mouse":
        mapping = {}
    elif case == "neuron_count":
        a, b = list(mouse_map)
        mapping = {a: mouse_map[b], b: mouse_map[a]}
    out = tmp_path / "model.ckpt"
    with pytest.raises(WeightsError, match=message) as err:
        _import("dwiseneuro", file, stores, out, mapping)
    assert str(file) in str(err.value)
    assert not out.exists()


def test_a_dwiseneuro_file_is_not_a_starter_kit_state_dict(
    starter_kit_stores: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    stores, mouse_map = starter_kit_stores
    file = FIXTURES / "dwiseneuro" / "true_batch_001_fold_0_ema.pth"
    with pytest.raises(WeightsError, match="expected the starter kit's model.state_dict()"):
        _import("factorized", file, stores, tmp_path / "model.ckpt", mouse_map)
