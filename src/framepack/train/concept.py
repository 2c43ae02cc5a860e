"""A concept the demo world lacks, for the LoRA proof (issue 19.5): an object that *blinks*.

In the world (:mod:`framepack.train.world`) the object is always in view: it moves, grows, shrinks,
rotates or stays, and only a camera pan carries it out of the frame, for good. A blinking object
vanishes in place (the background shows where it was) and comes back, again and again: the world
has no motion like it, and the demo model's vocabulary has no word for it ("blinks").

Timing. The object is visible for :data:`ON_FRAMES` frames after the start frame, hidden for
:data:`OFF_FRAMES`, and so on. Both are multiples of the VAE's 4 frames per latent and the first
frame has a latent of its own, so each latent is wholly on or off (no half-faded latent for the VAE
to blur): a 1.2 s video (37 frames, one section of the demo model) shows visible, hidden, visible.

The detector (:func:`detect_blink`) reads only decoded frames and the object's colour (which the
start frame shows): the object's tracked area per frame (:func:`yardstick.object_masks`, the colour
mask opened so that noise does not count), as a share of the start frame's. It fires where the area
falls to at most :data:`HIDDEN_SHARE` for :data:`HIDDEN_FRAMES` frames in a row and then comes back
to at least :data:`BACK_SHARE`: the object went away in view and returned, which no motion of the
world does (a pan takes it out of the frame and never back).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from . import world, yardstick

ON_FRAMES: Final = 12  # frames visible after the start frame (3 latents)
OFF_FRAMES: Final = 12  # frames hidden (3 latents)
HIDDEN_SHARE: Final = 0.2  # tracked area at most this share of the start frame's: hidden
HIDDEN_FRAMES: Final = 4  # consecutive hidden frames (one latent) needed: a one-frame dropout is not a blink
BACK_SHARE: Final = 0.5  # tracked area at least this share of the start frame's after hiding: back
VERB: Final = "blinks"


def visibility(frames: int, start: int = 0) -> np.ndarray:
    """Whether the object shows in frames ``start .. start + frames - 1``: (frames,) bool.
    Frame 0 (the start frame) shows it; then runs of ON_FRAMES shown, OFF_FRAMES hidden."""
    index = np.arange(start, start + frames)
    phase = np.maximum(index - 1, 0) % (ON_FRAMES + OFF_FRAMES)
    return (index == 0) | (phase < ON_FRAMES)


def blinking(p: world.WorldParams) -> world.WorldParams:
    """The scene of ``p``'s start frame, standing still: the object blinks in place."""
    return world.with_motion(p, "stay")


def render(p: world.WorldParams, frames: int, size: int = world.SIZE, start: int = 0) -> np.ndarray:
    """Frames (frames, size, size, 3) uint8 of ``p``'s object blinking in place (``p``'s motion is
    ignored): the world's own background and anti-aliased object, the object drawn where
    :func:`visibility` says so."""
    still = blinking(p)
    background = world.background(still, frames, size=size, start=start)
    coverage = world.object_coverage(still, frames, size=size, start=start) * visibility(frames, start)[:, None, None]
    colour = np.asarray(world.PALETTE[p.color], dtype=np.float32)
    out = background + coverage[..., None] * (colour - background)
    return np.rint(out).clip(0, 255).astype(np.uint8)


def caption(p: world.WorldParams) -> str:
    """The world's caption grammar with the new verb: "a red square blinks on a plain gray background"."""
    still = world.caption(blinking(p))
    return still.replace("stays still", VERB, 1)


@dataclass(frozen=True)
class Detection:
    """The detector's answer. ``hidden``: the smallest tracked area over HIDDEN_FRAMES frames in a
    row, as a share of the start frame's; ``back``: the largest share after that run; ``score``:
    ``back - hidden`` (1 for a clean blink, <= 0 where the object never left)."""

    detected: bool
    hidden: float
    back: float

    @property
    def score(self) -> float:
        return self.back - self.hidden


def area_shares(frames: np.ndarray, rgb: world.RGB) -> np.ndarray:
    """The tracked object's area per frame as a share of the first frame's: (T,) float64 (zeros
    where the first frame shows no object of that colour)."""
    areas = yardstick.object_masks(np.asarray(frames), rgb).sum(axis=(1, 2)).astype(np.float64)
    return areas / areas[0] if areas[0] > 0 else np.zeros_like(areas)


def detect_blink(frames: np.ndarray, rgb: world.RGB) -> Detection:
    """Does the object of colour ``rgb`` (visible in the first frame) blink in ``frames`` (T, H, W, 3)
    uint8? See the module docstring. Of the runs of HIDDEN_FRAMES frames after the start frame,
    the one with the best score (``back - hidden``) is reported."""
    shares = area_shares(frames, rgb)
    if len(shares) < HIDDEN_FRAMES + 2 or shares[0] == 0:
        return Detection(False, 1.0, 0.0)
    runs = np.lib.stride_tricks.sliding_window_view(shares[1:], HIDDEN_FRAMES).max(axis=1)  # a run's largest frame
    # back[i]: the largest share after run i (0 after the last run), capped at the start frame's.
    later = np.append(np.maximum.accumulate(shares[::-1])[::-1], 0.0)
    back = np.minimum(later[1 + np.arange(len(runs)) + HIDDEN_FRAMES], 1.0)
    best = int(np.argmax(back - runs))
    return Detection(bool(runs[best] <= HIDDEN_SHARE and back[best] >= BACK_SHARE), float(runs[best]), float(back[best]))
