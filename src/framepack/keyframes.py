"""Keyframes: images the video passes through at given times (``--keyframe TIME:IMAGE``).

Pure and light (no torch): the settings check keyframes with it before any job exists, and the
pipeline turns them into per-section overrides of the plans.

How a keyframe steers the video (inverted mode only). Sections are made back to front, and each
one's nearest context slot after its window holds the first latent of the section made just
before it, the one that follows it in time; on the last section of the video that slot holds the
end image (when there is one). A keyframe at a section boundary puts its own latent in that slot
of the section that *ends* there, so that section arrives at the keyframe exactly as the last
section arrives at an end image. For models with an image encoder, the keyframe's embedding is
also averaged with the start image's for the two sections that meet at the boundary.

Times are snapped to section boundaries (1.2 s apart with the default window): a slot holds a
whole latent after a whole window, so no other time has a slot. Forward (F1) and vanilla modes
are refused: their sections see only the past, and the released F1 model was never trained with
a future frame in its context, so there is no slot to put a keyframe in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .planning import FPS, TEMPORAL_RATIO, KeyframeSource, LevelPlan, SectionPlan, video_seconds

MAX_KEYFRAMES = 64  # more than a 120 s video has section boundaries (100)


class Keyframe(NamedTuple):
    """An image the video should show at ``seconds`` (snapped to a section boundary)."""

    seconds: float
    image: str


@dataclass(frozen=True)
class Anchor:
    """A keyframe placed at a section boundary."""

    index: int  # the keyframe's index in the settings' keyframes
    asked: float  # seconds, as given
    position: int  # the latent the boundary ends on: the last of the section that ends there
    seconds: float  # the boundary's time: that latent's last frame

    @property
    def frame(self) -> int:
        """The video frame at the boundary (the one compared with the keyframe image)."""
        return TEMPORAL_RATIO * self.position


@dataclass(frozen=True)
class SectionOverride:
    """What keyframes change in one section (generation order)."""

    step: int
    future: int | None  # keyframe index whose latent fills the section's nearest-future slot
    blend: tuple[int, ...]  # keyframe indices whose image embeddings are averaged into the section's


def parse_keyframe_option(text: str) -> Keyframe:
    """``"2.4:key.png"`` or ``"2.4s:key.png"`` -> Keyframe(2.4, "key.png"); ValueError with one line."""
    time_text, sep, image = text.partition(":")
    if not sep or not image.strip():
        raise ValueError(f"expected TIME:IMAGE (e.g. 2.4:key.png), got {text!r}")
    try:
        seconds = float(time_text.strip().removesuffix("s"))
    except ValueError:
        raise ValueError(f"the time of keyframe {text!r} is not a number of seconds") from None
    return Keyframe(seconds, image.strip())


def keyframe_tuple(entries: Any) -> tuple[Keyframe, ...]:
    """Stored keyframes ({"seconds", "image"} or [seconds, image]) -> Keyframe tuples."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"keyframes must be a list, got {entries!r}")  # noqa: TRY004 (one-line user errors are ValueErrors)
    keyframes = []
    for entry in entries:
        try:
            keyframes.append(Keyframe(**entry) if isinstance(entry, dict) else Keyframe(*entry))
        except TypeError:
            raise ValueError(f"not a keyframe (seconds and image): {entry!r}") from None
    return tuple(keyframes)


def boundaries(sections: int, window: int) -> list[int]:
    """Latent positions a keyframe can sit on: the last latent of every section, in time order."""
    return [window * k for k in range(1, sections + 1)]


def _seconds_at(position: int, fps: int) -> float:
    return TEMPORAL_RATIO * position / fps


