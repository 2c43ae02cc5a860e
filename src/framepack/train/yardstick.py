"""The demo model's yardstick (issue 18): measurements that a caption-blind model cannot pass.

A *generator* is any function ``(start frame (H, W, 3) uint8, caption, seconds, seed) -> frames
(T, H, W, 3) uint8`` (any size; the metrics read it from the frames): the model behind ``framepack eval``, or, in the tests, the world's own clips,
a frozen video, random noise or a caption-blind rule. Everything here is pure numpy on decoded
frames, so the negative controls need no model.

* **Caption control** (:func:`caption_control`): every start frame of a split is generated with
  every motion caption the world admits for it (:func:`world.applicable_motions`), at the same
  seed; :func:`classify_motion` names the motion it sees. A generator that ignores the caption
  makes the same video for all ``k`` captions of a start frame, so it is right at most once in
  ``k``: chance is the mean of ``1 / k`` over start frames (``1 / len(MOTIONS)`` where every motion
  applies), and no caption-blind generator beats it in expectation.
* **Shape fidelity** (:func:`shape_fidelity`): per frame, the IoU of the tracked object's mask
  with the world's ground truth (:func:`true_masks`, from :func:`world.object_coverage`), in place, and centred
  (the masks' centroids aligned first): the caption does not give the speed, so a video can keep
  the shape perfectly and still drift from the true position; centred IoU separates the two.
* **Persistence** (:func:`persistence`): the share of frames in which the tracked object's area is
  within a factor :data:`AREA_FACTOR` of the object's *true* visible area at that time, so a
  correctly shrinking square is not lost, and a frozen one is.
* **Intervals**: Wilson score intervals for proportions (:func:`wilson`), percentile bootstrap over
  videos for means (:func:`mean_interval`), both 95%.

The tracked object is the object colour's mask (within :data:`COLOUR_TOLERANCE`), morphologically
opened with a 3x3 square: isolated matching pixels (noise, a random video's 10% of chance matches)
vanish, an object of the world (radius >= 6 px) does not.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from . import world

Generator = Callable[[np.ndarray, str, float, int], np.ndarray]

COLOUR_TOLERANCE = 60  # Chebyshev RGB distance to the object's colour (world.colour_mask's default)
AREA_FACTOR = 4.0  # persistence: tracked area within [true / 4, true * 4]
PRESENT_SHARE = 0.5  # caption control: an object tracked in fewer frames than this is "lost"
MOVE_PX = 3.0  # a centroid range below this (px at 128, scaled) is no movement
BOUNCE_RATIO = 0.2  # both axes' ranges >= this share of the larger: diagonal, a bounce (translations are axial)
GROW_RATIO = 1.2  # area of the last tenth of the frames over the first tenth: grow above, shrink below 1 / it
ROTATE_IOU = 0.85  # a centred mask overlapping the first frame's less than this has turned
PAN_PX = 4.0  # background stripes moved at least this far (px at 128, scaled): a camera pan
STRIPE_AMPLITUDE = 2.0  # luma amplitude of the stripes' fundamental below which there are no stripes to read
EDGE_NEAR = 0.3  # the blind rule: a centre within this fraction of the frame from an edge is "near"
LOST = "lost"


# ---- the tracked object -------------------------------------------------------------------------------


def _shifted(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` (T, H, W) moved by (dy, dx) pixels, False where nothing moved in."""
    out = np.zeros_like(mask)
    h, w = mask.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _open(mask: np.ndarray) -> np.ndarray:
    """Morphological opening with a 3x3 square: the union of the 3x3 squares inside ``mask``."""
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    eroded = np.logical_and.reduce([_shifted(mask, dy, dx) for dy, dx in offsets])
    return np.logical_or.reduce([_shifted(eroded, dy, dx) for dy, dx in offsets])


def object_masks(frames: np.ndarray, rgb: world.RGB) -> np.ndarray:
    """The tracked object in each frame: (T, H, W) bool (module docstring)."""
    return _open(world.colour_mask(frames, rgb, COLOUR_TOLERANCE))


