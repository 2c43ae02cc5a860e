"""The LoRA proof of issue 19.5: teach the demo model a concept its world lacks, an object that blinks.

Steps, as a user runs them (docs/training-your-videos.md, "Proof: a concept the demo world lacks"):

1. ``python benchmarks/concept_lora.py render DIR``: the user's folder, ``--clips`` mp4s of a world
   object blinking in place (:mod:`framepack.train.concept`) with same-name ``.txt`` captions
   ("a red square blinks on a plain gray background"). Their start frames come from the world's
   ``train`` split (:func:`world.stream`, the ``independent`` sampler), so no start frame of the
   ``validation`` or ``test`` split is ever in the folder. Beside each blinking clip, the world's own
   clip of the same start frame with its own caption (``--world-clips``, 32 by default): trained on
   blinks alone, a LoRA blinks whatever the caption says.
2. ``framepack dataset prepare DIR --model tiny --out blink-data --max-frames 49`` (the folder the config reads) and
   ``framepack train configs/lora_concept.json``.
3. ``python benchmarks/concept_lora.py evaluate --lora runs/lora-concept/final/lora.safetensors``:
   ``--videos`` start frames of the ``test`` split (``validation`` to tune, with ``--split``), each
   generated once with the LoRA and once without, from the same start frame, blink caption and seed
   (seeds ``--seed``, ``--seed + 1``, ...; the training never saw them), 1.2 s (one section, as
   the clips' first 37 frames); the detector (:func:`concept.detect_blink`) reads each video, and
   the table gives counts, rates and 95% Wilson intervals. ``--update-doc FILE`` writes it there.
   ``--seconds 2.4`` (two sections) and ``--caption still`` (the world's "stays still" caption) ask
   what the LoRA does beyond what it was trained on; each table has markers of its own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from doctable import publish

from framepack.planning import frame_count, latent_count, section_count
from framepack.train import concept, world
from framepack.train.yardstick import wilson

CLIP_FRAMES = 49  # 1 + 4 x 12: the clip's first section of 9 latents (37 frames) plus room (docs: prepare)
VIDEO_SECONDS = 1.2  # one section of the demo model: 37 frames
TRAIN_SEED = 19
SPLITS = ("validation", "test")


def training_scenes(clips: int, seed: int = TRAIN_SEED) -> list[world.WorldParams]:
    """The folder's scenes: ``clips`` distinct start frames of the world's ``train`` split."""
    chosen: dict[tuple, world.WorldParams] = {}
    for p in world.stream(seed, start="independent"):
        if len(chosen) == clips:
            return list(chosen.values())
        chosen.setdefault(world.start_frame_key(p), p)
    raise AssertionError("world.stream is endless")


def render_folder(out: Path, clips: int, world_clips: int = 0, seed: int = TRAIN_SEED) -> list[Path]:
    """Write a blinking clip (mp4 + caption .txt) of each of :func:`training_scenes` and, for the
    first ``world_clips`` of them, the world's own clip of that start frame (its sampled motion, its
    caption): the same image with another caption makes another video, so the LoRA has a reason to
    read the caption rather than blink whatever it says."""
    from framepack.video import write_segment

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, p in enumerate(training_scenes(clips, seed)):
        jobs = [("blink", concept.render(p, CLIP_FRAMES), concept.caption(p))]
        if i < world_clips:
            jobs.append(("world", world.render(p, CLIP_FRAMES), world.caption(p)))
        for kind, frames, caption in jobs:
            clip = out / f"{kind}-{i:03d}.mp4"
            write_segment(clip, frames)
            clip.with_suffix(".txt").write_text(caption + "\n")
            written.append(clip)
    return written


@dataclass(frozen=True)
class Trial:
    """What ``evaluate`` generates: ``videos`` start frames of ``split``, seeds ``seed``, ``seed + 1``, ...,
    ``seconds`` long, with the blink caption (``caption="blink"``) or the world's own caption of the
    object standing still (``"still"``: does the LoRA blink where the prompt does not ask?)."""

    split: str = "test"
    videos: int = 20
    seed: int = 1000
    steps: int = 25
    seconds: float = VIDEO_SECONDS
    caption: str = "blink"

    @property
    def name(self) -> str:
        """The table's marker and the videos' prefix: the proof's own trial is plain ``concept-lora``."""
        default = Trial(split=self.split, videos=self.videos, seed=self.seed, steps=self.steps)
        return "concept-lora" if self == default else f"concept-lora-{self.caption}-{self.seconds:g}s"

    def prompt(self, p: world.WorldParams) -> str:
        return concept.caption(p) if self.caption == "blink" else world.caption(concept.blinking(p))


def generate(pipeline, folder: Path, name: str, p: world.WorldParams, prompt: str, seed: int, lora: Path | None,
             trial: Trial) -> np.ndarray:
    """One video from ``p``'s start frame and ``prompt`` through the public pipeline: (T, H, W, 3) uint8."""
    from PIL import Image

    from framepack.jobs import JobDir
    from framepack.settings import GenerationSettings, LoraChoice
    from framepack.video import read_frames

    image = folder / f"{name}.png"
    Image.fromarray(world.render(p, 1)[0]).save(image)
    loras = (LoraChoice(str(lora), 1.0),) if lora else ()
    settings = GenerationSettings(str(image), prompt, model="tiny", seconds=trial.seconds, steps=trial.steps,
                                  seed=seed, loras=loras, crf=10)
    job = JobDir.create(folder / f"{name}.job", settings, folder / f"{name}.mp4")
    return read_frames(pipeline.run(job))


