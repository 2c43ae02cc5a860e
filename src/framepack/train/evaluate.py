"""``framepack eval``: the demo model on held-out scenes of the synthetic world.

Two yardsticks, each on frames decoded from the generated mp4 (what a user gets).

The default (issue 18), :class:`YardstickConfig` / :func:`run_yardstick` over the metrics of
:mod:`framepack.train.yardstick`, on the ``validation`` or ``test`` split of the world with start
frames independent of the motion (by default its determined sampler: one speed and bounce heading,
so the start frame and caption determine the clip): caption control (every start frame with every caption that
applies; accuracy, confusion matrix, chance), shape fidelity (IoU against the world's ground truth
over 5 s and 30 s), persistence relative to the true area (30 s and 60 s), and the drift below;
counts and 95% intervals. :func:`measure` runs it on any generator, so the tests check it on the
world's own clips and on negative controls without a model.

The first yardstick (:class:`EvalConfig` / :func:`run_eval`, ``--yardstick direction``), kept
because the first-generation model's published numbers came from it; on the first world, whose start frame
gives the direction away (a caption-blind rule scores 80% on it). Three measurements:

* **motion direction**: for held-out scenes with a single direction (moves left/right/up/down,
  camera pans, or "still" for stay/grow/shrink/rotate; bounce has none), the start frame and the
  caption go in; the object is tracked by its colour and the net displacement's direction
  (:func:`world.motion_direction`) must be the one the caption implies (:func:`world.expected_direction`);
  an object missing from more than half of the frames counts as "lost" (wrong).
* **object persistence**: over long videos, the share of frames in which the object's colour still
  covers at least a quarter of the area it had in the start frame.
* **drift** as FramePack's paper defines it: ``|M(first 15% of frames) - M(last 15%)|`` for a
  sharpness metric (mean absolute Laplacian of the luma) and a colour metric (Hasler and
  Suesstrunk's colourfulness), for inverted anti-drifting and vanilla sampling on the same model,
  scenes and seeds. Lower is better.

``split="validation"`` measures motion direction on scenes of the training distribution instead (a
stream no training config draws from, so unseen, and never a held-out scene), for choosing between
models and settings without looking at the held-out scores that are reported.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import world, yardstick

log = logging.getLogger(__name__)

MIN_AREA_FRACTION = 0.25  # of the start frame's object area, to count the object as present
EDGE_FRACTION = 0.15  # the paper's drift metric compares the first and last 15% of frames


# ---- metrics (pure) -------------------------------------------------------------------------------------


def sharpness(frames: np.ndarray) -> np.ndarray:
    """Mean absolute 4-neighbour Laplacian of the luma per frame (T,), in 8-bit units."""
    y = frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return np.abs(lap).mean(axis=(1, 2))


def colourfulness(frames: np.ndarray) -> np.ndarray:
    """Hasler and Suesstrunk (2003) colourfulness per frame (T,)."""
    f = frames.astype(np.float64)
    rg = f[..., 0] - f[..., 1]
    yb = 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    std = np.hypot(rg.std(axis=(1, 2)), yb.std(axis=(1, 2)))
    mean = np.hypot(rg.mean(axis=(1, 2)), yb.mean(axis=(1, 2)))
    return std + 0.3 * mean


def drift(per_frame: np.ndarray, edge: float = EDGE_FRACTION) -> float:
    """|mean of the first ``edge`` of frames - mean of the last ``edge``| (at least one frame each)."""
    k = max(1, int(round(len(per_frame) * edge)))
    return float(abs(per_frame[:k].mean() - per_frame[-k:].mean()))


def persistence(frames: np.ndarray, rgb: world.RGB) -> float:
    """Share of frames where the object's colour covers >= MIN_AREA_FRACTION of its first-frame area."""
    area = world.colour_mask(frames, rgb).sum(axis=(1, 2))
    if area[0] == 0:
        return 0.0
    return float((area >= MIN_AREA_FRACTION * area[0]).mean())


