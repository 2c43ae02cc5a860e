"""Section planning: which latents each section makes, and what fills its packed context.

Pure and typed: a plan is data, computed before any model runs, and tested on its own. Video
latent positions run 0..9N (position 0 is the start image); a section writes ``window`` of them.
Each context slot names its source: the start latent, the end latent, an already generated video
position, or zeros (nothing there yet). RoPE indices are separate from video positions: the
inverted layout leaves a gap of blank indices ("random access" in time), as the released model
was trained.

Modes (Zhang & Agrawala, section 4; the released demos):

- ``inverted``: anti-drifting, inverted order (``FramePackI2V_HY``). Sections are made back to
  front; every section sees the start frame and the already-made future, so each one approaches
  the user's image. RoPE layout ``[start | P blank | window | post | 2x | 4x ...]``.
- ``forward``: causal order with the start frame as anchor (F1, ``FramePack_F1_I2V_HY``).
  RoPE layout ``[start | ... 4x | 2x | 1x | window]``.
- ``vanilla``: causal order on recent history only, no anchor: the paper's baseline that drifts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .packing import RELEASED_SCHEDULE, ContextSchedule, Kernel

Mode = Literal["inverted", "forward", "vanilla"]
MODES: tuple[Mode, ...] = ("inverted", "forward", "vanilla")

START: Literal["start"] = "start"
END: Literal["end"] = "end"
ZERO = None


@dataclass(frozen=True)
class KeyframeSource:
    """A keyframe image's latent (framepack.keyframes puts it in a section's nearest-future slot)."""

    index: int  # in the settings' keyframes


Source = int | Literal["start", "end"] | KeyframeSource | None
"""A video latent position, the start or end image latent, a keyframe's latent, or None for zeros."""

FPS = 30
TEMPORAL_RATIO = 4  # the causal VAE: latent 0 -> frame 0, latent k >= 1 -> frames 4k-3 .. 4k
DEFAULT_WINDOW = 9
MAX_INVERTED_PADDING = 3  # the reference caps the blank gap for videos of more than 4 sections


@dataclass(frozen=True)
class LevelPlan:
    """One packed context level: kernel, the RoPE index and the source of every latent in it."""

    kernel: Kernel
    indices: tuple[int, ...]
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class SectionPlan:
    step: int  # generation order, 0-based
    count: int  # sections in the video
    mode: Mode
    positions: tuple[int, ...]  # video latent positions this section writes
    window_indices: tuple[int, ...]  # RoPE time index of each of them
    levels: tuple[LevelPlan, ...]  # nearest level first; the first holds the start anchor
    padding: int = 0  # blank RoPE frames between start and window (inverted only)

    @property
    def is_last(self) -> bool:
        return self.step == self.count - 1

    def context_sources(self) -> list[Source]:
        return [s for level in self.levels for s in level.sources]


def decode_span(plan: SectionPlan) -> tuple[int, ...]:
    """Video positions to decode for a section: its own latents plus the neighbouring window
    the overlap blend needs (already made), in time order.

    Inverted: the window right after it (made one step earlier), and the start latent in front
    on the last section. Causal modes: the window before it (the start latent at first).
    """
    window = len(plan.positions)
    first, last = plan.positions[0], plan.positions[-1]
    if plan.mode == "inverted":
        after = tuple(range(last + 1, last + 1 + window)) if plan.step > 0 else ()
        return ((0,) if plan.is_last else ()) + plan.positions + after
    before = tuple(range(max(0, first - window), first))
    return before + plan.positions


def section_count(seconds: float, window: int = DEFAULT_WINDOW, fps: int = FPS) -> int:
    """Sections for a video length, as the reference counts them (Python's round, at least 1)."""
    return max(round(seconds * fps / (window * TEMPORAL_RATIO)), 1)


def latent_count(sections: int, window: int = DEFAULT_WINDOW) -> int:
    return sections * window + 1


def frame_count(latents: int) -> int:
    """Pixel frames decoded from ``latents`` by the 4x causal VAE."""
    return (latents - 1) * TEMPORAL_RATIO + 1


