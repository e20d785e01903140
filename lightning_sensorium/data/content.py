"""What a release does not label, inferred from the pixels: which trials show the same clip, and the stimulus
family of each bonus trial.

* clip ids: trials showing the same clip share an id, found by content with ViV1T's rule (two clips are equal when
  every pixel is within 1 grey level in more than 85 % of the frames; :func:`group_clips`);
* stimulus types: natural for the train/oracle/main tiers; bonus trials by a pixel-statistics heuristic
  (:func:`classify_stimulus`), then by majority within each clip group (:func:`vote_within_clips`).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable

import numpy as np

#: Two trials show the same clip when every pixel is within ``CLIP_TOLERANCE`` grey levels in more than
#: ``CLIP_MIN_FRACTION`` of the frames (ViV1T's rule: https://github.com/bryanlimy/ViV1T-closed-loop/blob/main/misc/
#: assign_video_ids.py).
CLIP_TOLERANCE = 1.0
CLIP_MIN_FRACTION = 0.85
#: Frames are summarised by the means of 6 × 8 blocks for the clip search (a necessary condition of the rule).
BLOCKS = (6, 8)


def block_means(video: np.ndarray) -> np.ndarray:
    """``(T, 48)`` means of 6 × 8 blocks of each frame of a ``(T, H, W)`` clip (H, W divisible by 6, 8 or not)."""
    t, h, w = video.shape
    by, bx = BLOCKS
    ys = np.linspace(0, h, by + 1).astype(int)
    xs = np.linspace(0, w, bx + 1).astype(int)
    v = video.astype(np.float32)
    if h % by == 0 and w % bx == 0:
        return v.reshape(t, by, h // by, bx, w // bx).mean(axis=(2, 4)).reshape(t, by * bx)
    out = np.empty((t, by, bx), np.float32)
    for a in range(by):
        for b in range(bx):
            out[:, a, b] = v[:, ys[a] : ys[a + 1], xs[b] : xs[b + 1]].mean(axis=(1, 2))
    return out.reshape(t, by * bx)


def same_clip(
    a: np.ndarray, b: np.ndarray, tolerance: float = CLIP_TOLERANCE, min_fraction: float = CLIP_MIN_FRACTION
) -> bool:
    """ViV1T's rule on two ``(T, H, W)`` clips: every pixel within ``tolerance`` in > ``min_fraction`` of the frames.

    Frames present in only one clip (different lengths) count as different.
    """
    frames = max(len(a), len(b))
    common = min(len(a), len(b))
    if frames == 0:
        return True
    diff = np.abs(a[:common].astype(np.float32) - b[:common].astype(np.float32))
    matching = int((diff.reshape(common, -1).max(axis=1) <= tolerance).sum())
    return matching > min_fraction * frames


def group_clips(
    lengths: np.ndarray,
    frame_means: np.ndarray,
    blocks: np.ndarray,
    load: Callable[[int], np.ndarray],
    tolerance: float = CLIP_TOLERANCE,
    min_fraction: float = CLIP_MIN_FRACTION,
    cache_size: int = 64,
) -> np.ndarray:
    """Clip id per trial (0, 1, … in order of first appearance): trials whose clips match (:func:`same_clip`).

    Args:
        lengths: ``(n,)`` valid frames per trial.
        frame_means: ``(n, F)`` mean grey level per frame, NaN past the length.
        blocks: ``(n, F, 48)`` block means per frame (:func:`block_means`), NaN past the length.
        load: ``load(i)`` → the valid frames ``(lengths[i], H, W)`` of trial ``i`` (for the final exact check).

    Signature then verify: a trial is compared with the first trial of every group found so far, in three steps
    that are each necessary for the next — lengths within the fraction, frame means within ``tolerance`` in enough
    frames (vectorised over all groups), block means likewise — and only the survivors get the pixel-exact rule.
    Greedy (first matching group wins): fine for repeats, which are identical or nearly so.
    """
    n = len(lengths)
    ids = np.full(n, -1, dtype=np.int64)
    reps: list[int] = []
    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def video(i: int) -> np.ndarray:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        cache[i] = load(i)
        if len(cache) > cache_size:
            cache.popitem(last=False)
        return cache[i]

    for i in range(n):
        match = -1
        if reps:
            r = np.asarray(reps)
            frames = np.maximum(lengths[r], lengths[i])
            with np.errstate(invalid="ignore"):
                close = np.abs(frame_means[r] - frame_means[i]) <= tolerance  # (R, F); NaN → False
            fraction = close.sum(axis=1) / np.maximum(frames, 1)
            ok = (np.minimum(lengths[r], lengths[i]) > min_fraction * frames) & (fraction > min_fraction)
            for g in np.flatnonzero(ok)[np.argsort(-fraction[ok], kind="stable")]:
                j = reps[g]
                with np.errstate(invalid="ignore"):
                    block_close = np.abs(blocks[j] - blocks[i]).max(axis=1) <= tolerance
                if block_close.sum() <= min_fraction * frames[g]:
                    continue
                if same_clip(video(j), video(i), tolerance, min_fraction):
                    match = int(g)
                    break
        if match < 0:
            reps.append(i)
            match = len(reps) - 1
        ids[i] = match
    return ids


def classify_stimulus(video: np.ndarray) -> str:
    """OOD family of one bonus trial from its valid frames ``(T, H, W)`` in grey levels (a documented heuristic).

    Features (fractions over frames or pixels): ``grey`` = frames that are uniform (pixel std < 2);
    ``background`` = pixels within 3 grey levels of their frame's median; ``extreme`` = pixels ≤ 5 or ≥ 250;
    ``still`` = frame-to-frame changes below 0.5 grey levels on average. Rules, in order:

    1. ``grey > 0.15`` → ``image`` (15-frame flashed images separated by 12–18 uniform grey frames);
    2. ``extreme > 0.01`` and ``background > 0.8`` → ``random_dots`` (small black/white dots on grey);
    3. ``still > 0.6`` → ``gaussian_dots`` (one dot held for 9 frames, then the next);
    4. ``background > 0.3`` → ``drifting_gabor`` (a Gabor patch moving every frame inside a grey surround);
    5. otherwise ``pink_noise`` (full-field moving texture).
    """
    t = video.shape[0]
    if t == 0:
        return "pink_noise"
    flat = video.reshape(t, -1).astype(np.float32)
    grey_frames = float((flat.std(axis=1) < 2.0).mean())
    if grey_frames > 0.15:
        return "image"
    median = np.median(flat, axis=1, keepdims=True)
    background = float((np.abs(flat - median) <= 3).mean())
    extreme = float(((flat <= 5) | (flat >= 250)).mean())
    if extreme > 0.01 and background > 0.8:
        return "random_dots"
    still = float((np.abs(np.diff(flat, axis=0)).mean(axis=1) < 0.5).mean()) if t > 1 else 1.0
    if still > 0.6:
        return "gaussian_dots"
    if background > 0.3:
        return "drifting_gabor"
    return "pink_noise"


def vote_within_clips(labels: list[str], clip_id: np.ndarray, bonus: np.ndarray) -> list[str]:
    """Give every bonus trial the most common label of the bonus trials of its clip group."""
    out = list(labels)
    for c in np.unique(clip_id[bonus]):
        members = np.flatnonzero(bonus & (clip_id == c))
        winner = Counter(labels[i] for i in members).most_common(1)[0][0]
        for i in members:
            out[i] = winner
    return out
