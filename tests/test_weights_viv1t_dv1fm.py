"""import-weights for ViV1T and Dynamic-V1FM: files their original code wrote (tests/fixtures/weights/, made by
tools/make_weight_fixtures_w2.py) import into checkpoints that predict what the original predicted, alone and as an
ensemble; bad runs, files, configs, mice and neurons are refused with one clear error and nothing written."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.synthetic import synthesize
from lightning_sensorium.ensemble import EnsembleModule
from lightning_sensorium.module import SensoriumModule
from lightning_sensorium.weights import WeightsError, dynamic_v1fm, viv1t
from lightning_sensorium.weights.importer import import_weights

FIXTURES = Path(__file__).parent / "fixtures" / "weights"
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
VIV1T_RUNS = [FIXTURES / "viv1t" / "runs" / f"viv1t_00{k}" for k in (1, 2)]
DYNAMIC_FILES = [
    FIXTURES / "dynamic_v1fm" / "NeuroEconding_hierachical_mean_2_8" / "epoch_3.pth",
    FIXTURES / "dynamic_v1fm" / "pretrained_weights_adaptive" / "model_2_4_8_16.pth",
]


def expected(architecture: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / architecture / "expected.npz") as z:
        return {k: z[k] for k in z.files}


def fixture_mice(data: Mapping[str, np.ndarray]) -> list[str]:
    return [k.split("/", 1)[1] for k in data if k.startswith("unit_ids/")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store per fixture mouse, named as the original names it (ViV1T's letters → session folders), plus
    ``permuted-A`` (ViV1T mouse A's neurons in another order) and ``thirteen`` (13 neurons)."""
    root = tmp_path_factory.mktemp("weights_w2")
    v, d = expected("viv1t"), expected("dynamic_v1fm")
    mice: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in fixture_mice(v):
        mice[viv1t.MOUSE_IDS[key]] = (v[f"unit_ids/{key}"], v[f"coordinates/{key}"])
    for key in fixture_mice(d):
        mice[key] = (d[f"unit_ids/{key}"], d[f"coordinates/{key}"])
    order = np.random.default_rng(0).permutation(len(v["unit_ids/A"]))
    mice["permuted-A"] = (v["unit_ids/A"][order], v["coordinates/A"][order])
    mice["thirteen"] = (np.arange(1, 14), np.random.default_rng(1).integers(0, 600, (13, 3)))
    sessions = []
    for i, (name, (unit_ids, coordinates)) in enumerate(mice.items()):
        (session,) = synthesize(
            root / f"release{i}", mice=1, neurons=len(unit_ids), train_trials=4, clips_per_tier=1, repeats=2,
            seed=i, progress=False, workers=1,
        )  # fmt: skip
        np.save(session / "meta" / "neurons" / "unit_ids.npy", np.asarray(unit_ids, dtype=np.int64))
        np.save(session / "meta" / "neurons" / "cell_motor_coordinates.npy", np.asarray(coordinates))
        sessions.append(session.rename(session.parent / name))
    convert(sessions, root / "stores", progress=False)
    return root / "stores"


def outputs(module: SensoriumModule, data: Mapping[str, np.ndarray], mouse: str) -> torch.Tensor:
    """The imported model's eval-mode responses ``(B, N, T')`` to the fixture's input."""
    video = torch.from_numpy(data["video"]).float()  # stored as float16
    module.eval()
    with torch.no_grad():
        return module.encoder(
            video, mouse, torch.from_numpy(data["behavior"]), torch.from_numpy(data["pupil_center"])
        )  # fmt: skip


def assert_close(ours: torch.Tensor, theirs: np.ndarray) -> None:
    reference = torch.from_numpy(theirs)
    assert ours.shape == reference.shape
    assert ((ours - reference).abs().max() / reference.abs().max()).item() <= 1e-5