def video_seconds(sections: int, window: int = DEFAULT_WINDOW, fps: int = FPS) -> float:
    """The length a video of ``sections`` sections really has: its frame count over the frame rate."""
    return frame_count(latent_count(sections, window)) / fps


def real_seconds(seconds: float, window: int = DEFAULT_WINDOW, fps: int = FPS) -> float:
    """What asking for ``seconds`` makes: sections come in whole windows, so 5 s makes 4.83 s."""
    return video_seconds(section_count(seconds, window, fps), window, fps)


def inverted_paddings(sections: int, max_padding: int | None = None) -> list[int]:
    """Blank-gap sizes (in windows) per section, in generation order.

    ``max_padding`` None: the released models' layout. ``max_padding`` P: each section's true
    distance from the start frame, capped at P, for a model trained that way
    (:attr:`framepack.config.TransformerConfig.max_inverted_padding`)."""
    distances = list(reversed(range(sections)))
    if max_padding is not None:
        return [min(d, max_padding) for d in distances]
    if sections > 4:
        # long videos: keep the gap small, so RoPE distances stay within what training saw
        return [MAX_INVERTED_PADDING] + [2] * (sections - 3) + [1, 0]
    return distances


def plan_sections(
    sections: int,
    mode: Mode = "inverted",
    schedule: ContextSchedule = RELEASED_SCHEDULE,
    window: int = DEFAULT_WINDOW,
    end_image: bool = False,
    max_padding: int | None = None,
) -> list[SectionPlan]:
    """One plan per section, in generation order; ``max_padding`` sets inverted gaps
    (:func:`inverted_paddings`)."""
    if sections < 1:
        raise ValueError(f"sections must be >= 1, got {sections}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if max_padding is not None and max_padding < 0:
        raise ValueError(f"max_padding must be >= 0, got {max_padding}")
    if end_image and mode != "inverted":
        raise ValueError(f"an end image needs mode 'inverted' (sections made back to front), not {mode!r}")
    if mode == "inverted":
        paddings = inverted_paddings(sections, max_padding)
        return [_inverted(step, sections, schedule, window, end_image, paddings[step]) for step in range(sections)]
    return [_causal(step, sections, schedule, window, anchor=mode == "forward", mode=mode) for step in range(sections)]


def _existing(position: int, last: int) -> Source:
    return position if 0 <= position <= last else ZERO


def _inverted(step: int, count: int, schedule: ContextSchedule, window: int, end_image: bool,
              padding: int) -> SectionPlan:
    last = latent_count(count, window) - 1
    first_pos = 1 + window * (count - 1 - step)  # sections are made back to front
    positions = tuple(range(first_pos, first_pos + window))
    start_window = 1 + padding * window  # index 0 is the start frame, then the blank gap
    window_indices = tuple(range(start_window, start_window + window))
    # history, nearest first: the video positions right after this window
    after = positions[-1] + 1
    next_index = window_indices[-1] + 1
    levels = []
    for i, (level, (lo, hi)) in enumerate(zip(schedule.levels, schedule.split(schedule.frames))):
        sources: list[Source] = [_existing(after + k, last) for k in range(lo, hi)]
        if i == 0 and end_image and step == 0:
            sources[0] = END  # the end frame stands in for the not-yet-existing future
        indices = list(range(next_index + lo, next_index + hi))
        if i == 0:
            sources, indices = [START, *sources], [0, *indices]
        levels.append(LevelPlan(level.kernel, tuple(indices), tuple(sources)))
    return SectionPlan(step, count, "inverted", positions, window_indices, tuple(levels), padding)


def _causal(step: int, count: int, schedule: ContextSchedule, window: int, anchor: bool, mode: Mode) -> SectionPlan:
    first_pos = 1 + window * step
    positions = tuple(range(first_pos, first_pos + window))
    nearest = first_pos - 1  # the latest latent already made (the start image at first)
    offset = 1 if anchor else 0
    total = schedule.frames
    levels = []
    for i, (level, (lo, hi)) in enumerate(zip(schedule.levels, schedule.split(total))):
        # nearest-first slots lo..hi-1 sit at RoPE indices counted back from the window
        sources = [_existing(nearest - k, nearest) for k in reversed(range(lo, hi))]
        indices = [offset + total - 1 - k for k in reversed(range(lo, hi))]
        if i == 0 and anchor:
            sources, indices = [START, *sources], [0, *indices]
        levels.append(LevelPlan(level.kernel, tuple(indices), tuple(sources)))
    start_window = offset + total
    window_indices = tuple(range(start_window, start_window + window))
    return SectionPlan(step, count, mode, positions, window_indices, tuple(levels))


# ---- the prompt timeline ------------------------------------------------------------------------------

_SEGMENT = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*s?\s*-\s*(\d+(?:\.\d+)?)\s*s?\s*:\s*([^\[\]]*?)\s*\]")