# ---- cases ---------------------------------------------------------------------------------------------------


SPLITS = ("held-out", "validation")
# Training draws world.stream(0) (the latent cache) or world.stream(seed * 1_000_003 + resume step),
# which reaches this only at a resume step of 777_777: far past any run's length
VALIDATION_SEED = 777_777


def direction_cases(n: int, split: str = "held-out") -> list[world.WorldParams]:
    """The first ``n`` scenes of ``split`` whose caption implies one direction (bounce excluded)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "validation":
        scenes = (p for p in world.stream(VALIDATION_SEED) if world.expected_direction(p) is not None)
        return [next(scenes) for _ in range(n)]
    cases: list[world.WorldParams] = []
    pool = 4 * n
    while len(cases) < n:
        cases = [p for p in world.held_out(pool) if world.expected_direction(p) is not None][:n]
        pool *= 2
    return cases


def long_cases(n: int) -> list[world.WorldParams]:
    """Held-out scenes for long videos: the object stays in frame (no camera pans), one per motion first."""
    return yardstick.one_per_motion_first([p for p in world.held_out(16 * n) if p.motion not in world.PANS], n)


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    model: str = "tiny"
    prompts: int = 50
    seconds: float = 2.0
    long_videos: int = 6
    long_seconds: float = 30.0
    steps: int | None = None  # None: the model's own (25, or a few-step student's)
    cfg: float | None = None  # real classifier-free guidance (negative prompt ""); None: the model's own
    seed: int = 0
    workdir: str | None = None  # keep the videos here (default: a temporary directory)
    split: str = "held-out"  # the direction scenes: "held-out" (reported) or "validation" (for choosing)

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.long_videos < 0 or (self.steps is not None and self.steps < 1):
            raise ValueError("prompts and steps must be >= 1, long videos >= 0")
        if self.cfg is not None and not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")
        if not (self.seconds > 0 and self.long_seconds > 0):
            raise ValueError("seconds must be > 0")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")


@dataclass
class EvalResult:
    config: dict
    direction: list[dict] = field(default_factory=list)  # per case: caption, expected, got
    long: list[dict] = field(default_factory=list)  # per case and mode: persistence, drifts

    def accuracy(self, kind: str | None = None) -> float:
        rows = [r for r in self.direction if kind is None or (r["expected"] == "still") == (kind == "still")]
        return float(np.mean([r["got"] == r["expected"] for r in rows])) if rows else math.nan

    def mean(self, mode: str, key: str) -> float:
        values = [r[key] for r in self.long if r["mode"] == mode]
        return float(np.mean(values)) if values else math.nan


def _generate(pipeline, config: EvalConfig, params: world.WorldParams, seconds: float, mode: str | None, seed: int,
              root: Path) -> np.ndarray:
    return _video(pipeline, config, world.render(params, 1)[0], world.caption(params), seconds, mode, seed, root)


def _video(pipeline, config: EvalConfig | YardstickConfig, first: np.ndarray, caption: str, seconds: float,
           mode: str | None, seed: int, root: Path) -> np.ndarray:
    """One video from ``first`` (H, W, 3) and ``caption`` through ``pipeline``, decoded from its mp4."""
    from PIL import Image

    from ..jobs import JobDir
    from ..settings import GenerationSettings
    from ..video import read_frames

    root.mkdir(parents=True, exist_ok=True)
    image = root / "start.png"
    Image.fromarray(first).save(image)
    settings = GenerationSettings(image=str(image), prompt=caption, model=config.model, seconds=seconds,
                                  steps=config.steps, cfg=config.cfg, seed=seed, mode=mode, crf=10)
    job = JobDir.create(root / "job", settings, root / "video.mp4")
    pipeline.run(job)
    return read_frames(job.out)


def _as_run(config, source):
    """The config with the model's own CFG scale and steps filled in: what runs, for the record."""
    return replace(config, cfg=source.cfg(config.cfg), steps=source.steps(config.steps))


