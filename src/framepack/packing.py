"""Context schedules: which history frames enter the transformer, and at what resolution.

FramePack (Zhang & Agrawala, arXiv 2504.12626, section 3) gives each history frame fewer tokens
the older it is, by patchifying it with a larger kernel. A schedule is plain data: a list of
levels, nearest first, each "N frames through kernel kR". The paper writes it as a string, e.g.
``f1k1f2k2f16k4`` for the released models: the nearest frame at kernel k1 = (1, 2, 2), the next two
at k2 = (2, 4, 4), the next sixteen at k4 = (4, 8, 8); older frames are deleted ("td").

Kernel kR is (R, 2R, 2R) in (t, h, w) latent units: rate R in every axis on top of the (1, 2, 2)
patch of the noisy window, so a level costs ``1 / R^3`` of the tokens of the same frames at k1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

Kernel = tuple[int, int, int]

_LEVEL = re.compile(r"f(\d+)k(\d+)")


def kernel_for_rate(rate: int) -> Kernel:
    """Patchify kernel (t, h, w) of compression rate R: (R, 2R, 2R)."""
    if rate < 1:
        raise ValueError(f"kernel rate must be >= 1, got {rate}")
    return (rate, 2 * rate, 2 * rate)


def rate_of_kernel(kernel: Kernel) -> int:
    """Inverse of :func:`kernel_for_rate`; raises for kernels outside the (R, 2R, 2R) family."""
    rate = kernel[0]
    if rate < 1 or tuple(kernel) != kernel_for_rate(rate):
        raise ValueError(f"kernel {tuple(kernel)} is not of the form (R, 2R, 2R)")
    return rate


def tokens_for(frames: int, latent_height: int, latent_width: int, kernel: Kernel) -> int:
    """Tokens that ``frames`` latents of size (h, w) produce through ``kernel``.

    Inputs are replicate-padded up to a multiple of the kernel before the strided conv, so each
    axis rounds up.
    """
    kt, kh, kw = kernel
    if frames <= 0:
        return 0
    return math.ceil(frames / kt) * math.ceil(latent_height / kh) * math.ceil(latent_width / kw)


@dataclass(frozen=True)
class ContextLevel:
    """``frames`` consecutive history latents patchified with ``kernel``."""

    frames: int
    kernel: Kernel

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"a context level needs at least one frame, got {self.frames}")
        rate_of_kernel(self.kernel)

    @property
    def rate(self) -> int:
        return self.kernel[0]

    def __str__(self) -> str:
        return f"f{self.frames}k{self.rate}"


@dataclass(frozen=True)
class ContextSchedule:
    """History levels, nearest frame first. Frames beyond the last level are deleted."""

    levels: tuple[ContextLevel, ...]

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("a context schedule needs at least one level")
        rates = [level.rate for level in self.levels]
        if rates != sorted(rates):
            # Older frames must never get more tokens than newer ones; that is the whole idea.
            raise ValueError(f"context levels must be ordered by non-decreasing rate, got {self}")

    @classmethod
    def parse(cls, notation: str) -> "ContextSchedule":
        """Parse the paper's notation, e.g. ``"f1k1f2k2f16k4"`` (a trailing ``_td`` is accepted)."""
        text = notation.strip()
        if text.endswith("_td"):
            text = text[: -len("_td")]
        levels = []
        pos = 0
        for match in _LEVEL.finditer(text):
            if match.start() != pos:
                break
            levels.append(ContextLevel(int(match.group(1)), kernel_for_rate(int(match.group(2)))))
            pos = match.end()
        if pos != len(text) or not levels:
            raise ValueError(
                f"cannot parse context schedule {notation!r}: expected levels like 'f1k1f2k2f16k4'"
            )
        return cls(tuple(levels))

    def __str__(self) -> str:
        return "".join(str(level) for level in self.levels)

    @property
    def frames(self) -> int:
        """History latents the schedule keeps (19 for the released models)."""
        return sum(level.frames for level in self.levels)

    @property
    def kernels(self) -> tuple[Kernel, ...]:
        return tuple(level.kernel for level in self.levels)

    def split(self, history_frames: int) -> list[tuple[int, int]]:
        """(start, stop) slice of a nearest-first history for each level.

        With a shorter history the farther levels get fewer (or zero) frames.
        """
        slices = []
        start = 0
        for level in self.levels:
            stop = min(start + level.frames, history_frames)
            slices.append((min(start, stop), stop))
            start += level.frames
        return slices

    def level_tokens(self, latent_height: int, latent_width: int, history_frames: int | None = None) -> list[int]:
        """Tokens per level for latents of size (h, w); ``history_frames`` defaults to full."""
        n = self.frames if history_frames is None else history_frames
        return [
            tokens_for(stop - start, latent_height, latent_width, level.kernel)
            for level, (start, stop) in zip(self.levels, self.split(n))
        ]


@dataclass(frozen=True)
class ContextBudget:
    """Token accounting of one forward pass."""

    noisy: int
    anchors: int
    levels: tuple[int, ...]

    @property
    def history(self) -> int:
        return sum(self.levels)

    @property
    def total(self) -> int:
        return self.noisy + self.anchors + self.history


def context_budget(
    schedule: ContextSchedule,
    latent_height: int,
    latent_width: int,
    window: int = 9,
    anchors: int = 1,
    history_frames: int | None = None,
    patch: Kernel = (1, 2, 2),
) -> ContextBudget:
    """Tokens of the noisy window, of anchor frames (the start image, at k1) and of each level.

    ``history_frames`` is how many history latents exist so far (None = the schedule is full);
    with tail deletion the result never exceeds :func:`context_bound`.
    """
    return ContextBudget(
        noisy=tokens_for(window, latent_height, latent_width, patch),
        anchors=tokens_for(anchors, latent_height, latent_width, patch) if anchors else 0,
        levels=tuple(schedule.level_tokens(latent_height, latent_width, history_frames)),
    )


def context_bound(
    schedule: ContextSchedule,
    latent_height: int,
    latent_width: int,
    window: int = 9,
    anchors: int = 1,
    patch: Kernel = (1, 2, 2),
) -> int:
    """Upper bound on the image-stream context length for any history length.

    Per level, ``ceil(F / kt) * ceil(h / kh) * ceil(w / kw)`` is monotone in the number of frames
    F, so a full schedule is the worst case. For the paper's geometric schedules this is below
    ``(S + lambda / (lambda - 1)) * L_f`` with S the window and L_f the tokens of one k1 frame.
    """
    return context_budget(schedule, latent_height, latent_width, window, anchors, None, patch).total


RELEASED_SCHEDULE = ContextSchedule.parse("f1k1f2k2f16k4")
"""History schedule of ``FramePackI2V_HY`` and ``FramePack_F1_I2V_HY_20250503``."""
