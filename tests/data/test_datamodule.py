"""SensoriumDataModule's pipeline options: folds of whole clips, how an epoch picks its windows (and splits them over
DDP ranks), and the starter kit's validation windows."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_sensorium.data.convert import convert
from lightning_sensorium.data.datamodule import (
    OFFICIAL_VAL_FRAMES,
    VALIDATION_FOLD,
    EvalTrials,
    PaddedEvalSampler,
    SensoriumDataModule,
    _WindowPlans,
    assign_folds,
)
from lightning_sensorium.data.layout import TEST_TIERS, TIERS
from lightning_sensorium.metrics import SingleTrialCorrelation


@pytest.fixture(scope="module")
def hidden_stores(tiny_release_hidden: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mouse whose test tiers are hidden (all-zero), as the competition mice's."""
    out = tmp_path_factory.mktemp("hidden_stores")
    convert([tiny_release_hidden], out, progress=False)
    return out


def _plans(dm: SensoriumDataModule, epoch: int = 0, rank: int = 0, world: int = 1) -> list[list[tuple[str, int, int]]]:
    sampler = _WindowPlans(dm, dm._epoch_batches(), rank=rank, world_size=world)
    sampler.set_epoch(epoch)
    return list(sampler)


# ------------------------------------------------------------------------------------------------------- folds
def test_assign_folds_keeps_clips_whole_and_balances_trials() -> None:
    clips = np.array([7, 7, 7, 7, 3, 3, 3, 1, 2, 4, 5, 6, 8, 9, 10, 11])  # 16 trials, clips of 4, 3 and 1 trials
    folds = assign_folds(clips, 4, seed=0, mouse="m")
    assert sorted(Counter(folds.tolist()).values()) == [4, 4, 4, 4]
    for clip in np.unique(clips):
        assert len(set(folds[clips == clip].tolist())) == 1
    np.testing.assert_array_equal(folds, assign_folds(clips, 4, seed=0, mouse="m"))
    others = [assign_folds(clips, 4, seed=s, mouse="m") for s in range(1, 6)]
    assert any(not np.array_equal(folds, o) for o in others)  # the seed orders the clips of equal size
    with pytest.raises(ValueError, match=r"data.num_folds=12: mouse m: only 11 distinct clips"):
        assign_folds(clips, 12, seed=0, mouse="m")


def test_folds_split_train_and_oracle_by_clip(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, num_folds=3, fold=1, eval_batch_size=100)
    assert dm.val_tiers == [VALIDATION_FOLD]
    for mouse in dm.mouse_ids:
        store = dm.stores[mouse]
        pool = store.trials(["train", "oracle"])
        assert len(pool) == 12 + 2 * 3  # 12 train trials, 2 oracle clips × 3 repeats
        folds = dm.fold_trials(mouse)
        assert [len(folds[k]) for k in range(3)] == [6, 6, 6]  # 18 trials of 14 clips, balanced
        np.testing.assert_array_equal(np.sort(np.concatenate(list(folds.values()))), pool)
        clip_fold = {}
        for k, trials in folds.items():
            for t in trials:
                assert clip_fold.setdefault(int(store.clip_id[t]), k) == k  # every repeat of a clip in one fold
        np.testing.assert_array_equal(dm._train_trials[mouse], np.sort(np.concatenate([folds[0], folds[2]])))
    batches = list(dm.val_dataloader())
    assert {b["tier"] for b in batches} == {VALIDATION_FOLD}
    for b in batches:
        store = dm.stores[b["mouse_id"]]
        np.testing.assert_array_equal(np.sort(b["trial"].numpy()), dm.fold_trials(b["mouse_id"])[1])
        np.testing.assert_array_equal(b["length"].numpy(), store.length[b["trial"].numpy()])  # whole trials
        assert b["clip_index"].max() < dm.clip_counts([VALIDATION_FOLD])[VALIDATION_FOLD][b["mouse_id"]]
    # Training windows never come from the held-out fold.
    held_out = {(m, int(t)) for m in dm.mouse_ids for t in dm.fold_trials(m)[1]}
    assert not {(m, t) for plan in _plans(dm) for m, t, _ in plan} & held_out


def test_folds_over_every_labelled_tier(tiny_stores: Path, hidden_stores: Path) -> None:
    """DwiseNeuro's pool: all labelled tiers (the old mice's test tiers too, never hidden trials)."""
    labelled = SensoriumDataModule(root=str(tiny_stores), frames=20, train_tiers=list(TIERS), num_folds=7)
    for mouse in labelled.mouse_ids:
        pool = np.sort(np.concatenate(list(labelled.fold_trials(mouse).values())))
        np.testing.assert_array_equal(pool, labelled.stores[mouse].trials(list(TIERS)))
    hidden = SensoriumDataModule(root=str(hidden_stores), frames=20, train_tiers=list(TIERS), num_folds=7)
    (mouse,) = hidden.mouse_ids
    pool = np.sort(np.concatenate(list(hidden.fold_trials(mouse).values())))
    np.testing.assert_array_equal(pool, hidden.stores[mouse].trials(["train", "oracle"]))