def run_eval(config: EvalConfig, pipeline, progress: Callable[[str], None] = lambda s: None) -> EvalResult:
    """Generate every case with ``pipeline`` (a FramePackPipeline) and measure it."""
    config = _as_run(config, pipeline.c.source)
    result = EvalResult(config=asdict(config))
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(config.workdir) if config.workdir else Path(scratch)
        for i, params in enumerate(direction_cases(config.prompts, config.split)):
            frames = _generate(pipeline, config, params, config.seconds, None, config.seed + i, base / f"direction-{i:03d}")
            rgb = world.PALETTE[params.color]
            # an object that is gone cannot be "still": count it as lost (wrong for every prompt)
            got = world.motion_direction(world.track_colour(frames, rgb)) if persistence(frames, rgb) >= 0.5 else "lost"
            result.direction.append({"caption": world.caption(params), "expected": world.expected_direction(params), "got": got})
            progress(f"direction {i + 1}/{config.prompts}: {got} for '{world.caption(params)}'")
        for i, params in enumerate(long_cases(config.long_videos)):
            for mode in ("inverted", "vanilla"):
                frames = _generate(pipeline, config, params, config.long_seconds, mode, config.seed + 1000 + i,
                                   base / f"long-{i:02d}-{mode}")
                result.long.append({
                    "caption": world.caption(params), "mode": mode, "frames": len(frames),
                    "persistence": persistence(frames, world.PALETTE[params.color]),
                    "sharpness_drift": drift(sharpness(frames)), "colour_drift": drift(colourfulness(frames)),
                })
                progress(f"long video {i + 1}/{config.long_videos} ({mode}): persistence {result.long[-1]['persistence']:.2f}")
    return result


def format_table(result: EvalResult) -> str:
    c = result.config
    moving = [r for r in result.direction if r["expected"] != "still"]
    still = [r for r in result.direction if r["expected"] == "still"]
    lines = [
        f"model {c['model']}, {c['steps']} steps, cfg {1.0 if c.get('cfg') is None else c['cfg']:g}, seeds from {c['seed']}"
        + (f", {c['split']} scenes" if c.get("split", "held-out") != "held-out" else ""),
        "",
        "| measurement | model's mode / inverted (anti-drifting) | vanilla |",
        "|---|---|---|",
        f"| motion direction, all {len(result.direction)} prompts ({c['seconds']:g} s videos) | "
        f"{100 * result.accuracy():.1f}% | |",
        f"| ... moving objects and pans ({len(moving)}) | {100 * result.accuracy('moving'):.1f}% | |",
        f"| ... still / in place ({len(still)}) | {100 * result.accuracy('still'):.1f}% | |",
    ]
    if result.long:
        n = len({r["caption"] for r in result.long})
        lines += [
            f"| object persistence, {n} videos of {c['long_seconds']:g} s (share of frames) | "
            f"{result.mean('inverted', 'persistence'):.3f} | {result.mean('vanilla', 'persistence'):.3f} |",
            f"| sharpness drift, abs(M first 15% - M last 15%), lower is better | "
            f"{result.mean('inverted', 'sharpness_drift'):.3f} | {result.mean('vanilla', 'sharpness_drift'):.3f} |",
            f"| colour drift (colourfulness), lower is better | "
            f"{result.mean('inverted', 'colour_drift'):.3f} | {result.mean('vanilla', 'colour_drift'):.3f} |",
        ]
    return "\n".join(lines)


def save(result: EvalResult | YardstickResult, path: Path) -> None:
    """Every case as JSON (with the yardstick's summary, counts and intervals), atomically."""
    data = asdict(result)
    if isinstance(result, YardstickResult):
        data["summary"] = result.summary()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


# ---- the yardstick (issue 18): caption control, shape fidelity, persistence, drift -------------------------


