"""The web form and the API's arguments <-> GenerationSettings, as pure functions (no Gradio here).

Values arrive as the browser (or an API client) sent them: numbers may be missing, fractional,
huge, infinite or of the wrong type, files may be absent or name anything. Every endpoint and
every page handler reads its arguments through the parsers here, and every problem becomes a
one-line ``ValueError`` that the app shows next to the button (or raises as ``gr.Error``).
File references are checked by the caller's ``accept_file`` (the app's :class:`FileGate`).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..batch import expand, parse_prompts
from ..color_match import DEFAULT_METHOD, METHODS, method_problem
from ..keyframes import MAX_KEYFRAMES, Keyframe
from ..planning import DEFAULT_WINDOW, FPS, TEMPORAL_RATIO, real_seconds, section_count
from ..runtime.choose import DEFAULT_PRESERVE_GB
from ..settings import DEFAULT_SEED, MAX_SECONDS, GenerationSettings

AUTO = "auto"  # "the model's own" for mode and resolution
SEED_LIMIT = 2**32  # random seeds are drawn below this
RESOLUTIONS: tuple[int, ...] = (64, 128, 256, 384, 512, 640, 768)
MODES: tuple[str, ...] = (AUTO, "inverted", "forward")
JOB_LIMIT = 2**63 - 1  # SQLite's largest integer: no job number is above it
HISTORY_LIMIT = 1000
SHOWN_CHARS = 40  # a bad value is quoted in a message up to this length
MAX_PRESERVE_GB = 128.0  # "GPU memory to preserve": no GPU a user has keeps more free for others
PLAN_PROMPT = "memory plan"  # the memory plan needs settings, not a prompt: any valid one stands in

AcceptFile = Callable[[str, Any], "str | None"]  # (label, payload) -> an accepted path, or None


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
    cache: str = "model"  # the model's own step cache (the reference's UI has TeaCache on by default)
    preserve_gb: float = DEFAULT_PRESERVE_GB  # a property of the run (the worker's GPU), not of the video


# ---- lengths: the steps the model can make -------------------------------------------------------------------


def section_seconds(window: int = DEFAULT_WINDOW, fps: int = FPS) -> float:
    """How much video one section adds (1.2 s): the length control moves in these steps."""
    return window * TEMPORAL_RATIO / fps


def snap_seconds(seconds: float, window: int = DEFAULT_WINDOW, fps: int = FPS) -> float:
    """The length control's position for a requested length: whole sections, as the model makes them."""
    step = section_seconds(window, fps)
    sections = min(section_count(seconds, window, fps), int(MAX_SECONDS / step + 1e-9))
    return round(sections * step, 6)


def length_note(seconds: Any) -> str:
    """What the length control shows beside it: the length the video really has."""
    try:
        value = _number("length (seconds)", seconds)
    except ValueError as exc:
        return str(exc)
    if not 0 < value <= MAX_SECONDS:
        return f"the length must be > 0 and <= {MAX_SECONDS:g} s"
    sections = section_count(value)
    plural = "s" if sections > 1 else ""
    return (f"makes a {real_seconds(value):.2f} s video ({sections} section{plural} of "
            f"{section_seconds():g} s, plus the start frame)")


# ---- argument parsers ------------------------------------------------------------------------------------------


