"""In-silico experiments on the generator as a model recover its known parameters (issue #26).

The population is drawn like a synthetic mouse's (``digital_twin.draw_neurons``); tolerances and the neurons each
claim is made for follow from the generator (docs/insilico.md, "Validated against the truth").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_sensorium.data import digital_twin as twin
from lightning_sensorium.data.stimuli import natural_movie
from lightning_sensorium.insilico import experiments as ex
from lightning_sensorium.insilico.responders import GroundTruth
from lightning_sensorium.insilico.stimuli import (
    BehaviorState,
    Canvas,
    aperture,
    flashed_images,
    grating,
    square_grid,
    white_noise,
)
from lightning_sensorium.insilico.truth import nearest_sf, recovery, spearman, truth_variables


@pytest.fixture(scope="module")
def generator() -> GroundTruth:
    """96 ground-truth neurons with RFs spread over the screen, calibrated like a synthetic mouse's."""
    rng = np.random.default_rng(3)
    coords = np.column_stack([rng.uniform(0, 630, size=(96, 2)), np.zeros(96)])
    params = twin.draw_neurons(rng, coords, np.array([138.0, 138.0]), np.array([48.0, 12.0]))
    twin.calibrate(params, [natural_movie(np.random.default_rng(4), 150)])
    return GroundTruth(params, mouse_id="synthetic-test")


@pytest.fixture(scope="module")
def tuning(generator: GroundTruth) -> ex.Result:
    return ex.grating_tuning(generator)


def _truth(generator: GroundTruth) -> dict[str, np.ndarray]:
    return {k: v for k, (_, v) in truth_variables(generator.params, np.arange(len(generator.unit_ids))).items()}


def test_stimuli_geometry_and_range() -> None:
    canvas = Canvas(grey=80.0)
    g = grating(canvas, 30, direction=90.0, sf=0.1, tf=2.0)
    assert g.shape == (30, 36, 64) and g.min() >= 0 and g.max() <= 255
    assert np.allclose(g[0, :, 0], g[0, :, 40])  # drifting downwards: constant along x
    mask = aperture(canvas, (32.0, 18.0), 10.0, inner=4.0)
    assert mask[18, 32] == 0 and mask[18, 35] == 1 and mask[18, 40] == 0  # annulus
    flashes = square_grid(canvas, np.random.default_rng(0), size=4, stride=2)
    coverage = np.abs(flashes).sum(0)
    assert set(np.unique(flashes)) == {-1.0, 0.0, 1.0} and coverage.min() == coverage.max()  # edges covered alike
    with pytest.raises(ValueError, match="contrast"):
        grating(canvas, 5, 0.0, 0.1, 1.0, contrast=1.5)
    noise = white_noise(canvas, np.random.default_rng(0), 3, block=4)
    assert noise.shape == (3, 36, 64) and np.array_equal(
        noise[:, :4, :4], np.repeat(noise[:, :1, :1], 4, 1).repeat(4, 2)
    )
    frames = flashed_images(canvas, np.full((2, 36, 64), 200.0), hold=2, gap=3)
    assert frames.shape == (10, 36, 64) and frames[1].min() == 200 and frames[2].max() == 80
    trace = BehaviorState.from_trace("recorded", np.tile([[40.0, 5.0]], (20, 1)))
    assert trace.speed == 5.0 and trace.trace(10).shape == (10, 2)
    with pytest.raises(ValueError, match="20 frames, the stimuli need 30"):
        trace.trace(30)


def test_generator_as_model_matches_the_digital_twin(generator: GroundTruth) -> None:
    video = natural_movie(np.random.default_rng(0), 40)  # (T, H, W)
    behavior, gaze = np.tile([[50.0, 5.0]], (40, 1)), np.tile([[140.0, 136.0]], (40, 1))
    rates = generator(
        torch.from_numpy(video)[None, None], torch.from_numpy(behavior.T)[None], torch.from_numpy(gaze.T)[None]
    )
    steps = twin.step_rates(twin.feature_bank(video), generator.params, behavior, gaze)  # (N, 20)
    assert rates.shape == (1, 96, 40)
    # Step s is known at frame 2s + 1 and held for two frames.
    assert np.allclose(rates[0, :, 1::2].numpy(), steps, rtol=1e-5)
    assert np.allclose(rates[0, :, 2::2].numpy(), steps[:, :-1], rtol=1e-5)