# ----------------------------------------------------------------------------------------------- equal outputs
@pytest.mark.parametrize("run", [1, 2])
def test_viv1t_run_imports_and_predicts_what_the_original_predicted(run: int, stores: Path, tmp_path: Path) -> None:
    data = expected("viv1t")
    out = tmp_path / "model.ckpt"
    assert import_weights("viv1t", [VIV1T_RUNS[run - 1]], stores, out, None, EXPERIMENTS) == [out]
    module = SensoriumModule.load_from_checkpoint(out, map_location="cpu")
    assert sorted(module.neurons) == sorted(viv1t.MOUSE_IDS[k] for k in "AB")  # letters mapped to session folders
    for key in fixture_mice(data):
        np.testing.assert_array_equal(module.neurons[viv1t.MOUSE_IDS[key]].unit_ids, data[f"unit_ids/{key}"])
        assert_close(outputs(module, data, viv1t.MOUSE_IDS[key]), data[f"output/viv1t_00{run}/{key}"])


def test_viv1t_runs_import_as_one_ensemble(stores: Path, tmp_path: Path) -> None:
    """The model_state.pt files themselves (args.yaml found beside ckpt/) → members whose mean is the originals'."""
    data = expected("viv1t")
    files = [run / "ckpt" / "model_state.pt" for run in VIV1T_RUNS]
    written = import_weights("viv1t", files, stores, tmp_path / "members", None, EXPERIMENTS)
    ensemble = EnsembleModule.from_checkpoints(written)
    for key in fixture_mice(data):
        ours = torch.stack([outputs(m, data, viv1t.MOUSE_IDS[key]) for m in ensemble.members]).mean(0)
        assert_close(ours, np.mean([data[f"output/{r.name}/{key}"] for r in VIV1T_RUNS], axis=0))


@pytest.mark.parametrize("run", [1, 2], ids=["runner-mean-2_8", "published-adaptive-2_4_8_16"])
def test_dynamic_v1fm_file_imports_and_predicts_what_the_original_predicted(
    run: int, stores: Path, tmp_path: Path
) -> None:
    data = expected("dynamic_v1fm")
    out = tmp_path / "model.ckpt"
    import_weights("dynamic_v1fm", [DYNAMIC_FILES[run - 1]], stores, out, None, EXPERIMENTS)
    module = SensoriumModule.load_from_checkpoint(out, map_location="cpu")
    readout = module.encoder.readouts[fixture_mice(data)[0]]
    assert (readout.levels, readout.fusion) == [((2, 8), "mean"), ((2, 4, 8, 16), "adaptive")][run - 1]
    for mouse in fixture_mice(data):
        assert_close(outputs(module, data, mouse), data[f"output/{DYNAMIC_FILES[run - 1].name}/{mouse}"])


def test_dynamic_v1fm_files_import_as_one_ensemble(stores: Path, tmp_path: Path) -> None:
    data = expected("dynamic_v1fm")
    written = import_weights("dynamic_v1fm", DYNAMIC_FILES, stores, tmp_path / "members", None, EXPERIMENTS)
    ensemble = EnsembleModule.from_checkpoints(written)
    for mouse in fixture_mice(data):
        ours = torch.stack([outputs(m, data, mouse) for m in ensemble.members]).mean(0)
        assert_close(ours, np.mean([data[f"output/{f.name}/{mouse}"] for f in DYNAMIC_FILES], axis=0))