def test_fold_options_are_checked(tiny_stores: Path) -> None:
    root = str(tiny_stores)
    with pytest.raises(ValueError, match=r"data.num_folds=1: expected at least 2"):
        SensoriumDataModule(root=root, num_folds=1)
    with pytest.raises(ValueError, match=r"data.fold=3: expected a fold in 0 … 2"):
        SensoriumDataModule(root=root, num_folds=3, fold=3)
    with pytest.raises(ValueError, match=r"data.fold=-1"):
        SensoriumDataModule(root=root, num_folds=3, fold=-1)
    with pytest.raises(ValueError, match=r"data.fold=2 needs data.num_folds"):
        SensoriumDataModule(root=root, fold=2)
    with pytest.raises(ValueError, match=r"data.num_folds=15: mouse .* only 14 distinct clips"):
        SensoriumDataModule(root=root, num_folds=15)
    with pytest.raises(ValueError, match=r"leave data.val_tiers unset"):
        SensoriumDataModule(root=root, num_folds=3, val_tiers=["oracle"])
    with pytest.raises(ValueError, match=r"data.window_sampling='shuffle'"):
        SensoriumDataModule(root=root, window_sampling="shuffle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data.val_windows='random'"):
        SensoriumDataModule(root=root, val_windows="random")  # type: ignore[arg-type]


def test_training_on_scored_tiers_is_reported(tiny_stores: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="lightning_sensorium.data.datamodule"):
        SensoriumDataModule(root=str(tiny_stores), frames=20)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="lightning_sensorium.data.datamodule"):
        SensoriumDataModule(root=str(tiny_stores), frames=20, train_tiers=["train", *TEST_TIERS])
    assert "live_test_main, final_test_main" in caplog.text and "not held out" in caplog.text


def test_viv1t_ds_mode_3_tiers(tiny_stores: Path, hidden_stores: Path) -> None:
    """train + every test tier: the labelled mice train on their test tiers, the competition mice on train only."""
    tiers = ["train", *TEST_TIERS]
    labelled = SensoriumDataModule(root=str(tiny_stores), frames=20, train_tiers=tiers)
    for mouse in labelled.mouse_ids:
        np.testing.assert_array_equal(labelled._train_trials[mouse], labelled.stores[mouse].trials(tiers))
    hidden = SensoriumDataModule(root=str(hidden_stores), frames=20, train_tiers=tiers)
    (mouse,) = hidden.mouse_ids
    np.testing.assert_array_equal(hidden._train_trials[mouse], hidden.stores[mouse].trials(["train"]))


# ---------------------------------------------------------------------------------------------- window sampling
def test_with_replacement_is_todays_stream(tiny_stores: Path) -> None:
    """The default draws exactly as before the option existed: per rank from (seed, epoch, rank), a random trial
    and a start uniform over every position where the window fits (the CPU demo's behaviour)."""
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, frame_step=2, batch_size=3, seed=4)
    assert dm.window_sampling == "with_replacement"
    got = _plans(dm, epoch=2, rank=1, world=2)
    rng = np.random.default_rng([4, 2, 1])
    expected = []
    for k in range(math.ceil(dm._epoch_batches() / 2)):
        mouse = dm.mouse_ids[(k * 2 + 1) % 2]
        batch = []
        for _ in range(3):
            trials = dm._train_trials[mouse]
            trial = int(trials[rng.integers(len(trials))])
            batch.append((mouse, trial, int(rng.integers(0, int(dm.stores[mouse].length[trial]) - 39 + 1))))
        expected.append(batch)
    assert got == expected