@dataclass(frozen=True)
class YardstickConfig:
    """``framepack eval``'s default measurement (see :mod:`framepack.train.yardstick`)."""

    model: str = "tiny"
    split: str = "validation"  # "validation" (choosing models and settings) or "test" (once per shipped model)
    # the world's sampler (world.STARTS): "determined" (the default since 2026-12-06) fixes speed and bounce
    # heading, so the start frame and caption determine the clip; "independent" draws them; "by-motion" is the first world
    start: str = "determined"
    start_frames: int = 10  # caption control: start frames, each with every caption that applies
    caption_seconds: float = 2.0
    long_videos: int = 4  # scenes for shape fidelity, persistence and drift
    long_offset: int = 0  # the long videos' scenes start at this index: a fresh batch of the split for a later choice
    shape_seconds: tuple[float, ...] = (5.0, 30.0)
    persistence_seconds: tuple[float, ...] = (30.0, 60.0)
    drift_seconds: float = 30.0  # the long videos of this length are also made with vanilla sampling; 0: not
    steps: int | None = None  # None: the model's own
    cfg: float | None = None
    seed: int = 0
    workdir: str | None = None

    def __post_init__(self) -> None:
        if self.split not in ("validation", "test"):
            raise ValueError(f"split must be validation or test, got {self.split!r}")
        if self.start not in world.STARTS:
            raise ValueError(f"start must be one of {world.STARTS}, got {self.start!r}")
        if self.start_frames < 0 or self.long_videos < 0 or (self.steps is not None and self.steps < 1):
            raise ValueError("start frames and long videos must be >= 0, steps >= 1")
        if self.long_offset < 0:
            raise ValueError(f"the long videos' offset must be >= 0, got {self.long_offset}")
        if self.start_frames == 0 and self.long_videos == 0:
            raise ValueError("nothing to measure: start frames and long videos are both 0")
        lengths = (self.caption_seconds, *self.shape_seconds, *self.persistence_seconds)
        if not all(math.isfinite(s) and s > 0 for s in lengths):
            raise ValueError(f"video lengths must be finite numbers > 0 s, got {lengths}")
        if self.drift_seconds and self.drift_seconds not in (*self.shape_seconds, *self.persistence_seconds):
            raise ValueError(f"drift seconds {self.drift_seconds:g} must be one of the long videos' lengths "
                             f"{sorted({*self.shape_seconds, *self.persistence_seconds})} (or 0)")
        if self.cfg is not None and not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"cfg must be a finite number >= 0, got {self.cfg}")

    def long_scenes(self) -> list[world.WorldParams]:
        """The long videos' scenes: the split's, after the first ``long_offset``."""
        return yardstick.long_scenes(self.split, self.long_offset + self.long_videos, self.start)[self.long_offset:]

    def videos(self) -> int:
        """How many videos the run makes."""
        starts = world.scenes(self.split, self.start_frames, self.start) if self.start_frames else []
        per_scene = len({*self.shape_seconds, *self.persistence_seconds}) + (1 if self.drift_seconds else 0)
        return sum(len(world.applicable_motions(p)) for p in starts) + self.long_videos * per_scene


@dataclass
class YardstickResult:
    config: dict
    captions: list[dict] = field(default_factory=list)  # per (start frame, caption): yardstick.CaptionTrial
    long: list[dict] = field(default_factory=list)  # per long video in the model's mode
    vanilla: list[dict] = field(default_factory=list)  # per long video with vanilla sampling (drift only)

    def trials(self) -> list[yardstick.CaptionTrial]:
        return [yardstick.CaptionTrial(**t) for t in self.captions]

    def summary(self) -> dict:
        """The table's numbers: counts, estimates and 95% intervals."""
        trials = self.trials()
        right = sum(t.right for t in trials)
        out: dict = {"caption_control": {
            "right": right, "trials": len(trials), "start_frames": len({t.start for t in trials}),
            "accuracy": right / len(trials) if trials else math.nan, "interval": yardstick.wilson(right, len(trials)),
            "chance": yardstick.chance(trials), "confusion": yardstick.confusion(trials)}}
        for key, lengths in (("iou", self.config["shape_seconds"]), ("centred_iou", self.config["shape_seconds"]),
                             ("persistence", self.config["persistence_seconds"])):
            for seconds in lengths:
                values = yardstick.column(self.long, key, seconds)
                out[f"{key}@{seconds:g}s"] = {"videos": len(values), **dict(zip(
                    ("mean", "low", "high"), yardstick.mean_interval(values)))}
        for rows, mode in ((self.long, "model"), (self.vanilla, "vanilla")):
            for key in ("sharpness_drift", "colour_drift"):
                values = yardstick.column(rows, key, self.config["drift_seconds"])
                out[f"{key}/{mode}"] = {"videos": len(values), **dict(zip(
                    ("mean", "low", "high"), yardstick.mean_interval(values)))}
        return out


