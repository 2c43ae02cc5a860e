"""A procedural, deterministic synthetic video world for training a small FramePack model on CPU.

A clip is one flat-coloured shape (circle, square or triangle) on a dark background (plain,
vertical gradient or vertical stripes), doing one of :data:`MOTIONS`. Everything is a pure
function of a :class:`WorldParams` and the time, so a clip can be rendered from any frame on and
evaluation can read the ground truth (:func:`object_centre`, :func:`object_radius`) directly.

Geometry. Pixel ``(row i, column j)`` covers ``[j, j + 1) x [i, i + 1)``; its centre is
``(j + 0.5, i + 0.5)``. Positions are in pixels with x to the right and y *down*. ``x``, ``y`` and
``size`` in :class:`WorldParams` are fractions of the frame, and ``speed`` is in pixels per second
at the reference resolution :data:`SIZE` (scaled proportionally at other resolutions), so a clip
looks the same at every resolution.

Shapes have a nominal radius ``r = size * frame``: a circle of radius ``r``, an axis-aligned square
of half-side ``0.9 r`` and an equilateral triangle, apex up, of circumradius ``1.3 r``. Their
*extent* (circumradius: ``r``, ``1.27 r``, ``1.3 r``) is what is kept inside the frame. Edges are
anti-aliased analytically: a pixel's coverage is ``clip(0.5 - d, 0, 1)`` for the signed distance
``d`` from its centre to the shape's outline.

Motions (``v = speed * frame / SIZE`` px/s):

* ``left``/``right``/``up``/``down``: the centre moves linearly at ``v`` and stops (is clamped)
  where the shape touches the border, so it never leaves the frame.
* ``bounce``: the centre moves at ``v`` along ``heading`` (degrees, clockwise on screen from +x)
  and reflects off the borders, so the shape stays fully inside forever.
* ``grow``/``shrink``: the radius changes linearly by ``v / 3`` px/s (a factor of about 1.5-2.5
  over 5 s), clamped to :data:`RADIUS_BOUNDS`; the centre stays put.
* ``rotate``: the shape spins clockwise on screen at ``ROTATION_RATE * speed`` degrees per second
  (36-72 deg/s) about its centre. Never sampled for circles (they cannot rotate visibly).
* ``stay``: nothing moves (the sampler sets ``speed = 0``).
* ``pan left``/``pan right``: the camera pans, so the whole world (the striped background and the
  object fixed in it) scrolls horizontally at ``v`` the other way: ``pan left`` moves content to the
  right in the frame. The object is not clamped and eventually leaves the frame. Pans only occur
  on striped backgrounds (a plain or vertically graded background would not show the pan).

Start positions and motion parameters: three samplers (:data:`STARTS`).

* ``"by-motion"`` (the first world, what the shipped demo model was trained on, and still the
  default of :func:`sample_params` and :func:`stream` so that existing training configs reproduce
  their data): translations and pans start near the edge they move away from, grow starts small,
  shrink large. The start frame gives the answer away: "near an edge, move away from it;
  otherwise stay" needs no caption (issue 18).
* ``"independent"``: the start frame is drawn independently of the motion. The centre is uniform
  in :data:`CENTRAL` (fractions of the frame, both axes) and the size uniform in
  :data:`SIZE_RANGE`, for every motion; motions are uniform over those valid for the start frame
  (rotate needs a non-circle, pans stripes). We chose "room from any start in a central region"
  over letting objects leave the frame, because then every caption the start frame admits is a
  video the world can show: from the region's edge the largest shape (extent 0.208) still has
  ``(0.3 - 0.208) * 128 = 11.8`` px to travel, a full second at the top speed, before it stops at
  the border, so the caption, not the position, decides what happens. Only pans (the camera, not
  the object) carry it out of the frame, after seconds; metrics that need the object skip them.
* ``"determined"``: the start frames of ``"independent"`` (the same draws, so the same scenes and
  splits), and every motion at one speed, :data:`DEFAULT_SPEED` (the middle of
  :data:`SPEED_RANGE`), a bounce always heading :data:`DEFAULT_HEADING`. In the other worlds the
  speed, the bounce heading and so the rotation and growth rates are drawn and never named by the
  caption, so no model can know them: against their ground truth a perfect caption-follower scores
  well under full marks (the yardstick's *caption alone* ceiling). Here the start frame and the
  caption determine the clip, and the caption-alone clip *is* the ground truth.

Splits (:data:`SPLITS`). Every :class:`WorldParams` falls in one of :data:`HELD_OUT_MODULUS`
buckets by a stable hash (BLAKE2b); the sampler quantises the continuous fields so the hash is
well defined. Bucket 0 is held out and halved by the next bits of the same hash into
``validation`` (for choosing models and settings) and ``test`` (reported once per shipped model);
the rest is ``train``. For ``"by-motion"`` the hash covers every field, exactly as the first
world's single held-out bucket did (:func:`is_held_out`, :func:`held_out`), so its training streams
are unchanged. For ``"independent"`` and ``"determined"`` it covers the start frame's fields only
(:func:`start_frame_key`): a held-out start frame is held out with every motion, which the caption
control (every motion caption on one start frame) needs. :func:`stream` yields ``train`` only and
:func:`scenes` one split only, so they are disjoint for every seed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Final

import numpy as np

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

FPS: Final = 30
SIZE: Final = 128

# Bright object colours.
PALETTE: Final[Mapping[str, RGB]] = MappingProxyType(
    {
        "red": (230, 40, 40),
        "green": (50, 205, 70),
        "blue": (60, 110, 255),
        "yellow": (250, 225, 40),
        "white": (245, 245, 245),
        "purple": (175, 80, 235),
        "orange": (255, 150, 30),
        "cyan": (50, 225, 235),
    }
)
# Dark background colours (the base shade; gradients and stripes span SHADE_RANGE of it).
BACKGROUND_PALETTE: Final[Mapping[str, RGB]] = MappingProxyType(
    {
        "blue": (25, 35, 110),
        "purple": (70, 25, 95),
        "teal": (10, 80, 80),
        "green": (20, 80, 30),
        "red": (110, 20, 25),
        "orange": (100, 45, 5),
        "gray": (70, 70, 70),
    }
)
# Hue family of every colour name: an object never sits on a background of its own family.
HUE: Final[Mapping[str, str]] = MappingProxyType(
    {
        "red": "red",
        "orange": "orange",
        "yellow": "yellow",
        "green": "green",
        "cyan": "cyan",
        "teal": "cyan",
        "blue": "blue",
        "purple": "purple",
        "white": "neutral",
        "gray": "neutral",
    }
)
SHAPES: Final = ("circle", "square", "triangle")
BACKGROUNDS: Final = ("plain", "gradient", "stripes")
MOTIONS: Final = (
    "left",
    "right",
    "up",
    "down",
    "bounce",
    "grow",
    "shrink",
    "rotate",
    "stay",
    "pan left",
    "pan right",
)
PANS: Final = ("pan left", "pan right")

SPEED_RANGE: Final = (6.0, 12.0)  # px/s at SIZE
DEFAULT_SPEED: Final = sum(SPEED_RANGE) / 2  # "determined": every motion's speed
DEFAULT_HEADING: Final = 45.0  # "determined": every bounce's heading (down and to the right)
SIZE_RANGE: Final = (0.08, 0.16)  # nominal radius, fraction of the frame, as sampled
RADIUS_BOUNDS: Final = (0.05, 0.30)  # allowed radius (fraction of the frame) at any time
GROW_RATE: Final = 1.0 / 3.0  # radius change (px/s) per px/s of speed
ROTATION_RATE: Final = 6.0  # degrees per second per px/s of speed
SHADE_RANGE: Final = (0.55, 1.25)  # background brightness factors (gradient top..bottom, stripes)
STRIPE_PERIOD: Final = 16.0  # px at SIZE
STRIPE_SHARPNESS: Final = 3.0  # stripes: clip(k * sin), soft (anti-aliased) edges ~2 px wide
MIN_CONTRAST: Final = 90  # min Chebyshev RGB distance object <-> any background shade
HELD_OUT_MODULUS: Final = 16  # 1/16 of the params space is reserved for evaluation
STARTS: Final = ("by-motion", "independent", "determined")  # the worlds' samplers (module docstring)
CENTRAL: Final = (0.3, 0.7)  # "independent": start centres, fraction of the frame on both axes
SPLITS: Final = ("train", "validation", "test")
DIRECTION_THRESHOLD: Final = 2.0  # px of net displacement below which a track is "still"
_GROW_SIZES: Final = (0.08, 0.11)  # start sizes: room to grow / shrink by a clear factor
_SHRINK_SIZES: Final = (0.13, 0.16)

_SQUARE_HALF_SIDE: Final = 0.9
_TRIANGLE_CIRCUMRADIUS: Final = 1.3
_EXTENT: Final[Mapping[str, float]] = MappingProxyType(
    {"circle": 1.0, "square": _SQUARE_HALF_SIDE * math.sqrt(2.0), "triangle": _TRIANGLE_CIRCUMRADIUS}
)
_STEPS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
)
_PAN_SIGN: Final[Mapping[str, int]] = MappingProxyType({"pan left": 1, "pan right": -1})
_VERBS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "left": "moves to the left",
        "right": "moves to the right",
        "up": "moves up",
        "down": "moves down",
        "bounce": "bounces",
        "grow": "grows",
        "shrink": "shrinks",
        "rotate": "rotates",
        "stay": "stays still",
    }
)
_BACKGROUND_ADJECTIVES: Final[Mapping[str, str]] = MappingProxyType(
    {"plain": "plain", "gradient": "gradient", "stripes": "striped"}
)


@dataclass(frozen=True)
class WorldParams:
    """Everything that determines a clip. Invalid combinations raise ``ValueError``.

    ``shape`` in :data:`SHAPES`; ``color`` a key of :data:`PALETTE`; ``background`` in
    :data:`BACKGROUNDS`; ``background_color`` a key of :data:`BACKGROUND_PALETTE`, never of the
    object's hue family and at least :data:`MIN_CONTRAST` away from it; ``motion`` in
    :data:`MOTIONS` (no ``rotate`` for circles, pans only on ``stripes``); ``speed`` >= 0 in px/s
    at :data:`SIZE`; ``x``, ``y`` the centre at t = 0 as fractions of the frame; ``size`` the
    nominal radius as a fraction of the frame, within :data:`RADIUS_BOUNDS`; ``heading`` the bounce
    direction in degrees clockwise from +x (used by ``bounce`` only).
    """

    shape: str
    color: str
    background: str
    background_color: str
    motion: str
    speed: float = 10.0
    x: float = 0.5
    y: float = 0.5
    size: float = 0.12
    heading: float = 45.0

    def __post_init__(self) -> None:
        for name in ("speed", "x", "y", "size", "heading"):  # canonical floats (stable hash key)
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            object.__setattr__(self, name, value)
        problem = _combination_problem(
            self.shape, self.color, self.background, self.background_color, self.motion
        )
        if problem:
            raise ValueError(problem)
        if self.speed < 0:
            raise ValueError(f"speed must be >= 0, got {self.speed}")
        if not (0.0 <= self.x <= 1.0 and 0.0 <= self.y <= 1.0):
            raise ValueError(f"x, y must be fractions of the frame, got {(self.x, self.y)}")
        low, high = RADIUS_BOUNDS
        if not low <= self.size <= high:
            raise ValueError(f"size must be within {RADIUS_BOUNDS}, got {self.size}")


# --------------------------------------------------------------------------------------------
# Colours and valid combinations


def contrast(color: str, background_color: str) -> float:
    """Smallest Chebyshev (max-channel) RGB distance between an object colour and any shade of a
    background colour (every gradient and stripe shade in :data:`SHADE_RANGE`)."""
    obj = np.asarray(PALETTE[color], dtype=np.float64)
    base = np.asarray(BACKGROUND_PALETTE[background_color], dtype=np.float64)
    shades = np.linspace(*SHADE_RANGE, 65)[:, None] * base
    return float(np.abs(np.rint(shades) - obj).max(axis=1).min())


@lru_cache(maxsize=1)
def _contrasting_pairs() -> frozenset[tuple[str, str]]:
    return frozenset(
        (color, background)
        for color in PALETTE
        for background in BACKGROUND_PALETTE
        if HUE[color] != HUE[background] and contrast(color, background) >= MIN_CONTRAST
    )


def _combination_problem(
    shape: str, color: str, background: str, background_color: str, motion: str
) -> str | None:
    """Why a discrete combination is invalid, or None."""
    if shape not in SHAPES:
        return f"unknown shape {shape!r}; expected one of {SHAPES}"
    if color not in PALETTE:
        return f"unknown color {color!r}; expected one of {tuple(PALETTE)}"
    if background not in BACKGROUNDS:
        return f"unknown background {background!r}; expected one of {BACKGROUNDS}"
    if background_color not in BACKGROUND_PALETTE:
        return f"unknown background_color {background_color!r}; expected one of {tuple(BACKGROUND_PALETTE)}"
    if motion not in MOTIONS:
        return f"unknown motion {motion!r}; expected one of {MOTIONS}"
    if (color, background_color) not in _contrasting_pairs():
        return f"a {color} object does not contrast with a {background_color} background"
    if shape == "circle" and motion == "rotate":
        return "a circle cannot rotate visibly"
    if motion in PANS and background != "stripes":
        return f"{motion!r} needs a striped background to be visible"
    return None


@lru_cache(maxsize=1)
def combinations() -> tuple[tuple[str, str, str, str, str], ...]:
    """Every valid (shape, color, background, background_color, motion), in a fixed order."""
    every = itertools.product(SHAPES, PALETTE, BACKGROUNDS, BACKGROUND_PALETTE, MOTIONS)
    return tuple(combo for combo in every if _combination_problem(*combo) is None)


# --------------------------------------------------------------------------------------------
# Captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(p: WorldParams) -> str:
    """The clip's text prompt; deterministic, names every field but the exact numbers.

    Grammar::

        <object> <verb> on a <bg-kind> <bg-color> background
        the camera pans <left|right> over <object> on a striped <bg-color> background

    with ``<object> = a|an <color> <shape>``, ``<bg-kind>`` in plain/gradient/striped and
    ``<verb>`` one of "moves to the left", "moves to the right", "moves up", "moves down",
    "bounces", "grows", "shrinks", "rotates", "stays still".
    """
    obj = f"{_article(p.color)} {p.color} {p.shape}"
    scene = f"on a {_BACKGROUND_ADJECTIVES[p.background]} {p.background_color} background"
    if p.motion in PANS:
        return f"the camera {p.motion.replace('pan', 'pans')} over {obj} {scene}"
    return f"{obj} {_VERBS[p.motion]} {scene}"


_MIRRORED_MOTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {"left": "right", "right": "left", "pan left": "pan right", "pan right": "pan left"}
)


def mirror(p: WorldParams) -> WorldParams | None:
    """The scene reflected left to right, or None where the world has no such scene.

    Every shape is symmetric about its vertical axis and the backgrounds are uniform across
    (plain, gradient) or periodic stripes, so a scene reflected is another scene of the world: the
    centre goes to ``1 - x``, left and right (and the pans) swap, a bounce heading ``h`` becomes
    ``180 - h``; only the stripes' phase is the world's own rather than the reflected one. A
    reflected rotation would turn anticlockwise, which the world never does: None. Training on both
    a scene and its mirror makes the motions in the data exactly left-right symmetric."""
    if p.motion == "rotate":
        return None
    heading = round((180.0 - p.heading) % 360.0, 1) if p.motion == "bounce" else p.heading
    return replace(p, motion=_MIRRORED_MOTIONS.get(p.motion, p.motion), x=round(1.0 - p.x, 3), heading=heading)


# --------------------------------------------------------------------------------------------
# Ground truth


def _reflect(u: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold positions ``u`` into ``[low, high]`` as a ball bouncing between the two walls."""
    span = high - low
    if span <= 0:
        return np.full_like(u, (low + high) / 2)
    return low + span - np.abs(np.mod(u - low, 2 * span) - span)