def true_masks(p: world.WorldParams, frames: int, size: int) -> np.ndarray:
    """The ground truth of :func:`object_masks`: (T, size, size) pixels whose true colour, the
    analytic blend ``background + coverage * (object - background)``, is within
    :data:`COLOUR_TOLERANCE` of the object's colour, opened the same way. Equal to the tracked
    masks of the world's own clip up to rounding (a fixed coverage threshold such as 0.5 is not:
    it misses or adds a ring of edge pixels, 5-10% of a small object's area)."""
    coverage = world.object_coverage(p, frames, size=size)
    colour = np.asarray(world.PALETTE[p.color], dtype=np.float32)
    contrast = np.abs(colour - world.background(p, frames, size=size)).max(axis=-1)  # (T or 1, size, size)
    return _open((1 - coverage) * contrast <= COLOUR_TOLERANCE)


def centroids(masks: np.ndarray) -> np.ndarray:
    """(T, 2) centroids (x, y) in pixels (pixel centres at +0.5), NaN for an empty mask."""
    counts = masks.sum(axis=(1, 2)).astype(np.float64)
    xs = np.arange(masks.shape[2]) + 0.5
    ys = np.arange(masks.shape[1]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        track = np.stack([masks.sum(axis=1) @ xs / counts, masks.sum(axis=2) @ ys / counts], axis=1)
    track[counts == 0] = np.nan
    return track


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame IoU of two (T, H, W) masks; NaN where both are empty."""
    union = (a | b).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, (a & b).sum(axis=(1, 2)) / np.maximum(union, 1), np.nan)


def centred(masks: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``masks`` each moved by whole pixels so that its centroid lands on ``targets`` (T, 2)."""
    shift = np.nan_to_num(np.rint(targets - centroids(masks))).astype(int)
    return np.concatenate([_shifted(m[None], int(dy), int(dx)) for m, (dx, dy) in zip(masks, shift)]) if len(masks) else masks


# ---- what motion a video shows ----------------------------------------------------------------------------


def background_shift(frames: np.ndarray, masks: np.ndarray) -> float | None:
    """How far (px, + to the right) the background's vertical stripes moved from the first frame
    to the last, or None where there are no stripes to read.

    Per frame, the phase of the stripes' fundamental (period :data:`world.STRIPE_PERIOD`, scaled)
    in the column profile of the luma away from the object; unwrapped over time (a pan moves them
    well under half a period per frame), so a shift of several periods is read correctly."""
    w = masks.shape[2]
    period = world.STRIPE_PERIOD * w / world.SIZE
    luma = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    away = ~_grow(masks, 2)
    profile = (luma * away).sum(axis=1) / np.maximum(away.sum(axis=1), 1)  # (T, W)
    wave = np.exp(-2j * np.pi * (np.arange(w) + 0.5) / period)
    z = (profile - profile.mean(axis=1, keepdims=True)) @ wave * (2 / w)
    if np.median(np.abs(z)) < STRIPE_AMPLITUDE:
        return None
    phase = np.unwrap(np.angle(z))
    return float(-(phase[-1] - phase[0]) * period / (2 * np.pi))


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(pixels):
        out = out | _shifted(out, 1, 0) | _shifted(out, -1, 0) | _shifted(out, 0, 1) | _shifted(out, 0, -1)
    return out


def classify_motion(frames: np.ndarray, rgb: world.RGB) -> str:
    """Which of :data:`world.MOTIONS` the object of colour ``rgb`` shows, or ``"lost"``.

    In order: lost (the object tracked in under half the frames, or not in the first); a pan (the
    background's stripes moved: :func:`background_shift`); a bounce (the centroid ranged along
    both axes: the world's translations are axial, its bounces 20-70 degrees off the axes); a
    translation (along the axis it ranged, the way it went); grow / shrink (area of the last tenth
    of the frames against the first); rotate (a centred mask turned away from the first frame's);
    else stay. Reliable from about 2 s of video at the world's speeds (checked on the world's own
    clips in the tests)."""
    masks = object_masks(frames, rgb)
    area = masks.sum(axis=(1, 2)).astype(np.float64)
    present = area > 0
    if not present[0] or present.mean() < PRESENT_SHARE:
        return LOST
    scale = masks.shape[2] / world.SIZE
    shift = background_shift(frames, masks)
    if shift is not None and abs(shift) >= PAN_PX * scale:
        return "pan left" if shift > 0 else "pan right"  # panning left moves the content right
    track = centroids(masks)[present]
    ranges = np.ptp(track, axis=0)
    if ranges.max() >= MOVE_PX * scale:
        if ranges.min() >= BOUNCE_RATIO * ranges.max():
            return "bounce"
        axis = int(np.argmax(ranges))
        step = track[-1, axis] - track[0, axis]
        return ("right" if step > 0 else "left") if axis == 0 else ("down" if step > 0 else "up")
    tenth = max(1, len(area) // 10)
    growth = area[present][-tenth:].mean() / area[present][:tenth].mean()
    if growth >= GROW_RATIO:
        return "grow"
    if growth <= 1 / GROW_RATIO:
        return "shrink"
    first = masks[:1][[0] * int(present.sum())]
    overlap = iou(centred(masks[present], centroids(first)), first)
    return "rotate" if np.nanmin(overlap) < ROTATE_IOU else "stay"


# ---- statistics ------------------------------------------------------------------------------------------


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95% by default) of a proportion; (nan, nan) for n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the percentile bootstrap's 95% interval of the mean over the values (the
    unit is a video), deterministic; NaN bounds below 2 values, where there is no spread to read."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    if len(x) < 2:
        return float(x.mean()), math.nan, math.nan
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(low), float(high)