def _drifts(frames: np.ndarray) -> dict[str, float]:
    return {"sharpness_drift": drift(sharpness(frames)), "colour_drift": drift(colourfulness(frames))}


def measure(config: YardstickConfig, generate: yardstick.Generator, vanilla: yardstick.Generator | None = None,
            progress: Callable[[str], None] = lambda s: None) -> YardstickResult:
    """The yardstick on any generator (the model's in its own mode, and ``vanilla`` for the drift
    comparison): what ``framepack eval`` runs, and what the tests run on the negative controls."""
    result = YardstickResult(config=asdict(config))
    if config.start_frames:
        starts = world.scenes(config.split, config.start_frames, config.start)
        trials = yardstick.caption_control(generate, starts, config.caption_seconds, config.seed, progress)
        result.captions = [asdict(t) for t in trials]
    if config.long_videos:
        scenes = config.long_scenes()
        seed = config.seed + 1000
        result.long = yardstick.long_videos(generate, scenes, config.shape_seconds, config.persistence_seconds,
                                            seed, _drifts, progress)
        if vanilla is not None and config.drift_seconds:
            result.vanilla = yardstick.long_videos(vanilla, scenes, (), (config.drift_seconds,), seed, _drifts, progress)
    return result


def pipeline_generator(pipeline, config: YardstickConfig, root: Path, mode: str | None = None,
                       count: Iterator[int] | None = None) -> yardstick.Generator:
    """A :data:`yardstick.Generator` that makes each video with ``pipeline`` (a FramePackPipeline)
    at ``config``'s steps and cfg, in ``mode`` (None: the model's default for the video's length),
    in its own job directory under ``root`` (numbered by ``count``)."""
    config = _as_run(config, pipeline.c.source)  # the model's own steps and cfg where the config has none
    count = itertools.count() if count is None else count

    def generate(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        return _video(pipeline, config, first, caption, seconds, mode, seed, root / f"video-{next(count):04d}")
    return generate


def run_yardstick(config: YardstickConfig, pipeline, progress: Callable[[str], None] = lambda s: None) -> YardstickResult:
    """Generate every video with ``pipeline`` (a FramePackPipeline) and measure it."""
    config = _as_run(config, pipeline.c.source)
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(config.workdir) if config.workdir else Path(scratch)
        count = itertools.count()
        return measure(config, pipeline_generator(pipeline, config, base, None, count),
                       pipeline_generator(pipeline, config, base, "vanilla", count), progress)


def _interval(row: dict, digits: int = 3) -> str:
    return "n/a" if math.isnan(row["low"]) else f"{row['low']:.{digits}f}-{row['high']:.{digits}f}"


def format_yardstick(result: YardstickResult) -> str:
    """The yardstick's table (and the caption control's confusion matrix), Markdown."""
    c, s = result.config, result.summary()
    cc = s["caption_control"]
    lines = [
        (f"model {c['model']}, {c['steps']} steps, cfg {1.0 if c.get('cfg') is None else c['cfg']:g}, seeds from "
         f"{c['seed']}, {c['split']} split, {c['start']} starts"),
        "",
        "| measurement | value | 95% interval | n |",
        "|---|---|---|---|",
    ]
    if cc["trials"]:
        low, high = cc["interval"]
        lines += [
            (f"| caption control: motion shown = motion captioned ({c['caption_seconds']:g} s videos) | "
             f"{100 * cc['accuracy']:.1f}% | {100 * low:.1f}-{100 * high:.1f}% (Wilson) | "
             f"{cc['right']}/{cc['trials']} captions on {cc['start_frames']} start frames |"),
            f"| ... chance (a caption-blind generator's best) | {100 * cc['chance']:.1f}% | | |",
        ]
    for key, name in (("iou", "shape IoU in place"), ("centred_iou", "shape IoU centred"),
                      ("persistence", "persistence (share of frames at 1/4-4x the true area)")):
        for label, row in s.items():
            if label.startswith(key + "@"):
                seconds = label.split("@")[1].removesuffix("s")
                lines.append(f"| {name}, {seconds} s videos | {row['mean']:.3f} | {_interval(row)} (bootstrap) | "
                             f"{row['videos']} videos |")
    if c["drift_seconds"] and result.long:
        for key, name in (("sharpness_drift", "sharpness drift"), ("colour_drift", "colour drift")):
            model, vanilla = s[f"{key}/model"], s[f"{key}/vanilla"]
            lines.append(f"| {name}, {c['drift_seconds']:g} s, model's mode / vanilla (lower is better) | "
                         f"{model['mean']:.3f} / {vanilla['mean']:.3f} | {_interval(model)} / {_interval(vanilla)} | "
                         f"{model['videos']} / {vanilla['videos']} videos |")
    if cc["trials"]:
        seen = [m for m in (*world.MOTIONS, yardstick.LOST) if any(m in row for row in cc["confusion"].values())]
        lines += ["", "Caption control, confusion matrix (rows: the caption's motion; columns: the motion shown):", "",
                  "| caption \\ shown | " + " | ".join(seen) + " |", "|---|" + "---|" * len(seen)]
        for motion, row in cc["confusion"].items():
            lines.append(f"| {motion} | " + " | ".join(str(row.get(m, 0)) for m in seen) + " |")
    return "\n".join(lines)


# ---- the command's options --------------------------------------------------------------------------------

YARDSTICKS = ("caption", "direction")
_DIRECTION_ONLY = ("prompts", "seconds", "long_seconds")
_CAPTION_ONLY = ("start", "start_frames", "caption_seconds", "long_offset", "shape_seconds", "persistence_seconds",
                 "drift_seconds")


def _lengths(text: str, what: str) -> tuple[float, ...]:
    """'5,30' -> (5.0, 30.0)."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--{what} takes seconds separated by commas (e.g. 5,30), got {text!r}") from None


def config_from_options(yardstick_name: str | None, **options) -> EvalConfig | YardstickConfig:
    """``framepack eval``'s options (None: not given) as the config of ``yardstick_name``; an option
    of the other yardstick is refused, naming it. Without a yardstick named, an option only the
    first one has (``--prompts``, ``--seconds``, ``--long-seconds``) chooses it, so its published
    commands (``framepack eval --prompts 100 --long-videos 2``) still make its table; else "caption"."""
    if yardstick_name is None:
        yardstick_name = "direction" if any(options.get(name) is not None for name in _DIRECTION_ONLY) else "caption"
    if yardstick_name not in YARDSTICKS:
        raise ValueError(f"--yardstick must be one of {YARDSTICKS}, got {yardstick_name!r}")
    foreign = _CAPTION_ONLY if yardstick_name == "direction" else _DIRECTION_ONLY
    given = [name for name in foreign if options.get(name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        other = "caption" if yardstick_name == "direction" else "direction"
        raise ValueError(f"{flag} is an option of --yardstick {other}, not of --yardstick {yardstick_name}")
    chosen = {k: v for k, v in options.items() if v is not None and k not in foreign}
    if yardstick_name == "direction":
        return EvalConfig(**chosen)
    for name in ("shape_seconds", "persistence_seconds"):
        if name in chosen:
            chosen[name] = _lengths(chosen[name], name.replace("_", "-"))
    return YardstickConfig(**chosen)