def _bounds(p: WorldParams, size: int) -> tuple[float, float]:
    """Range of centre coordinates that keeps the whole shape (its extent) inside the frame."""
    extent = _EXTENT[p.shape] * p.size * size
    low, high = extent, size - extent
    return (low, high) if low <= high else (size / 2, size / 2)


def _radius(p: WorldParams, t: np.ndarray, size: int) -> np.ndarray:
    r0 = p.size * size
    if p.motion not in ("grow", "shrink"):
        return np.full_like(t, r0)
    rate = GROW_RATE * p.speed * size / SIZE * (1 if p.motion == "grow" else -1)
    return np.clip(r0 + rate * t, RADIUS_BOUNDS[0] * size, RADIUS_BOUNDS[1] * size)


def _angle(p: WorldParams, t: np.ndarray) -> np.ndarray:
    """Orientation in radians, clockwise on screen (y points down)."""
    if p.motion != "rotate":
        return np.zeros_like(t)
    return np.deg2rad(ROTATION_RATE * p.speed) * t


def _pan_offset(p: WorldParams, t: np.ndarray, size: int) -> np.ndarray:
    """Horizontal shift (px) of the world content in the frame; 0 without a pan."""
    if p.motion not in PANS:
        return np.zeros_like(t)
    return _PAN_SIGN[p.motion] * p.speed * size / SIZE * t