def test_receptive_field_centres_within_one_pixel(generator: GroundTruth) -> None:
    res = ex.receptive_fields(generator)
    t = _truth(generator)
    err = np.hypot(res["rf_x"] - t["true_rf_x"], res["rf_y"] - t["true_rf_y"])
    inner = (t["true_rf_x"] > 6) & (t["true_rf_x"] < 58) & (t["true_rf_y"] > 6) & (t["true_rf_y"] < 30)
    # Complex cells (energy-model RFs, symmetric) away from the screen's edges: every centre within 1 px.
    complex_ = inner & (t["true_simple_index"] < 0.2)
    assert complex_.sum() >= 20 and err[complex_].max() <= 1.0
    # Simple cells' half-wave rectified lobes can be unequal: the median still within 1 px, all within 3.5.
    assert np.median(err) <= 1.0 and err.max() <= 3.5
    # Longer wavelength = wider Gabor envelope = larger RF.
    wide = t["true_sf"] < 0.08
    assert res["rf_diameter"][wide].mean() > res["rf_diameter"][~wide].mean() + 1.5
    assert res["sta_energy"].shape == (96, 36, 64)


def test_orientation_direction_sf_tf_and_simple_complex(generator: GroundTruth, tuning: ex.Result) -> None:
    t = _truth(generator)
    assert np.array_equal(tuning["pref_orientation"], t["true_orientation"])  # the true one of the 4, every neuron
    strong = (t["true_direction_index"] >= 0.5) & (t["true_simple_index"] <= 0.5)
    assert strong.sum() >= 5 and np.array_equal(tuning["pref_direction"][strong], t["true_direction"][strong])
    assert np.array_equal(nearest_sf(tuning["pref_sf"]), t["true_sf"])  # 1/10 or 1/18 cycles/px, the nearer
    # Transient cells (biphasic kernel, no DC) prefer faster drift; sustained ones the slowest, but the motion-energy
    # term of direction-selective cells peaks near 3.75 Hz (delay 1 step): a few of them prefer 2 Hz.
    tf, transient = tuning["pref_tf"], t["true_transient"]
    assert tf[transient].min() >= 2.0 and np.mean(tf[~transient] == 1.0) >= 0.9
    f1f0, a = tuning["f1_f0"], t["true_simple_index"]
    assert (f1f0[a > 0.8] > 1).all() and (f1f0[a < 0.2] < 1).all()  # simple vs complex by F1/F0
    # DSI ranks neurons by their motion-energy share b·(1 − a) where the drift is fast enough (2 and 4 Hz; one
    # 15 Hz step of delay barely separates the directions at 1 Hz).
    _, summary = recovery(tuning, generator.params, np.arange(96))
    assert summary["dsi_spearman_2hz"] > 0.9 and summary["dsi_spearman_4hz"] > 0.9
    assert summary["orientation_accuracy"] == 1.0 and summary["simple_complex_accuracy"] > 0.8


def test_size_tuning_finds_surround_suppression(generator: GroundTruth, tuning: ex.Result) -> None:
    t = _truth(generator)
    pick = np.arange(0, 96, 4)  # 24 neurons
    res = ex.size_tuning(
        generator,
        generator.unit_ids[pick],
        centers=np.stack([t["true_rf_x"], t["true_rf_y"]], 1)[pick],
        directions=tuning["pref_direction"][pick],
        sf=tuning["pref_sf"][pick],
        tf=tuning["pref_tf"][pick],
    )
    ssi = res["suppression_index"]
    assert (ssi > 0).all()  # the normalisation pool grows with the grating: every neuron is suppressed
    assert spearman(ssi, t["true_normalization"][pick]) > 0.4  # more suppression where the pool weighs more
    wide = t["true_sf"][pick] < 0.08
    assert res["pref_diameter"][wide].mean() > res["pref_diameter"][~wide].mean()


def test_behaviour_gain_sign_and_rank(generator: GroundTruth) -> None:
    res = ex.behavior_modulation(generator)
    t = _truth(generator)
    log_run, log_pupil = np.log(res["running_gain"]), np.log(res["pupil_gain"])
    clear = np.abs(t["true_run_weight"]) > 0.05
    assert np.array_equal(np.sign(log_run[clear]), np.sign(t["true_run_weight"][clear]))
    assert spearman(log_run, t["true_run_weight"]) > 0.99  # the gain is exp(weight · running): same order
    assert spearman(log_pupil, t["true_pupil_weight"]) > 0.99
    _, summary = recovery(res, generator.params, np.arange(96))
    assert summary["running_gain_sign_accuracy"] == 1.0


def test_neuron_selection_and_errors(generator: GroundTruth) -> None:
    ids = generator.unit_ids[[5, 2]]
    res = ex.behavior_modulation(generator, ids, directions=(0.0, 90.0))
    assert list(res.unit_ids) == list(ids) and res["running_gain"].shape == (2,)
    with pytest.raises(ValueError, match=r"neurons \[9999\]: not unit ids"):
        generator.neuron_index([9999])
    with pytest.raises(ValueError, match="not differentiable"):
        ex.gradient_receptive_fields(generator)