def test_each_trial_once_per_mouse(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, batch_size=5, window_sampling="each_trial_once")
    plans = _plans(dm)
    assert len(plans) == 2 * 3  # LongCycler: 2 mice × ⌈12 / 5⌉ batches
    assert [p[0][0] for p in plans] == dm.mouse_ids * 3
    for mouse in dm.mouse_ids:
        mine = [p for p in plans if p[0][0] == mouse]
        assert [len(p) for p in mine] == [5, 5, 2]  # the last batch of the mouse's epoch is smaller
        assert sorted(t for p in mine for _, t, _ in p) == dm._train_trials[mouse].tolist()  # each trial once
        for _, t, s in (w for p in mine for w in p):
            assert 0 <= s <= dm.stores[mouse].length[t] - dm.span
    assert _plans(dm) == plans and _plans(dm, epoch=1) != plans  # (seed, epoch)
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (5, 1, 20, 36, 64)
    # A mouse with fewer batches starts another random order when its epoch runs out (neuralpredictors' cycle).
    short = dm.mouse_ids[1]
    dm._train_trials[short] = dm._train_trials[short][:4]
    plans = _plans(dm)
    mine = [sorted(t for _, t, _ in p) for p in plans if p[0][0] == short]
    assert mine == [dm._train_trials[short].tolist()] * 3  # one batch of its 4 trials per cycle
    # samples_per_epoch beyond the trials: every trial ⌊n / trials⌋ or ⌈n / trials⌉ times.
    dm = SensoriumDataModule(
        root=str(tiny_stores), frames=20, batch_size=5, samples_per_epoch=30, window_sampling="each_trial_once"
    )
    for mouse in dm.mouse_ids:
        counts = Counter(t for p in _plans(dm) if p[0][0] == mouse for _, t, _ in p)
        assert sum(counts.values()) == 30 and set(counts.values()) == {2, 3} and len(counts) == 12


@pytest.mark.parametrize("sampling", ["mouse_quotas", "each_trial_once"])
def test_mixed_batches_hold_each_mouse_its_share(tiny_stores: Path, sampling: str) -> None:
    dm = SensoriumDataModule(
        root=str(tiny_stores),
        frames=20,
        batch_size=4,
        batch_mode="mixed",
        samples_per_epoch=7,
        window_sampling=sampling,
    )
    plans = _plans(dm)
    assert [len(p) for p in plans] == [4, 4, 4, 2]  # 2 mice × 7 windows, the last batch smaller
    windows = [w for p in plans for w in p]
    assert Counter(m for m, _, _ in windows) == dict.fromkeys(dm.mouse_ids, 7)  # exactly its share of the epoch
    assert any(len({m for m, _, _ in p}) > 1 for p in plans)  # mice mixed inside batches
    if sampling == "each_trial_once":
        for mouse in dm.mouse_ids:
            trials = [t for m, t, _ in windows if m == mouse]
            assert len(set(trials)) == 7  # 7 of its 12 trials, none twice
    dm = SensoriumDataModule(
        root=str(tiny_stores), frames=20, batch_size=4, batch_mode="mixed", window_sampling="each_trial_once"
    )
    windows = [(m, t) for p in _plans(dm) for m, t, _ in p]
    assert sorted(windows) == sorted((m, int(t)) for m in dm.mouse_ids for t in dm._train_trials[m])
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["mouse_id"]) == len(batch["responses"]) == 4 and batch["video"].shape == (4, 1, 20, 36, 64)


@pytest.mark.parametrize("mode", ["per_mouse", "mixed"])
@pytest.mark.parametrize("world", [2, 3])
def test_each_trial_once_split_over_ddp_ranks(tiny_stores: Path, mode: str, world: int) -> None:
    """Every rank its share of one global epoch, the same number of batches on every rank."""
    dm = SensoriumDataModule(
        root=str(tiny_stores),
        frames=20,
        batch_size=4,
        batch_mode=mode,
        window_sampling="each_trial_once",  # type: ignore[arg-type]
    )
    plan = dm.epoch_plan(3)
    n = len(plan)
    shards = [_plans(dm, epoch=3, rank=r, world=world) for r in range(world)]
    assert [len(s) for s in shards] == [math.ceil(n / world)] * world
    for r, shard in enumerate(shards):
        assert shard == [plan[(k * world + r) % n] for k in range(len(shard))]
    seen = [w for shard in shards for p in shard for w in p]
    every = {(m, int(t)) for m in dm.mouse_ids for t in dm._train_trials[m]}
    assert {(m, t) for m, t, _ in seen} == every  # every trial, on some rank
    if n % world == 0:
        assert len(seen) == len(every)  # and exactly once
    if mode == "per_mouse":  # a rank's batch holds one mouse, the LongCycler's at that global batch number
        for r, shard in enumerate(shards):
            assert [p[0][0] for p in shard] == [dm.mouse_ids[((k * world + r) % n) % 2] for k in range(len(shard))]