@dataclass(frozen=True)
class TimedPrompt:
    start: float  # seconds
    end: float
    text: str


def parse_timeline(text: str) -> list[TimedPrompt]:
    """``"[0s-2s: a cat sits] [2s-5s: the cat jumps]"`` -> timed prompts; plain text -> one prompt.

    Segments must be in order and must not overlap; text outside the brackets is an error.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("the prompt is empty")
    if "[" not in stripped and "]" not in stripped:
        return [TimedPrompt(0.0, float("inf"), stripped)]
    segments: list[TimedPrompt] = []
    pos = 0
    for match in _SEGMENT.finditer(stripped):
        between = stripped[pos : match.start()].strip()
        if between:
            raise ValueError(f"malformed prompt timeline: unexpected text {between!r} outside [start-end: prompt] segments")
        start, end, prompt = float(match.group(1)), float(match.group(2)), match.group(3)
        if end <= start:
            raise ValueError(f"malformed prompt timeline: segment [{match.group(1)}s-{match.group(2)}s] ends before it starts")
        if not prompt:
            raise ValueError(f"malformed prompt timeline: segment [{match.group(1)}s-{match.group(2)}s] has no prompt")
        if segments and start < segments[-1].end:
            raise ValueError(f"malformed prompt timeline: segment at {start:g}s overlaps the previous one")
        segments.append(TimedPrompt(start, end, prompt))
        pos = match.end()
    rest = stripped[pos:].strip()
    if rest or not segments:
        raise ValueError(
            f"malformed prompt timeline near {rest or stripped!r}: expected segments like '[0s-2s: a cat sits]'"
        )
    return segments


def section_seconds(plan: SectionPlan, fps: int = FPS) -> tuple[float, float]:
    """Time span (seconds) of the frames a section writes: latent k >= 1 holds frames 4k-3 .. 4k."""
    first, last = plan.positions[0], plan.positions[-1]
    return (TEMPORAL_RATIO * first - (TEMPORAL_RATIO - 1)) / fps, TEMPORAL_RATIO * last / fps


def prompts_for_sections(timeline: list[TimedPrompt] | list[str], plans: list[SectionPlan], fps: int = FPS) -> list[str]:
    """The prompt of each section (in generation order).

    A list of strings gives one prompt per section in video order (or one for all). Timed prompts
    are matched by the section's midpoint; before the first segment the first prompt holds,
    in a gap or after the last segment the previous one holds.
    """
    by_time = sorted(plans, key=lambda p: p.positions[0])
    if timeline and isinstance(timeline[0], str):
        texts = list(timeline)  # type: ignore[arg-type]
        if len(texts) == 1:
            texts = texts * len(plans)
        if len(texts) != len(plans):
            raise ValueError(f"got {len(texts)} section prompts for {len(plans)} sections")
        chosen = {p.step: t for p, t in zip(by_time, texts)}
        return [chosen[p.step] for p in plans]
    segments: list[TimedPrompt] = timeline  # type: ignore[assignment]
    result = {}
    for plan in plans:
        lo, hi = section_seconds(plan, fps)
        mid = (lo + hi) / 2
        current = segments[0].text
        for seg in segments:
            if seg.start <= mid:
                current = seg.text
        result[plan.step] = current
    return [result[p.step] for p in plans]
