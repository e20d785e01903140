"""The one vocabulary of the data layer: release layout, tiers, stimulus types, store array names.

Official release (one folder per session, time LAST, NaN padding to the mouse's longest trial ``T_pad``)::

    <session>/data/videos/<i>.npy        (H=36, W=64, T_pad)  grey levels 0..255
    <session>/data/responses/<i>.npy     (N, T_pad)           deconvolved calcium activity
    <session>/data/behavior/<i>.npy      (2, T_pad)           [pupil size, running speed]; never NaN
    <session>/data/pupil_center/<i>.npy  (2, T_pad)           [x, y] camera pixels
    <session>/meta/trials/tiers.npy      (n_trials,) str      row i <-> file i.npy
    <session>/meta/neurons/unit_ids.npy  (N,) int
    <session>/meta/neurons/cell_motor_coordinates.npy  (N, 3) int microns
    <session>/meta/statistics/<key>/all/{mean,std,min,max,median}.npy   per-frame statistics

Synthetic mice also get ground truth *beside* the session folders (never inside them)::

    <root>/ground_truth/<session>/rates/<i>.npy      (N, T_pad) float32 noiseless rates, NaN-padded like responses
    <root>/ground_truth/<session>/clip_ids.npy       (n_trials,) int64: trials with identical pixels share an id
    <root>/ground_truth/<session>/stimulus_types.npy (n_trials,) str: one of STIMULUS_TYPES

Zarr store (one per mouse, ``<out>/<mouse_id>.zarr``, time FIRST; see docs/data.md, "Store contract").
"""

from __future__ import annotations

from typing import Final

#: The four per-trial data keys of the release, in the order every codebase uses.
DATA_KEYS: Final = ("videos", "responses", "behavior", "pupil_center")

#: The six tiers of ``meta/trials/tiers.npy``. ``oracle`` is the validation split.
TIERS: Final = (
    "train",
    "oracle",
    "live_test_main",
    "live_test_bonus",
    "final_test_main",
    "final_test_bonus",
)
#: Tier codes of a store: the six tiers and ``none`` (skipped by every loader; kept so such trials stay addressable).
TIER_LABELS: Final = (*TIERS, "none")
#: Tiers whose trials are repeats of a few clips (all but ``train``).
REPEAT_TIERS: Final = TIERS[1:]
#: Tiers whose responses are hidden (all zeros) for the competition mice.
TEST_TIERS: Final = ("live_test_main", "live_test_bonus", "final_test_main", "final_test_bonus")

#: Stimulus families. Codes follow ViV1T's ``assign_stimulus_ids.py`` order
#: (https://github.com/bryanlimy/ViV1T-closed-loop/blob/main/misc/assign_stimulus_ids.py).
STIMULUS_TYPES: Final = ("natural", "pink_noise", "gaussian_dots", "random_dots", "drifting_gabor", "image")
OOD_STIMULUS_TYPES: Final = STIMULUS_TYPES[1:]

#: The per-frame statistics of the release (``meta/statistics/<key>/all/<name>.npy``) and of a store.
STATISTICS: Final = ("mean", "std", "min", "max", "median")

#: Frames skipped at the start of every trial by the official metrics.
SKIP_FRAMES: Final = 50
#: Longest usable trial: the per-frame statistics exist only where train trials exist.
MAX_FRAMES: Final = 300
#: Recording frame rate of the release.
FPS: Final = 30.0

#: Sub-folder of a synthetic release root that holds the generator's ground truth.
GROUND_TRUTH_DIR: Final = "ground_truth"
