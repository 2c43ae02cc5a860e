"""``framepack eval``: the demo model on held-out scenes of the synthetic world.

Three measurements, each on frames decoded from the generated mp4 (what a user gets):

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

import json
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import world

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
    pool = [p for p in world.held_out(16 * n) if p.motion not in world.PANS]
    chosen: list[world.WorldParams] = []
    for p in pool:  # round-robin over motions, so a handful of videos covers the variety
        if p.motion not in {c.motion for c in chosen}:
            chosen.append(p)
        if len(chosen) == n:
            return chosen
    return (chosen + [p for p in pool if p not in chosen])[:n]


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    model: str = "tiny"
    prompts: int = 50
    seconds: float = 2.0
    long_videos: int = 6
    long_seconds: float = 30.0
    steps: int = 25
    cfg: float | None = None  # real classifier-free guidance (negative prompt ""); None: the model's own
    seed: int = 0
    workdir: str | None = None  # keep the videos here (default: a temporary directory)
    split: str = "held-out"  # the direction scenes: "held-out" (reported) or "validation" (for choosing)

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.long_videos < 0 or self.steps < 1:
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
    from PIL import Image

    from ..jobs import JobDir
    from ..settings import GenerationSettings
    from ..video import read_frames

    root.mkdir(parents=True, exist_ok=True)
    image = root / "start.png"
    Image.fromarray(world.render(params, 1)[0]).save(image)
    settings = GenerationSettings(image=str(image), prompt=world.caption(params), model=config.model, seconds=seconds,
                                  steps=config.steps, cfg=config.cfg, seed=seed, mode=mode, crf=10)
    job = JobDir.create(root / "job", settings, root / "video.mp4")
    pipeline.run(job)
    return read_frames(job.out)


def run_eval(config: EvalConfig, pipeline, progress: Callable[[str], None] = lambda s: None) -> EvalResult:
    """Generate every case with ``pipeline`` (a FramePackPipeline) and measure it."""
    config = replace(config, cfg=pipeline.c.source.cfg(config.cfg))  # the scale that runs, for the record
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


def save(result: EvalResult, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
    tmp.replace(path)