def snap_keyframes(times: Sequence[float], sections: int, window: int, fps: int = FPS) -> list[Anchor]:
    """Each keyframe time at its nearest section boundary, in the given order.

    ValueError (one line) for a time that is not a number, at or before the start (the start image
    is the first frame), after the video's end, or two keyframes on the same boundary.
    """
    if len(times) > MAX_KEYFRAMES:
        raise ValueError(f"at most {MAX_KEYFRAMES} keyframes, got {len(times)}")
    length = video_seconds(sections, window, fps)
    spots = boundaries(sections, window)
    anchors: list[Anchor] = []
    for index, asked in enumerate(times):
        if isinstance(asked, bool) or not isinstance(asked, (int, float)) or math.isnan(asked):
            raise ValueError(f"keyframe {index + 1}: the time must be a number of seconds, got {asked!r}")
        if not 0 < asked <= length:
            raise ValueError(f"keyframe at {asked:g} s is outside the {length:.2f} s video (times must be > 0; "
                             "the start image is the frame at 0 s)")
        position = min(spots, key=lambda p: abs(_seconds_at(p, fps) - asked))
        taken = next((a for a in anchors if a.position == position), None)
        if taken is not None:
            raise ValueError(f"keyframes at {taken.asked:g} s and {asked:g} s both snap to the section boundary at "
                             f"{_seconds_at(position, fps):.2f} s; keep one, or move one by a section "
                             f"({_seconds_at(window, fps):.2f} s)")
        anchors.append(Anchor(index, float(asked), position, _seconds_at(position, fps)))
    return anchors


def snapped(anchors: Sequence[Anchor], tolerance: float = 0.005) -> list[Anchor]:
    """The anchors whose boundary is not the time asked (worth a warning)."""
    return [a for a in anchors if abs(a.seconds - a.asked) > tolerance]


def section_overrides(anchors: Sequence[Anchor], plans: Sequence[SectionPlan]) -> list[SectionOverride]:
    """Per section (generation order): the keyframe in its nearest-future slot, and the keyframes
    whose embeddings are blended into it (those at either end of the section)."""
    if anchors and plans and plans[0].mode != "inverted":
        raise ValueError(f"keyframes need mode 'inverted' (sections made back to front, so a keyframe can fill a "
                         f"section's future); mode {plans[0].mode!r} sees only the past and has no slot for one")
    by_end = {a.position: a.index for a in anchors}
    by_start = {a.position + 1: a.index for a in anchors}
    overrides = []
    for plan in plans:
        future = by_end.get(plan.positions[-1])
        touching = (future, by_start.get(plan.positions[0]))
        overrides.append(SectionOverride(plan.step, future, tuple(sorted(i for i in touching if i is not None))))
    return overrides


def with_keyframes(plans: Sequence[SectionPlan], overrides: Sequence[SectionOverride]) -> list[SectionPlan]:
    """The plans with each keyframe in its section's nearest-future slot (the nearest level's first
    slot after the start anchor, where the end image goes on the last section)."""
    result = []
    for plan, override in zip(plans, overrides, strict=True):
        if override.future is None:
            result.append(plan)
            continue
        nearest = plan.levels[0]
        sources = list(nearest.sources)
        sources[1] = KeyframeSource(override.future)  # [start, nearest future, ...]
        levels = (LevelPlan(nearest.kernel, nearest.indices, tuple(sources)), *plan.levels[1:])
        result.append(SectionPlan(plan.step, plan.count, plan.mode, plan.positions, plan.window_indices, levels,
                                  plan.padding))
    return result


def keyframe_problem(keyframes: Sequence[Keyframe], sections: int, window: int, end_image: bool) -> str | None:
    """The first problem of a settings' keyframes, as one line; None if there is none."""
    for keyframe in keyframes:
        if not isinstance(keyframe.image, str) or not keyframe.image.strip():
            return f"keyframe at {keyframe.seconds!r} s needs an image"
    try:
        anchors = snap_keyframes([k.seconds for k in keyframes], sections, window)
    except ValueError as exc:
        return str(exc)
    last = boundaries(sections, window)[-1]
    if end_image and any(a.position == last for a in anchors):
        return "a keyframe at the video's end and an end image both set the last frame: give one of them"
    return None


def overrides_for(keyframes: Sequence[Keyframe], plans: Sequence[SectionPlan]) -> list[SectionOverride]:
    """:func:`section_overrides` for a video's keyframes (snapped to its plans' boundaries)."""
    if not plans:
        return []
    anchors = snap_keyframes([k.seconds for k in keyframes], plans[0].count, len(plans[0].positions))
    return section_overrides(anchors, plans)


def find_recorded_keyframes(video: Path, recorded: Any) -> tuple[Keyframe, ...]:
    """The keyframes a framepack mp4 records (images by file name), found again beside the video or
    in the current directory, as its start image is (``generate --from``); one line if one is missing."""
    from .video import _find_input  # the start image's own search, so both say the same

    return tuple(Keyframe(k.seconds, str(_find_input(video, "keyframe", k.image))) for k in keyframe_tuple(recorded))
