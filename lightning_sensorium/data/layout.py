"""The one vocabulary of the data layer: release layout, tiers, stimulus types, store array names.

It exists so that the release's paths, the tier and stimulus-type codes and the store's array names are spelled in
one place. The layouts they name: docs/data.md, "The official release layout (input of `convert`)" (time last,
NaN-padded), "Synthetic digital-twin mice (`synth`)" (the ground truth beside the mice) and "Store contract" (one
zarr store per mouse, time first).
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
