"""Generation settings: one frozen, validated record of everything that defines a video.

The same record is written to the job directory, embedded in the mp4, and read back by
``framepack generate --from VIDEO.mp4`` and ``--resume JOB_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from .keyframes import Keyframe, keyframe_problem, keyframe_tuple
from .planning import MODES, parse_timeline, real_seconds, section_count

# Light on purpose: the CLI reads DEFAULT_SEED for its help, which must not import torch
# (framepack.sampling does; its SAMPLERS are looked up only when settings are checked).

MAX_SECONDS = 120.0  # the reference UI's limit; memory and time per section are flat, patience is not
MAX_STEPS = 200
DEFAULT_SEED = 31337
MAX_LORAS = 16


class LoraChoice(NamedTuple):
    """A LoRA fused for a video (framepack.lora): the file, its scale, its sha256 prefix (so a
    resumed job or ``--from VIDEO`` uses the same file, and a changed one is refused)."""

    path: str
    scale: float = 1.0
    sha256: str | None = None


@dataclass(frozen=True)
class GenerationSettings:
    image: str | None  # start image path (copied into the job directory); None: text-to-video (or --extend's frame)
    prompt: str  # a prompt, or a timeline "[0s-2s: ...] [2s-5s: ...]"
    model: str = "tiny"
    end_image: str | None = None
    section_prompts: tuple[str, ...] | None = None  # one per section, in video order
    negative_prompt: str = ""
    seconds: float = 5.0
    seed: int = DEFAULT_SEED
    steps: int = 25
    sampler: str = "unipc"
    distilled_guidance: float = 10.0
    cfg: float | None = None  # real classifier-free guidance; 1 = off (one forward per step); None: the model's own
    guidance_rescale: float = 0.0
    shift: float | None = None  # None: the model's own (its manifest), else from the noisy token count
    mode: str | None = None  # None: the model's own mode
    resolution: int | None = None  # None: the model's own (640 for the 13B models)
    window: int = 9  # latent frames per section
    crf: int = 16
    cache: str = "none"  # step cache, e.g. "teacache:0.15" or "model" (framepack.cache); absent in older videos
    loras: tuple[LoraChoice, ...] = ()  # fused LoRAs, in order (framepack.lora); absent in older videos
    extend: str | None = None  # a video this one continues (framepack.extend); copied into the job directory
    extend_sha256: str | None = None  # that video's, so a resume with another file is refused
    keyframes: tuple[Keyframe, ...] = ()  # (seconds, image) the video passes through (framepack.keyframes)
    color_match: str = "none"  # each section's colours matched to the start frame (framepack.color_match); absent in older videos

    def __post_init__(self) -> None:
        if isinstance(self.keyframes, list) or (self.keyframes and not isinstance(self.keyframes[0], Keyframe)):
            try:  # (seconds, image) pairs, as a user writes them
                object.__setattr__(self, "keyframes", keyframe_tuple(self.keyframes))
            except (ValueError, TypeError):
                pass  # named by _keyframe_problems
        if isinstance(self.loras, (list, tuple)) and not all(isinstance(c, LoraChoice) for c in self.loras):
            try:  # (path, scale) pairs, as a user writes them
                object.__setattr__(self, "loras", lora_choices(self.loras))
            except ValueError:
                pass  # named by _lora_problems
        # the first problem only: later checks may assume the earlier ones passed (a number, not a string)
        problem = next(self._problems(), None)
        if problem is not None:
            raise ValueError(problem)

    def _problems(self):
        optional = {f.name for f in fields(self) if f.default is None}  # None there means "the model's own"

        def bad_number(name: str, value: float | None) -> bool:
            if value is None and name in optional:
                return False
            return isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)

        for name in ("seconds", "distilled_guidance", "cfg", "guidance_rescale"):
            if bad_number(name, getattr(self, name)):
                yield f"{name} must be a number, got {getattr(self, name)!r}"
        if not 0 < self.seconds <= MAX_SECONDS:
            yield f"seconds must be > 0 and <= {MAX_SECONDS:g}, got {self.seconds:g}"
        if not 1 <= self.steps <= MAX_STEPS:
            yield f"steps must be between 1 and {MAX_STEPS}, got {self.steps}"
        if not (math.isfinite(self.distilled_guidance) and self.distilled_guidance >= 0):
            yield f"distilled guidance must be a finite number >= 0, got {self.distilled_guidance}"
        if self.cfg is not None and not (math.isfinite(self.cfg) and self.cfg >= 0):
            yield f"cfg must be a finite number >= 0, got {self.cfg}"
        if not (math.isfinite(self.guidance_rescale) and 0 <= self.guidance_rescale <= 1):
            yield f"guidance rescale must be between 0 and 1, got {self.guidance_rescale}"
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            yield f"shift must be a finite number > 0, got {self.shift}"
        from .sampling import SAMPLERS

        if self.sampler not in SAMPLERS:
            yield f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}"
        from .cache import parse_cache

        try:
            parse_cache(self.cache)
        except ValueError as exc:
            yield str(exc)
        if self.mode is not None and self.mode not in MODES:
            yield f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}"
        if self.resolution is not None and not 64 <= self.resolution <= 1280:
            yield f"resolution must be between 64 and 1280, got {self.resolution}"
        if not 1 <= self.window <= 33:
            yield f"window must be between 1 and 33 latent frames, got {self.window}"
        if not 0 <= self.crf <= 51:
            yield f"crf must be between 0 and 51, got {self.crf}"
        if not -(2**63) <= self.seed < 2**63:
            yield f"seed must fit in 64 bits, got {self.seed}"
        if self.end_image is not None and self.mode not in (None, "inverted"):
            yield f"an end image needs mode 'inverted', not {self.mode!r}"
        try:
            parse_timeline(self.prompt)
        except ValueError as exc:
            yield str(exc)
        if self.section_prompts is not None:
            yield from self._section_prompt_problems()
        yield from self._lora_problems()
        if self.extend is not None:
            yield from self._extend_problems()
        yield from self._keyframe_problems()
        yield from self._color_match_problems()

    def _color_match_problems(self):
        from .color_match import method_problem

        problem = method_problem(self.color_match)
        if problem is not None:
            yield problem
        elif self.color_match != "none" and self.image is None and self.extend is None:
            # text-to-video's blank grey frame is no colour to keep (docs/generation.md, "Colour drift correction")
            yield "colour matching needs a start image to match to (text-to-video has none)"

    def _keyframe_problems(self):
        if not isinstance(self.keyframes, tuple) or not all(isinstance(k, Keyframe) for k in self.keyframes):
            yield f"keyframes must be a list of (seconds, image) pairs, got {self.keyframes!r}"
            return
        if self.keyframes and self.mode not in (None, "inverted"):
            yield f"keyframes need mode 'inverted' (sections made back to front), not {self.mode!r}"
            return
        # checked here, not when the pipeline plans the sections: by then a job directory exists
        problem = keyframe_problem(self.keyframes, section_count(self.seconds, self.window), self.window,
                                   self.end_image is not None)
        if problem is not None:
            yield problem

    def _extend_problems(self):
        if not isinstance(self.extend, str) or not self.extend.strip():
            yield f"extend must name a video, got {self.extend!r}"
        elif self.end_image is not None:
            yield "an end image cannot be used with --extend (the extended video is the other end)"
        elif getattr(self, "keyframes", ()):
            yield "keyframes cannot be used with --extend yet"
        elif any(math.isfinite(segment.end) for segment in parse_timeline(self.prompt)):
            yield "a prompt timeline cannot be used with --extend (its times would count the video's part too): give --section-prompt per new section"

    def _lora_problems(self):
        if not isinstance(self.loras, tuple) or len(self.loras) > MAX_LORAS:
            yield f"loras must be a list of at most {MAX_LORAS} LoRAs, got {self.loras!r}"
            return
        problem = next(filter(None, map(_lora_problem, self.loras)), None)
        if problem is not None:
            yield problem

    def _section_prompt_problems(self):
        # checked here, not when the pipeline plans the sections: by then a job directory exists
        # that --resume could never finish
        if not isinstance(self.section_prompts, (tuple, list)):
            yield f"section prompts must be a list of prompts, got {self.section_prompts!r}"
            return
        count = section_count(self.seconds, self.window)
        given = len(self.section_prompts)
        if given not in (1, count):
            yield (f"{given} section prompts for a {real_seconds(self.seconds, self.window):.2f} s video of "
                   f"{count} section{'s' if count > 1 else ''}: give one per section, or one for all")
        for i, text in enumerate(self.section_prompts, 1):
            if not isinstance(text, str) or not text.strip():
                yield f"section prompt {i} is empty"
                break

    def replace(self, **changes: Any) -> "GenerationSettings":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.section_prompts is not None:
            data["section_prompts"] = list(self.section_prompts)
        data["loras"] = [choice._asdict() for choice in self.loras]
        data["keyframes"] = [keyframe._asdict() for keyframe in self.keyframes]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        data = dict(data)
        if data.get("section_prompts") is not None:
            data["section_prompts"] = tuple(data["section_prompts"])
        if "loras" in data:
            data["loras"] = lora_choices(data["loras"])
        if "keyframes" in data:
            data["keyframes"] = keyframe_tuple(data["keyframes"])
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"incomplete settings: {exc}") from None

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "GenerationSettings":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _lora_problem(choice: Any) -> str | None:
    if not isinstance(choice, LoraChoice) or not isinstance(choice.path, str) or not choice.path.strip():
        return f"a LoRA needs a file, got {choice!r}"
    scale = choice.scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        return f"the scale of LoRA {choice.path!r} must be a finite number, got {scale!r}"
    if choice.sha256 is not None and not isinstance(choice.sha256, str):
        return f"the sha256 of LoRA {choice.path!r} must be text, got {choice.sha256!r}"
    return None


def lora_choices(entries: Any) -> tuple[LoraChoice, ...]:
    """Stored LoRAs ({"path", "scale", "sha256"} or [path, scale, sha256]) -> LoraChoice tuples."""
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"loras must be a list, got {entries!r}")
    choices = []
    for entry in entries:
        try:
            if isinstance(entry, dict):
                choices.append(LoraChoice(**entry))
            elif isinstance(entry, (list, tuple)):
                choices.append(LoraChoice(*entry))
            else:
                raise TypeError
        except TypeError:
            raise ValueError(f"not a LoRA entry: {entry!r}") from None
    return tuple(choices)
