"""The web form <-> GenerationSettings, in both directions, as pure functions (no Gradio here).

Values arrive as the browser (or an API client) sent them: numbers may be missing, fractional,
huge or of the wrong type, files may be absent. Every problem becomes a one-line ``ValueError``
that the app shows next to the button.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import DEFAULT_SEED, GenerationSettings

AUTO = "auto"  # "the model's own" for mode and resolution
SEED_LIMIT = 2**32  # random seeds are drawn below this
RESOLUTIONS: tuple[int, ...] = (64, 128, 256, 384, 512, 640, 768)
MODES: tuple[str, ...] = (AUTO, "inverted", "forward")


@dataclass(frozen=True)
class FormDefaults:
    """What a fresh page shows; the advanced ones sit in a folded panel."""

    prompt: str = ""
    negative_prompt: str = ""
    seconds: float = 5.0
    seed: int = DEFAULT_SEED
    random_seed: bool = False
    steps: int = 25
    distilled_guidance: float = 10.0
    cfg: float | None = None  # empty: the model's own
    sampler: str = "unipc"
    mode: str = AUTO
    resolution: str = AUTO
    crf: int = 16


def file_path(value: Any) -> str | None:
    """A Gradio file payload (dict or FileData), a path string, or nothing -> a path or None."""
    if value is None or value == "":
        return None
    if isinstance(value, (str, Path)):
        return str(value)
    if isinstance(value, Mapping):
        path = value.get("path")
    else:
        path = getattr(value, "path", None)
    return None if path in (None, "") else str(path)


def _number(label: str, value: Any) -> float:
    if value is None or value == "":
        raise ValueError(f"{label} is empty")
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return number


def _whole(label: str, value: Any) -> int:
    number = _number(label, value)
    if number != int(number):
        raise ValueError(f"{label} must be a whole number, got {number:g}")
    return int(number)


def _choice(label: str, value: Any, choices: tuple[str, ...]) -> str:
    text = str(value) if value is not None else ""
    if text not in choices:
        raise ValueError(f"unknown {label} {text!r}; choose from {', '.join(choices)}")
    return text


def settings_from_form(form: Mapping[str, Any], models: tuple[str, ...]) -> GenerationSettings:
    """Validate one submission; the seed is drawn here when ``random_seed`` is set."""
    image = file_path(form.get("image"))
    if image is None:
        raise ValueError("upload a start image first")
    seed = secrets.randbelow(SEED_LIMIT) if form.get("random_seed") else _whole("seed", form.get("seed"))
    mode = _choice("mode", form.get("mode") or AUTO, MODES)
    resolution = str(form.get("resolution") or AUTO)
    if resolution != AUTO:
        resolution_value: int | None = _whole("resolution", resolution)
    else:
        resolution_value = None
    prompt = str(form.get("prompt") or "").strip()
    if not prompt:
        raise ValueError("type a prompt (or a timeline such as '[0s-2s: a cat sits] [2s-4s: it jumps]')")
    return GenerationSettings(
        image=image,
        end_image=file_path(form.get("end_image")),
        prompt=prompt,
        negative_prompt=str(form.get("negative_prompt") or ""),
        model=_choice("model", form.get("model") or models[0], models),
        seconds=_number("length (seconds)", form.get("seconds")),
        seed=seed,
        steps=_whole("steps", form.get("steps")),
        distilled_guidance=_number("distilled guidance", form.get("distilled_guidance")),
        cfg=None if form.get("cfg") in (None, "") else _number("CFG", form.get("cfg")),
        sampler=str(form.get("sampler") or "unipc"),
        mode=None if mode == AUTO else mode,
        resolution=resolution_value,
        crf=_whole("mp4 quality (CRF)", form.get("crf")),
    )


def form_from_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A stored or embedded settings dict -> form values (missing keys keep the defaults).

    Image paths are returned only when the file still exists.
    """
    defaults = FormDefaults()
    values: dict[str, Any] = {
        "prompt": settings.get("prompt", defaults.prompt),
        "negative_prompt": settings.get("negative_prompt", defaults.negative_prompt),
        "seconds": settings.get("seconds", defaults.seconds),
        "seed": settings.get("seed", defaults.seed),
        "random_seed": False,  # "use these settings" means this seed
        "steps": settings.get("steps", defaults.steps),
        "distilled_guidance": settings.get("distilled_guidance", defaults.distilled_guidance),
        "cfg": settings.get("cfg", defaults.cfg),
        "sampler": settings.get("sampler", defaults.sampler),
        "mode": settings.get("mode") or AUTO,
        "resolution": str(settings["resolution"]) if settings.get("resolution") else AUTO,
        "crf": settings.get("crf", defaults.crf),
        "model": settings.get("model"),
    }
    for key in ("image", "end_image"):
        path = settings.get(key)
        values[key] = path if path and Path(path).is_file() else None
    return values