def shown(value: Any) -> str:
    """A client's value quoted in a message: short, one line."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _number(label: str, value: Any) -> float:
    if value is None or value == "":
        raise ValueError(f"{label} is empty")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{label} must be a number, got {shown(value)}")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{label} must be a number, got {shown(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"{label} must be a finite number, got {shown(value)}")
    return number


def _whole(label: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # exact, even beyond float precision (a seed near 2**63)
    number = _number(label, value)
    if number != int(number):
        raise ValueError(f"{label} must be a whole number, got {number:g}")
    return int(number)


def _choice(label: str, value: Any, choices: tuple[str, ...]) -> str:
    text = value if isinstance(value, str) else ""
    if text not in choices:
        raise ValueError(f"unknown {label} {shown(value)}; choose from {', '.join(choices)}")
    return text


def _text(label: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{label} must be text, got {shown(value)}")
    return value


def _flag(label: str, value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be true or false, got {shown(value)}")
    return value


def job_number(value: Any) -> int:
    """A job id as a client sent it (a number, a numeric string) -> the job number."""
    if value is None or value == "":
        raise ValueError("no job selected: submit one or pick one in the history")
    try:
        number = _whole("job", value)
    except ValueError:
        raise ValueError(f"not a job number: {shown(value)}") from None
    if not 1 <= number <= JOB_LIMIT:
        raise ValueError(f"no job {shown(value)}: job numbers start at 1")
    return number


@dataclass(frozen=True)
class RedoRequest:
    """A checked redo request: remake section ``section`` of job ``job``, optionally with a new seed/prompt."""

    job: int
    section: int
    seed: int | None
    prompt: str | None


def redo_request(job: Any, section: Any, seed: Any = None, prompt: Any = None) -> RedoRequest:
    """A redo request as a client sent it -> the checked request (empty seed or prompt: keep the job's)."""
    return RedoRequest(job_number(job), _whole("section", section),
                       None if seed is None or seed == "" else _whole("seed", seed),
                       _text("prompt", prompt).strip() or None)


def history_limit(value: Any) -> int:
    """How many finished jobs a history request lists."""
    number = _whole("limit", value)
    if not 1 <= number <= HISTORY_LIMIT:
        raise ValueError(f"limit must be between 1 and {HISTORY_LIMIT}, got {number}")
    return number


def preserve_gb(value: Any) -> float:
    """The "GPU memory to preserve" of a submission: GB a CUDA worker leaves free of its plan."""
    number = _number("GPU memory to preserve (GB)", value)
    if not 0 <= number <= MAX_PRESERVE_GB:
        raise ValueError(f"GPU memory to preserve must be between 0 and {MAX_PRESERVE_GB:g} GB, got {number:g}")
    return number


def _resolution(value: Any) -> int | None:
    return None if value is None or value in ("", AUTO) else _whole("resolution", value)


def _cfg(value: Any) -> float | None:
    return None if value is None or value == "" else _number("CFG", value)


def plan_settings(form: Mapping[str, Any], models: Mapping[str, str]) -> GenerationSettings:
    """What the memory plan of a form depends on (model, resolution, CFG; the window is the
    default one), as settings: no image or prompt is needed to plan."""
    return GenerationSettings(image="", prompt=PLAN_PROMPT, model=model_choice(form.get("model"), models),
                              resolution=_resolution(form.get("resolution")), cfg=_cfg(form.get("cfg")))


def model_choice(value: Any, models: Mapping[str, str]) -> str:
    """The model a form names, by its shown name (or by the argument it stands for)."""
    if isinstance(value, str) and value in models.values():
        return value
    return models[_choice("model", value or next(iter(models)), tuple(models))]


def settings_from_form(form: Mapping[str, Any], models: Mapping[str, str], *,
                       accept_file: AcceptFile) -> GenerationSettings:
    """Validate one submission; the seed is drawn here when ``random_seed`` is set.

    ``models`` maps the names the page shows to model arguments; ``accept_file`` checks each
    file reference (only uploads pass) and returns its path.
    """
    image = accept_file("start image", form.get("image"))  # None: text-to-video (docs/generation.md)
    end_image = accept_file("end image", form.get("end_image"))
    keyframes = keyframes_from_form(form.get("keyframe_images"), form.get("keyframe_times"), accept_file)
    random_seed = _flag("random seed", form.get("random_seed"))
    seed = secrets.randbelow(SEED_LIMIT) if random_seed else _whole("seed", form.get("seed"))
    mode = _choice("mode", form.get("mode") or AUTO, MODES)
    prompt = _text("prompt", form.get("prompt")).strip()
    if not prompt:
        raise ValueError("type a prompt (or a timeline such as '[0s-2s: a cat sits] [2s-4s: it jumps]')")
    return GenerationSettings(
        image=image,
        end_image=end_image,
        prompt=prompt,
        negative_prompt=_text("negative prompt", form.get("negative_prompt")),
        model=model_choice(form.get("model"), models),
        seconds=_number("length (seconds)", form.get("seconds")),
        seed=seed,
        steps=_whole("steps", form.get("steps")),
        distilled_guidance=_number("distilled guidance", form.get("distilled_guidance")),
        cfg=_cfg(form.get("cfg")),
        sampler=_text("sampler", form.get("sampler")) or "unipc",
        mode=None if mode == AUTO else mode,
        resolution=_resolution(form.get("resolution")),
        crf=_whole("mp4 quality (CRF)", form.get("crf")),
        cache=_cache(form.get("cache")),
        keyframes=keyframes,
        color_match=color_match(form.get("color_match")),
    )


def _file_list(value: Any) -> list[Any]:
    """A multiple-file field as a client sent it: nothing, one file payload, or a list of them."""
    if value is None or value == "" or value == []:
        return []
    return list(value) if isinstance(value, list) else [value]


def _keyframe_times(value: Any) -> list[float]:
    """Keyframe times: "1.2, 2.4" (seconds, an optional "s" each; commas or spaces), or a list of numbers."""
    if value is None or value == "":
        return []
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = [item.strip().removesuffix("s") for item in re.split(r"[,\s]+", value.strip()) if item.strip()]
    else:
        items = [value]
    return [_number(f"keyframe time {i}", item) for i, item in enumerate(items, 1)]


def keyframes_from_form(images: Any, times: Any, accept_file: AcceptFile) -> tuple[Keyframe, ...]:
    """The keyframe field (uploaded images, in order) with the keyframe times (one per image) -> keyframes.

    Counted before any file is looked at; each image goes through ``accept_file`` like the start
    image. Where the times fall in the video is the settings' check (framepack.keyframes)."""
    files, seconds = _file_list(images), _keyframe_times(times)
    if max(len(files), len(seconds)) > MAX_KEYFRAMES:
        raise ValueError(f"at most {MAX_KEYFRAMES} keyframes, got {max(len(files), len(seconds))}")
    if len(files) != len(seconds):
        raise ValueError(f"{len(files)} keyframe image{'s' if len(files) != 1 else ''} and {len(seconds)} keyframe "
                         f"time{'s' if len(seconds) != 1 else ''}: give one time per image, in the images' order")
    keyframes = []
    for i, (payload, at) in enumerate(zip(files, seconds), 1):
        path = accept_file(f"keyframe image {i}", payload)
        if path is None:
            raise ValueError(f"keyframe image {i} is empty: upload an image")
        keyframes.append(Keyframe(at, path))
    return tuple(keyframes)


def color_match(value: Any) -> str:
    """The colour-match field: the page's checkbox (true: the default method), or a method's name."""
    if value is None or value is False:
        return "none"
    if value is True:
        return DEFAULT_METHOD
    if isinstance(value, str) and method_problem(value) is None:
        return value
    raise ValueError(f"unknown colour match {shown(value)}; choose from true, false, {', '.join(METHODS)}")


# ---- batches: one submission, many queued jobs (the CLI's --count and --prompts, through framepack.batch) --------

# what a JSON line of the prompts field may set: the form's own settings, never a file (the images
# are the uploads of the form, LoRAs the LoRA field's)
LINE_SETTINGS: tuple[str, ...] = ("prompt", "negative_prompt", "seconds", "seed", "steps", "distilled_guidance", "cfg",
                                  "sampler", "mode", "model", "resolution", "crf", "cache", "color_match")
# a line that is one word with a path separator, a home directory or a file extension names a file
_FILE_NAME = re.compile(r"^\S*[/\\]\S*$|^~\S*$|^\S+\.(txt|jsonl?|csv|md|mp4|png|jpe?g)$", re.IGNORECASE)


@dataclass(frozen=True)
class BatchJob:
    label: str  # "line 3, seed 32" ("" for a submission of one job): names the job in a message
    form: dict[str, Any]  # the submission's form with this job's settings over it


def _prompt_lines(text: str) -> list[tuple[int, dict[str, Any]]]:
    """The prompts field, read by the CLI's ``--prompts`` reader (messages name the field, not a file)."""
    lines = parse_prompts(text, "prompts")
    for number, fields in lines:
        if set(fields) == {"prompt"} and _FILE_NAME.match(fields["prompt"]):
            raise ValueError(f"prompts line {number}: {shown(fields['prompt'])} looks like a file name; type the "
                             "prompts themselves, one per line (files on the server are never read)")
        for key in fields:
            if key not in LINE_SETTINGS:
                raise ValueError(f"prompts line {number}: {shown(key)} cannot be set per line; a line sets "
                                 f"{', '.join(LINE_SETTINGS)} (images and LoRAs are the form's)")
    return lines


def batch_jobs(form: Mapping[str, Any]) -> list[BatchJob]:
    """The jobs one submission makes: ``count`` (seeds S, S+1, ...) times each line of ``prompts``
    (or the form's prompt alone), as ``framepack generate --count --prompts`` makes them. The seed S
    is the form's (drawn here once when ``random_seed`` is set). A single job keeps the form as it is."""
    count = 1 if form.get("count") in (None, "") else _whole("count", form.get("count"))
    text = _text("prompts", form.get("prompts")).strip()
    if count == 1 and not text:
        return [BatchJob("", dict(form))]
    lines = _prompt_lines(text) if text else None
    random_seed = _flag("random seed", form.get("random_seed"))
    seed = secrets.randbelow(SEED_LIMIT) if random_seed else _whole("seed", form.get("seed"))
    try:
        jobs = expand({"seed": seed}, lines, count, Path("batch.mp4"), DEFAULT_SEED)
    except ValueError as exc:
        raise ValueError(str(exc).replace("--count", "count").replace("--prompts", "prompts")) from None
    return [BatchJob(job.label, {**form, **job.settings, "random_seed": False}) for job in jobs]


CACHE_CHOICES: tuple[tuple[str, str], ...] = (
    ("model's own", "model"), ("off", "none"), ("TeaCache 0.15 (the reference's)", "teacache:0.15"),
    ("TeaCache 0.3", "teacache:0.3"), ("MagCache", "magcache"), ("First Block Cache", "fbcache"),
    ("TaylorSeer", "taylorseer"))


def _cache(value: Any) -> str:
    """A step cache setting (framepack.cache), written the way the video will record it."""
    from ..cache import parse_cache

    text = _text("step cache", value).strip() or FormDefaults.cache
    parse_cache(text)  # one line naming the problem
    return text.lower()


def form_from_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A stored or embedded settings dict -> form values; a missing or ill-typed value keeps the default.

    Settings read from an uploaded mp4 are the client's words: no value is taken on trust (a wrong
    type falls back to the default) and no image path is returned at all. A job's own images are
    the caller's to hand out.
    """
    defaults = FormDefaults()

    def pick(key: str, default: Any, parse: Callable[[str, Any], Any]) -> Any:
        try:
            return parse(key, settings[key]) if key in settings else default
        except ValueError:
            return default

    seconds = snap_seconds(pick("seconds", defaults.seconds, _number))
    cfg = settings.get("cfg")
    mode = settings.get("mode") or AUTO
    resolution = settings.get("resolution")
    return {
        "prompt": pick("prompt", defaults.prompt, _text),
        "negative_prompt": pick("negative_prompt", defaults.negative_prompt, _text),
        "seconds": seconds,
        "seed": pick("seed", defaults.seed, _whole),
        "random_seed": False,  # "use these settings" means this seed
        "steps": pick("steps", defaults.steps, _whole),
        "distilled_guidance": pick("distilled_guidance", defaults.distilled_guidance, _number),
        "cfg": None if cfg is None else pick("cfg", defaults.cfg, _number),
        "sampler": pick("sampler", defaults.sampler, _text),
        "mode": mode if mode in MODES else AUTO,
        "resolution": str(resolution) if isinstance(resolution, int) and str(resolution) in map(str, RESOLUTIONS)
        else AUTO,
        "crf": pick("crf", defaults.crf, _whole),
        "cache": pick("cache", "none", lambda _, v: _cache(v)),  # a video without one was made uncached
        "model": settings.get("model") if isinstance(settings.get("model"), str) else None,
        "image": None,
        "end_image": None,
        # a job's own keyframes are the caller's to hand out, as its start image; an mp4's are not taken
        "keyframe_images": None,
        "keyframe_times": "",
        "color_match": pick("color_match", "none", lambda _, v: color_match(v)) != "none",
    }