# ---- the measurements ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionTrial:
    start: int  # index of the start frame
    choices: int  # captions that apply to this start frame
    caption: str
    motion: str  # the caption's
    got: str  # what classify_motion saw

    @property
    def right(self) -> bool:
        return self.got == self.motion


def caption_control(generate: Generator, starts: Sequence[world.WorldParams], seconds: float, seed: int = 0,
                    progress: Callable[[str], None] = lambda s: None) -> list[CaptionTrial]:
    """Every start frame of ``starts`` with every caption that applies to it, at one seed per start frame."""
    trials = []
    for i, p in enumerate(starts):
        first = world.render(p, 1)[0]
        motions = world.applicable_motions(p)
        for motion in motions:
            text = world.caption(world.with_motion(p, motion))
            got = classify_motion(generate(first, text, seconds, seed + i), world.PALETTE[p.color])
            trials.append(CaptionTrial(i, len(motions), text, motion, got))
            progress(f"caption {len(trials)}: {got} for '{text}'")
    return trials


def chance(trials: Sequence[CaptionTrial]) -> float:
    """What a caption-blind generator scores at best, in expectation: the mean of 1 / k over start frames."""
    per_start = {t.start: t.choices for t in trials}
    return float(np.mean([1 / k for k in per_start.values()])) if per_start else math.nan


def confusion(trials: Iterable[CaptionTrial]) -> dict[str, dict[str, int]]:
    """Caption motion -> {classified motion or "lost": count}."""
    table: dict[str, Counter] = {}
    for t in trials:
        table.setdefault(t.motion, Counter())[t.got] += 1
    return {m: dict(table[m]) for m in world.MOTIONS if m in table}