def _centres(p: WorldParams, t: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    v = p.speed * size / SIZE
    x = np.full_like(t, p.x * size)
    y = np.full_like(t, p.y * size)
    low, high = _bounds(p, size)
    if p.motion in _STEPS:
        sx, sy = _STEPS[p.motion]
        if sx:
            x = np.clip(x + sx * v * t, low, high)
        else:
            y = np.clip(y + sy * v * t, low, high)
    elif p.motion == "bounce":
        heading = math.radians(p.heading)
        x = _reflect(x + v * math.cos(heading) * t, low, high)
        y = _reflect(y + v * math.sin(heading) * t, low, high)
    elif p.motion in PANS:
        x = x + _pan_offset(p, t, size)
    return x, y


def _times(frames: int, fps: int, start: int) -> np.ndarray:
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    return (start + np.arange(frames, dtype=np.float64)) / fps


def object_centre(p: WorldParams, t_seconds: float, size: int = SIZE) -> tuple[float, float]:
    """Centre (x, y) of the object in pixels at time ``t_seconds`` (pixel centres at +0.5)."""
    x, y = _centres(p, np.array([float(t_seconds)]), size)
    return float(x[0]), float(y[0])


def object_radius(p: WorldParams, t_seconds: float, size: int = SIZE) -> float:
    """Nominal radius of the object in pixels at time ``t_seconds`` (see the module docstring)."""
    return float(_radius(p, np.array([float(t_seconds)]), size)[0])


def trajectory(
    p: WorldParams, frames: int, size: int = SIZE, fps: int = FPS, start: int = 0
) -> np.ndarray:
    """Ground-truth centres (frames, 2) of the frames :func:`render` draws with the same arguments."""
    x, y = _centres(p, _times(frames, fps, start), size)
    return np.stack([x, y], axis=1)


# --------------------------------------------------------------------------------------------
# Rendering


def _signed_distance(
    shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, angle: np.ndarray
) -> np.ndarray:
    """Signed distance (px, negative inside) from pixel offsets (dx, dy) to the outline.

    ``dx`` is (T, 1, W), ``dy`` (T, H, 1), ``r`` and ``angle`` (T, 1, 1); the result is (T, H, W).
    """
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    cos, sin = np.cos(angle), np.sin(angle)
    if shape == "square":  # exact box distance in the square's own frame
        half = _SQUARE_HALF_SIDE * r
        qx = np.abs(cos * dx + sin * dy) - half
        qy = np.abs(cos * dy - sin * dx) - half
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0)
    # Equilateral triangle, apex up at angle 0: max over its three edges' half-plane distances
    # (exact along the edges, slightly rounded past the corners: well within the 1 px ramp).
    apothem = _TRIANGLE_CIRCUMRADIUS * r / 2
    distance = None
    for k in range(3):
        normal = angle + np.float32(math.pi / 2 + 2 * math.pi * k / 3)  # bottom edge first
        plane = np.cos(normal) * dx + np.sin(normal) * dy - apothem
        distance = plane if distance is None else np.maximum(distance, plane)
    return distance