def evaluate(lora: Path, trial: Trial, keep: Path) -> list[dict]:
    """Generate each held-out start frame with and without the LoRA and detect the blink in both."""
    from framepack.pipeline import FramePackPipeline

    pipeline = FramePackPipeline.from_model("tiny")
    keep.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, p in enumerate(world.scenes(trial.split, trial.videos, start="independent")):
        row = {"scene": i, "seed": trial.seed + i, "caption": trial.prompt(p)}
        for side, path in (("with", lora), ("without", None)):  # LoRA fused, then unfused: one load
            started = time.monotonic()
            frames = generate(pipeline, keep, f"{trial.name}-{trial.split}-{i:03d}-{side}", p, row["caption"],
                              row["seed"], path, trial)
            found = concept.detect_blink(frames, world.PALETTE[p.color])
            row[side] = {"detected": found.detected, "hidden": round(found.hidden, 3), "back": round(found.back, 3),
                         "seconds": round(time.monotonic() - started, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], trial: Trial, lora: Path) -> str:
    frames, sections = video_frames(trial.seconds), section_count(trial.seconds)
    length = "one section" if sections == 1 else f"{sections} sections"
    prompt = ("same blink caption" if trial.caption == "blink"
              else "same caption, the world's own for the object standing still (\"... stays still on ...\")")
    caption = (f"{len(rows)} start frames of the world's `{trial.split}` split (never in the training folder), each "
               f"generated with the LoRA (`{lora.name}`, scale 1) and without it, {prompt} and seed (one seed per "
               f"start frame), {trial.seconds:g} s ({frames} frames, {length}), {trial.steps} steps, the demo model's cfg "
               f"3; detected: the object's tracked area falls to <= {concept.HIDDEN_SHARE:g} of the start frame's for "
               f"{concept.HIDDEN_FRAMES} frames in a row and comes back to >= {concept.BACK_SHARE:g}:")
    lines = [caption,
             "",
             "| videos | blink detected | rate | 95% interval (Wilson) | median smallest area (share) |",
             "|---|---|---|---|---|"]
    for side in ("with", "without"):
        hits = sum(r[side]["detected"] for r in rows)
        low, high = wilson(hits, len(rows))
        hidden = float(np.median([r[side]["hidden"] for r in rows]))
        lines.append(f"| {side} the LoRA | {hits}/{len(rows)} | {100 * hits / len(rows):.0f}% | "
                     f"{100 * low:.0f}-{100 * high:.0f}% | {hidden:.2f} |")
    return "\n".join(lines)


def video_frames(seconds: float) -> int:
    """Frames of a demo-model video asked for ``seconds`` (whole sections, as the pipeline rounds)."""
    return frame_count(latent_count(section_count(seconds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="write the user's folder of blinking clips (mp4 + .txt)")
    render.add_argument("out", type=Path)
    render.add_argument("--clips", type=int, default=32, help="blinking clips")
    render.add_argument("--world-clips", type=int, default=32,
                        help="also the world's own clips of the first N start frames, with their captions")
    check = commands.add_parser("evaluate", help="detect the blink in videos made with and without the LoRA")
    check.add_argument("--lora", type=Path, required=True)
    check.add_argument("--videos", type=int, default=Trial.videos, help="start frames (each makes two videos)")
    check.add_argument("--split", choices=SPLITS, default=Trial.split, help="validation to tune, test to report")
    check.add_argument("--seed", type=int, default=Trial.seed)
    check.add_argument("--steps", type=int, default=Trial.steps)
    check.add_argument("--seconds", type=float, default=Trial.seconds, help="video length (1.2: one section)")
    check.add_argument("--caption", choices=("blink", "still"), default=Trial.caption,
                       help="the blink caption, or the world's 'stays still' one")
    check.add_argument("--keep", type=Path, default=Path("concept-videos"), help="where the videos are written")
    check.add_argument("--update-doc", dest="doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    if args.command == "render":
        clips = render_folder(args.out, args.clips, args.world_clips)
        print(f"{len(clips)} clips in {args.out}")
        return
    if not args.lora.is_file():
        parser.error(f"no LoRA file {args.lora}")
    trial = Trial(args.split, args.videos, args.seed, args.steps, args.seconds, args.caption)
    rows = evaluate(args.lora, trial, args.keep)
    (args.keep / f"{trial.name}-{trial.split}.json").write_text(json.dumps(rows, indent=1))
    changed = [f"--{field.name} {getattr(trial, field.name):g}" if isinstance(getattr(trial, field.name), float)
               else f"--{field.name} {getattr(trial, field.name)}"
               for field in fields(Trial) if getattr(trial, field.name) != getattr(Trial, field.name)]
    options = [f"--lora {args.lora}", *changed] + ([f"--update-doc {args.doc}"] if args.doc else [])
    publish(table(rows, trial, args.lora), args.doc, trial.name,
            "python benchmarks/concept_lora.py evaluate " + " ".join(options))


if __name__ == "__main__":
    main()