def test_import_weights_command(stores: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``import-weights`` on a ViV1T run folder writes the checkpoint; a bad file is one line on stderr, exit 2,
    nothing written. (That ``evaluate`` and ``fit --ckpt_path`` take an imported checkpoint: tests/test_weights.py.)"""
    from lightning_sensorium.cli import main as cli_main

    common = ["--data.root", str(stores), "--experiments", str(EXPERIMENTS)]
    out = tmp_path / "viv1t.ckpt"
    assert cli_main(["import-weights", "--from", "viv1t", str(VIV1T_RUNS[0]), "--out", str(out), *common]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert sorted(SensoriumModule.load_from_checkpoint(out, map_location="cpu").neurons) == sorted(
        viv1t.MOUSE_IDS[k] for k in "AB"
    )
    bad = tmp_path / "bad.ckpt"
    foreign = str(VIV1T_RUNS[0] / "ckpt" / "model_state.pt")
    assert cli_main(["import-weights", "--from", "dynamic_v1fm", foreign, "--out", str(bad), *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a Dynamic-V1FM checkpoint" in err[0]
    assert not bad.exists()


# ------------------------------------------------------------------------------------------------- bad inputs
def copy_run(tmp_path: Path, edit: Mapping[str, object] | None = None, drop: str | None = None) -> Path:
    """ViV1T run 1 copied, its args.yaml edited (``edit`` keys set, ``drop`` removed)."""
    run = tmp_path / "runs" / "viv1t_001"
    shutil.copytree(VIV1T_RUNS[0], run)
    args = yaml.safe_load((run / "args.yaml").read_text())
    args.update(edit or {})
    args.pop(drop or "", None)
    (run / "args.yaml").write_text(yaml.safe_dump(args))
    return run


def refused(architecture: str, file: Path, stores: Path, out: Path, match: str, **mouse_map: str) -> None:
    with pytest.raises(WeightsError, match=match):
        import_weights(architecture, [file], stores, out, mouse_map or None, EXPERIMENTS)
    assert not out.exists()


def test_viv1t_bad_runs_are_refused(stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.ckpt"
    run = copy_run(tmp_path / "b")
    (run / "args.yaml").unlink()
    refused("viv1t", run, stores, out, r"args\.yaml: missing")
    refused("viv1t", copy_run(tmp_path / "c", {"core_wobble": 3}), stores, out, r"unknown ViV1T argument.*core_wobble")
    refused("viv1t", copy_run(tmp_path / "d", {"core": "factorized_baseline"}), stores, out, "not a ViV1T run")
    refused(
        "viv1t", copy_run(tmp_path / "e", {"core_parallel_attention": False}), stores, out,
        "core_parallel_attention: False is not supported",
    )  # fmt: skip
    shapes = {"output_shapes": {"A": [11, 140], "B": [15, 140]}}
    refused("viv1t", copy_run(tmp_path / "f", shapes), stores, out, r"12 neurons in the readout.*says \[11, 140\]")
    refused("viv1t", copy_run(tmp_path / "h", drop="core_emb_dim"), stores, out, r"no \['core_emb_dim'\]")
    run = copy_run(tmp_path / "g")
    data = (run / "ckpt" / "model_state.pt").read_bytes()
    (run / "ckpt" / "model_state.pt").write_bytes(data[: len(data) // 2])
    refused("viv1t", run, stores, out, "truncated")
    shutil.copy(DYNAMIC_FILES[0], run / "ckpt" / "model_state.pt")  # another architecture's file
    refused("viv1t", run, stores, out, "not a ViV1T checkpoint")


def test_viv1t_mice_and_neurons_must_match_the_stores(stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.ckpt"
    refused("viv1t", VIV1T_RUNS[0], stores, out, "has 12 neurons in the file.*13", A="thirteen")
    refused("viv1t", VIV1T_RUNS[0], stores, out, "neuron positions differ", A="permuted-A")
    refused("viv1t", VIV1T_RUNS[0], stores, out, "no store", A="dynamic-absent-mouse")


def test_dynamic_v1fm_bad_files_are_refused(stores: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.ckpt"
    unnamed = tmp_path / "weights.pth"
    shutil.copy(DYNAMIC_FILES[0], unnamed)
    refused("dynamic_v1fm", unnamed, stores, out, "cannot tell the fused levels")
    mislabelled = tmp_path / "pretrained_weights_mean" / "model_2_4.pth"
    mislabelled.parent.mkdir()
    shutil.copy(DYNAMIC_FILES[1], mislabelled)
    refused("dynamic_v1fm", mislabelled, stores, out, "says mean fusion but the readouts have fusion blocks")
    truncated = tmp_path / "x_mean_2" / "epoch_1.pth"
    truncated.parent.mkdir()
    truncated.write_bytes(DYNAMIC_FILES[0].read_bytes()[:5000])
    refused("dynamic_v1fm", truncated, stores, out, "truncated")
    foreign = tmp_path / "y_mean_2" / "model_state.pt"
    shutil.copytree(VIV1T_RUNS[0] / "ckpt", foreign.parent)  # another architecture's file
    refused("dynamic_v1fm", foreign, stores, out, "not a Dynamic-V1FM checkpoint")
    text = tmp_path / "z_mean_2" / "epoch_1.pth"
    text.parent.mkdir()
    text.write_text("not a checkpoint\n")
    refused("dynamic_v1fm", text, stores, out, "not a readable PyTorch checkpoint")


def test_dynamic_v1fm_config_beside_the_file_is_checked(stores: Path, tmp_path: Path) -> None:
    """The original's config/neuroencoding.py (published sizes) beside the tiny file: refused; at the file's sizes:
    imported, with its dropout; with a key the original does not have: refused."""
    out = tmp_path / "model.ckpt"
    run = tmp_path / "NeuroEconding_hierachical_mean_2_8"
    shutil.copytree(DYNAMIC_FILES[0].parent, run)
    original = (FIXTURES / "dynamic_v1fm" / "neuroencoding.py.txt").read_text()
    (run / "neuroencoding.py").write_text(original)
    refused("dynamic_v1fm", run / "epoch_3.pth", stores, out, r"core_dict\.emb_dim = 224, the checkpoint has 32")
    tiny = original.replace("window_size=[8, 7, 7]", "window_size=[4, 3, 3]").replace("t_dropout=0.", "t_dropout=0.1")
    for key, published, ours in [("emb_dim", 224, 32), ("num_blocks", 4, 2), ("num_heads", 4, 2), ("mlp_dim", 488, 16)]:
        tiny = tiny.replace(f"{key}={published}", f"{key}={ours}")
    (run / "neuroencoding.py").write_text(tiny)
    import_weights("dynamic_v1fm", [run / "epoch_3.pth"], stores, out, None, EXPERIMENTS)
    assert SensoriumModule.load_from_checkpoint(out, map_location="cpu").encoder.core.blocks[0].mlp.dropout.p == 0.1
    out.unlink()
    (run / "neuroencoding.py").write_text(tiny + "wobble = 1\n")
    refused("dynamic_v1fm", run / "epoch_3.pth", stores, out, r"unknown Dynamic-V1FM config key.*wobble")
    (run / "neuroencoding.py").write_text(tiny)
    (run / "other.py").write_text(tiny)
    refused("dynamic_v1fm", run / "epoch_3.pth", stores, out, "several beside it")


def test_dynamic_v1fm_mice_and_neurons_must_match_the_stores(stores: Path, tmp_path: Path) -> None:
    first = fixture_mice(expected("dynamic_v1fm"))[0]
    out = tmp_path / "model.ckpt"
    refused("dynamic_v1fm", DYNAMIC_FILES[0], stores, out, "has 16 neurons in the file.*13", **{first: "thirteen"})
    refused("dynamic_v1fm", DYNAMIC_FILES[0], stores, out, "no store", **{first: "absent-mouse"})


def test_readers_name_what_they_read() -> None:
    """The readers alone (no stores): sizes, mice and neurons from the files."""
    w = viv1t.read(VIV1T_RUNS[0])
    assert (w.architecture, w.neurons, w.mouse_ids["A"]) == ("viv1t", {"A": 12, "B": 15}, viv1t.MOUSE_IDS["A"])
    assert "--model.core.init_args.dim=16" in w.config_args
    d = dynamic_v1fm.read(DYNAMIC_FILES[1])
    assert "--model.core.init_args.window_size=[4, 3, 3]" in d.config_args
    assert list(d.neurons.values()) == [16, 20]