def _coverage(p: WorldParams, t: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased object coverage in [0, 1], (T, size, size) float32."""
    cx, cy = _centres(p, t, size)
    r = _radius(p, t, size).astype(np.float32)[:, None, None]
    angle = _angle(p, t).astype(np.float32)[:, None, None]
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    dx = coords[None, None, :] - cx.astype(np.float32)[:, None, None]
    dy = coords[None, :, None] - cy.astype(np.float32)[:, None, None]
    distance = _signed_distance(p.shape, dx, dy, r, angle)
    return np.clip(np.float32(0.5) - distance, 0, 1)


def object_coverage(p: WorldParams, frames: int, size: int = SIZE, fps: int = FPS, start: int = 0) -> np.ndarray:
    """Where the object is in the frames :func:`render` draws: coverage in [0, 1], (frames, size, size)."""
    return _coverage(p, _times(frames, fps, start), size)


def _background(p: WorldParams, t: np.ndarray, size: int) -> np.ndarray:
    """Background, (T or 1, size, size, 3) float32 in 0..255."""
    base = np.asarray(BACKGROUND_PALETTE[p.background_color], dtype=np.float32)
    low, high = SHADE_RANGE
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    if p.background == "plain":
        shade = np.ones((1, 1, 1), dtype=np.float32)
    elif p.background == "gradient":  # dark at the top, bright at the bottom
        shade = (low + (high - low) * coords / size)[None, :, None]
    else:  # vertical stripes, scrolling horizontally with a pan
        offset = _pan_offset(p, t, size).astype(np.float32)
        if p.motion not in PANS:
            offset = offset[:1]
        period = np.float32(STRIPE_PERIOD * size / SIZE)
        phase = (coords[None, :] - offset[:, None]) * np.float32(2 * math.pi) / period
        wave = np.clip(np.float32(STRIPE_SHARPNESS) * np.sin(phase), -1, 1)
        shade = (low + (high - low) * (0.5 + 0.5 * wave))[:, None, :]
    return shade.astype(np.float32)[..., None] * base


def background(p: WorldParams, frames: int, size: int = SIZE, fps: int = FPS, start: int = 0) -> np.ndarray:
    """The background behind the object in the frames :func:`render` draws: (frames or 1, size,
    size, 3) float32 in 0..255 (one frame where it does not move)."""
    return _background(p, _times(frames, fps, start), size)


def render(p: WorldParams, frames: int, size: int = SIZE, fps: int = FPS, start: int = 0) -> np.ndarray:
    """Frames (frames, size, size, 3) uint8; frame ``k`` shows time ``(start + k) / fps``."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    t = _times(frames, fps, start)
    if frames == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    background = _background(p, t, size)
    coverage = _coverage(p, t, size)[..., None]
    colour = np.asarray(PALETTE[p.color], dtype=np.float32)
    out = background + coverage * (colour - background)
    return np.rint(out, out=out).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Sampling


def _uniform(u: float, low: float, high: float) -> float:
    return low + (high - low) * u


def _start_position(motion: str, extent: float, u: float, w: float) -> tuple[float, float]:
    """Start centre (fractions of the frame). Translations and pans start within the first 30% of
    the range that keeps the shape inside (seen from where they come from), so they cross at least
    70% of it before stopping (or, for pans, leaving); in-place motions stay near the middle."""
    low, high = extent, 1.0 - extent

    def along(direction: int) -> float:  # within the first 30% of the range, seen from the start
        frac = 0.3 * u
        return _uniform(frac if direction > 0 else 1.0 - frac, low, high)

    across = _uniform(_uniform(w, 0.2, 0.8), low, high)
    if motion in _STEPS:
        sx, sy = _STEPS[motion]
        return (along(sx), across) if sx else (across, along(sy))
    if motion in PANS:
        return along(_PAN_SIGN[motion]), across
    if motion == "bounce":
        return _uniform(u, low, high), _uniform(w, low, high)
    if motion == "stay":
        return _uniform(_uniform(u, 0.1, 0.9), low, high), _uniform(_uniform(w, 0.1, 0.9), low, high)
    return _uniform(u, 0.35, 0.65), _uniform(w, 0.35, 0.65)  # grow, shrink, rotate


def _check_start(start: str) -> None:
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")


def sample_params(rng: np.random.Generator, start: str = "by-motion") -> WorldParams:
    """One clip: uniform over :func:`combinations`, then uniform continuous fields.

    ``start="by-motion"`` (the first world): grow starts in 0.08-0.11, shrink in 0.13-0.16, the
    rest in :data:`SIZE_RANGE`, positions as :func:`_start_position`. ``start="independent"``:
    size in :data:`SIZE_RANGE` and centre in :data:`CENTRAL` whatever the motion (module
    docstring). Those two: speed uniform in :data:`SPEED_RANGE` (0 for ``stay``); bounce headings 20-70
    degrees off the axes. ``start="determined"``: the start frame of ``"independent"``, speed
    :data:`DEFAULT_SPEED` (0 for ``stay``), bounce heading :data:`DEFAULT_HEADING`. Continuous
    fields are quantised (x, y, size to 1e-3, speed to 1e-2, heading to 0.1 degree). All draw the
    same random numbers, so a seed gives the same scenes' motions and colours under every sampler.
    """
    _check_start(start)
    combos = combinations()
    u = rng.random(7).tolist()  # Python floats: fast scalar arithmetic and rounding
    combo = combos[min(int(u[0] * len(combos)), len(combos) - 1)]
    shape, color, background, background_color, motion = combo
    determined = start == "determined"
    speed = 0.0 if motion == "stay" else DEFAULT_SPEED if determined else round(_uniform(u[2], *SPEED_RANGE), 2)
    if start != "by-motion":
        size = round(_uniform(u[1], *SIZE_RANGE), 3)
        x, y = _uniform(u[3], *CENTRAL), _uniform(u[4], *CENTRAL)
    else:
        size_range = _GROW_SIZES if motion == "grow" else _SHRINK_SIZES if motion == "shrink" else SIZE_RANGE
        size = round(_uniform(u[1], *size_range), 3)
        x, y = _start_position(motion, _EXTENT[shape] * size, u[3], u[4])
    heading = 0.0
    if motion == "bounce":  # 20-70 degrees into one of the four quadrants, or the one heading
        heading = DEFAULT_HEADING if determined else round(_uniform(u[5], 20.0, 70.0) + 90.0 * min(int(u[6] * 4), 3), 1)
    return WorldParams(
        shape=shape,
        color=color,
        background=background,
        background_color=background_color,
        motion=motion,
        speed=speed,
        x=round(x, 3),
        y=round(y, 3),
        size=size,
        heading=heading,
    )


def start_frame_key(p: WorldParams) -> tuple:
    """The fields the start frame shows (at t = 0 every motion renders the same frame)."""
    return (p.shape, p.color, p.background, p.background_color, p.x, p.y, p.size)


def _hash(key: tuple) -> int:
    """Stable 64-bit hash of a tuple of canonical values (``__post_init__`` makes the floats canonical)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")


def _scene_hash(p: WorldParams, start: str) -> int:
    if start != "by-motion":  # "independent" and "determined" share their start frames and splits
        return _hash(start_frame_key(p))
    return _hash((p.shape, p.color, p.background, p.background_color, p.motion, p.speed, p.x, p.y, p.size, p.heading))


def is_held_out(p: WorldParams) -> bool:
    """Whether ``p`` is reserved for evaluation in the first (``"by-motion"``) world: hash bucket 0
    of :data:`HELD_OUT_MODULUS` over every field, validation and test together."""
    return _scene_hash(p, "by-motion") % HELD_OUT_MODULUS == 0


def split_of(p: WorldParams, start: str = "by-motion") -> str:
    """Which of :data:`SPLITS` ``p`` belongs to in the world of sampler ``start`` (module docstring)."""
    _check_start(start)
    h = _scene_hash(p, start)
    if h % HELD_OUT_MODULUS:
        return "train"
    return "validation" if (h // HELD_OUT_MODULUS) % 2 == 0 else "test"


def stream(seed: int, start: str = "by-motion") -> Iterator[WorldParams]:
    """Endless deterministic training stream of sampler ``start``; only ``train`` params
    (:func:`split_of`), so never a held-out one."""
    _check_start(start)
    rng = np.random.default_rng(seed)
    while True:
        p = sample_params(rng, start)
        if split_of(p, start) == "train":
            yield p


def held_out(n: int = 64, seed: int = 1_000_003) -> list[WorldParams]:
    """The first world's fixed evaluation set: ``n`` distinct ``"by-motion"`` params, all held out
    (:func:`is_held_out`: validation and test together), so disjoint from :func:`stream` for every
    seed. Kept as it was: the shipped demo model's published numbers were measured on it."""
    rng = np.random.default_rng(seed)
    chosen: dict[WorldParams, None] = {}
    draws = 0
    while len(chosen) < n:
        p = sample_params(rng)
        draws += 1
        if is_held_out(p):
            chosen[p] = None
    logger.debug("held_out: %d params from %d draws (seed %d)", n, draws, seed)
    return list(chosen)


def scenes(split: str, n: int, start: str = "independent", seed: int = 1_000_003) -> list[WorldParams]:
    """``n`` params of ``split`` from sampler ``start``, in a fixed order, with distinct start
    frames (:func:`start_frame_key`), so that a start frame is never evaluated twice."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_start(start)
    rng = np.random.default_rng(seed)
    chosen: dict[tuple, WorldParams] = {}
    while len(chosen) < n:
        p = sample_params(rng, start)
        if split_of(p, start) == split:
            chosen.setdefault(start_frame_key(p), p)
    return list(chosen.values())


def applicable_motions(p: WorldParams) -> tuple[str, ...]:
    """The motions the world can show from ``p``'s start frame (rotate needs a non-circle, pans stripes)."""
    return tuple(m for m in MOTIONS if _combination_problem(p.shape, p.color, p.background, p.background_color, m) is None)


def with_motion(p: WorldParams, motion: str) -> WorldParams:
    """The scene with ``p``'s start frame doing ``motion`` instead: ``p``'s speed
    (:data:`DEFAULT_SPEED` if ``p`` stays), 0 for ``stay``, ``p``'s heading for a bounce if it
    bounces (else :data:`DEFAULT_HEADING`). Renders the same frame at t = 0; keeps a
    ``"determined"`` scene in its world."""
    speed = 0.0 if motion == "stay" else (p.speed or DEFAULT_SPEED)
    heading = p.heading if p.motion == "bounce" else (DEFAULT_HEADING if motion == "bounce" else 0.0)
    return replace(p, motion=motion, speed=speed, heading=heading)


# --------------------------------------------------------------------------------------------
# Evaluation helpers


def colour_mask(frames: np.ndarray, rgb: RGB, tol: int = 60) -> np.ndarray:
    """Pixels within ``tol`` of ``rgb`` in every channel (Chebyshev distance): (T, H, W) bool."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {frames.shape}")
    diff = np.abs(frames.astype(np.int16) - np.asarray(rgb, dtype=np.int16))
    return diff.max(axis=-1) <= tol


def track_colour(frames: np.ndarray, rgb: RGB, tol: int = 60) -> np.ndarray:
    """Centroid (x, y) in pixels (pixel centres at +0.5) of the pixels near ``rgb``, per frame:
    (T, 2) float64, NaN where no pixel matches."""
    mask = colour_mask(frames, rgb, tol)
    counts = mask.sum(axis=(1, 2)).astype(np.float64)
    xs = np.arange(mask.shape[2], dtype=np.float64) + 0.5
    ys = np.arange(mask.shape[1], dtype=np.float64) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = mask.sum(axis=1) @ xs / counts
        cy = mask.sum(axis=2) @ ys / counts
    track = np.stack([cx, cy], axis=1)
    track[counts == 0] = np.nan
    return track


def motion_direction(track: np.ndarray, threshold: float = DIRECTION_THRESHOLD) -> str:
    """Direction of a (T, 2) track: "left", "right", "up", "down" (y down) or "still".

    From the net displacement between the first and last tracked (non-NaN) points: "still" below
    ``threshold`` px, else the dominant axis."""
    track = np.asarray(track, dtype=np.float64)
    valid = track[~np.isnan(track).any(axis=1)]
    if len(valid) < 2:
        return "still"
    dx, dy = valid[-1] - valid[0]
    if math.hypot(dx, dy) < threshold:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def expected_direction(p: WorldParams) -> str | None:
    """What :func:`motion_direction` should report for a clip of at least ~1 s from t = 0: the
    object's direction in the frame (a pan moves it the other way), "still" for in-place motions,
    None for ``bounce`` (no single direction)."""
    if p.motion in _STEPS:
        return p.motion
    if p.motion in PANS:
        return "right" if _PAN_SIGN[p.motion] > 0 else "left"
    return None if p.motion == "bounce" else "still"