def shape_ious(frames: np.ndarray, p: world.WorldParams) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, (IoU in place, centred IoU) of the tracked object against the ground truth (frames
    run from t = 0 at ``frames``' size); NaN where neither has an object."""
    truth = true_masks(p, len(frames), frames.shape[2])
    tracked = object_masks(frames, world.PALETTE[p.color])
    return iou(tracked, truth), iou(centred(tracked, centroids(truth)), truth)


def shape_fidelity(frames: np.ndarray, p: world.WorldParams) -> tuple[float, float]:
    """(mean IoU in place, mean centred IoU) over the frames where either has an object (:func:`shape_ious`)."""
    in_place, aligned = shape_ious(frames, p)
    return float(np.nanmean(in_place)), float(np.nanmean(aligned))


def persistence(frames: np.ndarray, p: world.WorldParams) -> float:
    """Share of frames where the tracked object's area is within :data:`AREA_FACTOR` of the true
    visible area at that time; frames where the world's object is out of sight do not count (NaN
    if none is in sight)."""
    area = object_masks(frames, world.PALETTE[p.color]).sum(axis=(1, 2))
    true = true_masks(p, len(frames), frames.shape[2]).sum(axis=(1, 2))
    seen = true > 0
    if not seen.any():
        return math.nan
    kept = (area >= true / AREA_FACTOR) & (area <= true * AREA_FACTOR)
    return float(kept[seen].mean())


# ---- caption-blind rules (what the start frame alone gives away) ---------------------------------------


def edge_rule(frame: np.ndarray, rgb: world.RGB) -> str:
    """The issue's rule: near an edge, move away from it; otherwise stay. Reads the start frame only."""
    centre = centroids(object_masks(frame[None], rgb))[0]
    if np.isnan(centre).any():
        return "stay"
    h, w = frame.shape[:2]
    distances = {"right": centre[0] / w, "left": 1 - centre[0] / w, "down": centre[1] / h, "up": 1 - centre[1] / h}
    away, nearest = min(distances.items(), key=lambda item: item[1])
    return away if nearest < EDGE_NEAR else "stay"


def edge_rule_of(p: world.WorldParams, size: int = 64) -> str:
    """:func:`edge_rule` on the start frame of scene ``p``, rendered at ``size``."""
    return edge_rule(world.render(p, 1, size=size)[0], world.PALETTE[p.color])


def _start_features(p: world.WorldParams) -> tuple:
    """What the start frame shows, binned: shape, background kind, centre (5 x 5) and size (4)."""
    def binned(u: float, low: float, high: float, bins: int) -> int:
        return min(bins - 1, max(0, int((u - low) / (high - low) * bins)))

    low, high = world.SIZE_RANGE
    return p.shape, p.background, binned(p.x, 0, 1, 5), binned(p.y, 0, 1, 5), binned(p.size, low, high, 4)


def fit_start_frame_rule(training: Iterable[world.WorldParams]) -> Callable[[world.WorldParams], str]:
    """The best blind rule we could think of: from training scenes, the most common motion of every
    bin of what the start frame shows (:func:`_start_features`: shape, background, position, size).
    The returned rule reads only those (:func:`world.start_frame_key`'s fields), never the motion."""
    counts: dict[tuple, Counter] = {}
    overall: Counter = Counter()
    for p in training:
        counts.setdefault(_start_features(p), Counter())[p.motion] += 1
        overall[p.motion] += 1

    def rule(p: world.WorldParams) -> str:
        seen = counts.get(_start_features(p), overall)
        allowed = world.applicable_motions(p)
        return max(allowed, key=lambda m: (seen.get(m, 0), overall.get(m, 0)))

    return rule


# ---- long videos: shape fidelity and persistence -------------------------------------------------------


def long_scenes(split: str, n: int, start: str = "independent") -> list[world.WorldParams]:
    """``n`` scenes of ``split`` for long videos, one per motion first (round-robin), no camera
    pans: a pan carries the object out of the frame within seconds, leaving nothing to measure."""
    return one_per_motion_first([p for p in world.scenes(split, 16 * n + 16, start) if p.motion not in world.PANS], n)


def one_per_motion_first(pool: Sequence[world.WorldParams], n: int) -> list[world.WorldParams]:
    """``n`` of ``pool``: one of each motion first (in pool order), so that a handful of videos covers the variety."""
    chosen: list[world.WorldParams] = []
    for p in pool:
        if p.motion not in {c.motion for c in chosen}:
            chosen.append(p)
        if len(chosen) == n:
            return chosen
    return (chosen + [p for p in pool if p not in chosen])[:n]


def long_videos(generate: Generator, scenes: Sequence[world.WorldParams], shape_seconds: Sequence[float],
                persistence_seconds: Sequence[float], seed: int = 0,
                extra: Callable[[np.ndarray], dict[str, float]] = lambda frames: {},
                progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Each scene generated once per length in ``shape_seconds`` and ``persistence_seconds`` (a
    length in both serves both), from its start frame and caption; a row per video with its IoUs
    (:func:`shape_fidelity`) and/or :func:`persistence`, plus ``extra(frames)``."""
    rows = []
    for i, p in enumerate(scenes):
        for seconds in sorted({*shape_seconds, *persistence_seconds}):
            frames = generate(world.render(p, 1)[0], world.caption(p), seconds, seed + i)
            row: dict = {"scene": i, "caption": world.caption(p), "motion": p.motion, "seconds": seconds,
                         "frames": len(frames)}
            if seconds in shape_seconds:
                row["iou"], row["centred_iou"] = shape_fidelity(frames, p)
            if seconds in persistence_seconds:
                row["persistence"] = persistence(frames, p)
            rows.append({**row, **extra(frames)})
            progress(f"long video {len(rows)}: {seconds:g} s of '{world.caption(p)}'")
    return rows


def column(rows: Iterable[dict], key: str, seconds: float) -> list[float]:
    """``key`` of the rows of videos ``seconds`` long that have it."""
    return [r[key] for r in rows if r["seconds"] == seconds and key in r]


def frame_count(seconds: float) -> int:
    """Frames of a clip of ``seconds`` from t = 0, both ends included (what the world renders for a
    generated video of that length)."""
    return round(seconds * world.FPS) + 1


# ---- reference generators: full marks and negative controls -------------------------------------------


def world_generator(scenes: Iterable[world.WorldParams], size: int = world.SIZE) -> Generator:
    """The world's own clips as a generator: a perfect model of ``scenes`` (and of every motion their
    start frames admit), found by start frame and caption."""
    known = {}
    for p in scenes:
        for motion in world.applicable_motions(p):
            q = world.with_motion(p, motion) if motion != p.motion else p
            known[world.caption(q), world.render(q, 1)[0].tobytes()] = q

    def generate(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        return world.render(known[caption, first.tobytes()], frame_count(seconds), size=size)

    return generate


def caption_generator(scenes: Iterable[world.WorldParams], size: int = world.SIZE) -> Generator:
    """A ceiling: the world's own clip of the captioned motion at what the caption does not say (the
    middle of the speed range, a bounce at 45 degrees), so it knows exactly what a model is given,
    the start frame and the caption. Its in-place IoU is about the most a model can expect when it guesses
    speed and heading; the world's own clips (which know them) score 1."""
    return world_generator([world.with_motion(p, "stay") for p in scenes], size)


def blind_generator(scenes: Iterable[world.WorldParams], size: int = world.SIZE) -> Generator:
    """A caption-blind control: the world's own clip of a motion the start frame alone decides (a
    function of its position), whatever the caption says."""
    by_frame = {world.render(p, 1)[0].tobytes(): p for p in scenes}

    def generate(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        p = by_frame[first.tobytes()]
        motions = world.applicable_motions(p)
        motion = motions[round(p.x * 1000) % len(motions)]
        return world.render(world.with_motion(p, motion), frame_count(seconds), size=size)

    return generate


def frozen_generator(size: int = world.SIZE) -> Generator:
    """A control: the start frame repeated."""
    def generate(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        from PIL import Image

        frame = np.asarray(Image.fromarray(first).resize((size, size), Image.BILINEAR))
        return np.repeat(frame[None], frame_count(seconds), axis=0)

    return generate


def noise_generator(size: int = world.SIZE) -> Generator:
    """A control: uniform random pixels (seeded)."""
    def generate(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).integers(0, 256, (frame_count(seconds), size, size, 3), dtype=np.uint8)

    return generate