# ------------------------------------------------------------------------------------------- official validation
def test_official_validation_windows(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, val_windows="official", eval_batch_size=4)
    loader = dm.val_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, PaddedEvalSampler)

    def epoch(e: int) -> list[dict]:
        sampler.set_epoch(e)
        return list(loader)

    first = epoch(0)
    seen = []
    for b in first:
        assert b["tier"] == "oracle"
        assert b["video"].shape[2] == b["responses"].shape[-1] == OFFICIAL_VAL_FRAMES
        assert b["length"].tolist() == [OFFICIAL_VAL_FRAMES] * len(b["trial"])
        store = dm.stores[b["mouse_id"]]
        for i, (t, s) in enumerate(zip(b["trial"].tolist(), b["window_start"].tolist(), strict=True)):
            assert 0 <= s < store.length[t] - OFFICIAL_VAL_FRAMES  # np.random.randint(0, T - 80)
            assert s == dm.official_window_start(b["mouse_id"], t, 0)
            window = dm._read(b["mouse_id"], t, s, s + OFFICIAL_VAL_FRAMES)
            torch.testing.assert_close(b["responses"][i], window["responses"])
            torch.testing.assert_close(b["rates"][i], window["rates"])
            seen.append((b["mouse_id"], t))
    assert sorted(seen) == sorted((m, int(t)) for m in dm.mouse_ids for t in dm.stores[m].trials("oracle"))
    starts = [b["window_start"] for b in first]
    assert all(torch.equal(a["window_start"], b) for a, b in zip(epoch(0), starts, strict=True))  # seeded
    assert not all(torch.equal(a["window_start"], b) for a, b in zip(epoch(1), starts, strict=True))  # per epoch
    # `test` and `evaluate` read whole trials.
    assert all("window_start" not in b and b["length"].max() > 200 for b in dm.test_dataloader())
    # The module's metrics skip the first 50 frames: exactly frames 50-79 of each window are scored.
    b = first[0]
    metric = SingleTrialCorrelation(24, skip_frames=50)
    pred = torch.randn_like(b["responses"])
    pred[..., 50:] = b["responses"][..., 50:]
    metric.update(pred, b["responses"], b["length"])
    scored = b["responses"][..., 50:]
    varies = (scored.amax(dim=(0, 2)) > scored.amin(dim=(0, 2))).float()  # a silent neuron scores 0
    assert varies.sum() > 12
    torch.testing.assert_close(metric.compute(), varies)
    # Under DDP each rank reads its batches with the epoch.
    ds = EvalTrials(dm, ["oracle"], 4, skip_hidden=True, window=OFFICIAL_VAL_FRAMES)
    shards = [PaddedEvalSampler(ds, 2, r, with_epoch=True) for r in range(2)]
    for s in shards:
        s.set_epoch(5)
    assert sorted(i for s in shards for i, e in s if e == 5) == list(range(len(ds)))
    with pytest.raises(ValueError, match=r"data.val_windows='official' reads 400-frame windows"):
        EvalTrials(dm, ["oracle"], 4, skip_hidden=True, window=400)


def test_dataset_sizes_count_all_trials_or_the_trials_trained_on(tiny_stores: Path) -> None:
    """The loss scale's trial count: every trial of the mouse (the starter kit) or those it trains on (ViV1T)."""
    common = {"root": str(tiny_stores), "frames": 20, "batch_size": 2}
    everything = SensoriumDataModule(**common)
    trained = SensoriumDataModule(**common, dataset_size="train_trials", train_tiers=["train", "oracle"])
    for mouse, store in everything.stores.items():
        assert everything.dataset_sizes[mouse] == store.num_trials
        assert trained.dataset_sizes[mouse] == len(store.trials(["train", "oracle"])) < store.num_trials
    with pytest.raises(ValueError, match="data.dataset_size='some'"):
        SensoriumDataModule(**common, dataset_size="some")  # type: ignore[arg-type]


def test_training_window_reads_one_window_of_the_mouse(tiny_stores: Path) -> None:
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, batch_size=2)
    mouse = dm.mouse_ids[0]
    window = dm.training_window(mouse, np.random.default_rng(0))
    assert window["mouse_id"] == mouse and window["video"].shape[1] == 20
    assert window["trial"] in set(dm.stores[mouse].trials("train").tolist())


def test_competition_mice_are_those_with_hidden_test_responses(
    tiny_stores: Path, tiny_release_hidden: Path, tmp_path: Path
) -> None:
    """``mouse_selection: competition`` keeps the mice whose test responses are hidden (the release's five new
    mice); stores that hide none keep every mouse."""
    from lightning_sensorium.data.convert import convert
    from lightning_sensorium.data.datamodule import _competition_mice
    from lightning_sensorium.data.store import MouseStore

    (hidden_path,) = convert([tiny_release_hidden], tmp_path / "hidden", progress=False)
    hidden = MouseStore(hidden_path)
    labelled = [MouseStore(p) for p in sorted(tiny_stores.glob("*.zarr"))]
    assert _competition_mice([*labelled, hidden]) == [hidden]
    dm = SensoriumDataModule(root=str(tiny_stores), frames=20, mouse_selection="competition")
    assert dm.mouse_ids == [s.mouse_id for s in labelled]  # none hidden: all kept
    with pytest.raises(ValueError, match="data.mouse_selection='new'"):
        SensoriumDataModule(root=str(tiny_stores), frames=20, mouse_selection="new")  # type: ignore[arg-type]
