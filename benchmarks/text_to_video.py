"""Text-to-video on the demo models (issue 20.3): does a video made without a start image show its caption?

For each validation scene of the world (one per motion first, so the set is balanced over the 11
motions), the model makes a video from the caption alone (no ``--image``: a mid-grey first frame)
and, as the reference, from the scene's own start frame and the same caption. The yardstick's
classifier (``yardstick.classify_motion``) reads the motion from 1.2 s on (after the first
section, where a text-to-video object has had time to form) against the caption's colour:
"drawn" is an object of that colour tracked in the window, "right" the caption's motion shown.

Controls, on the same window and scenes: the world's own clip of each caption (the classifier's
ceiling on this window), a caption-blind generator (the world's clip of one fixed motion whatever the
caption says: right for 1 caption in 11) and the grey frame itself, frozen (nothing drawn).

Run: ``python benchmarks/text_to_video.py [--models tiny tiny-fast] [--scenes 22] [--doc docs/generation.md]``
(about 10 min on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from doctable import publish

from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline, blank_start_frame
from framepack.settings import GenerationSettings
from framepack.train import world, yardstick
from framepack.video import read_frames

SECONDS = 3.6  # three sections: the window read is the last two (2.4 s, what the classifier needs)
SKIP = 36  # frames of the first section (1.2 s at 30 fps)
BLIND_MOTION = "left"  # the caption-blind control's one motion


def judge(frames: np.ndarray, p: world.WorldParams) -> str:
    """The motion the classifier reads from 1.2 s on, for the caption's colour ("lost": not drawn)."""
    return yardstick.classify_motion(frames[SKIP:], world.PALETTE[p.color])


def generate(pipeline: FramePackPipeline, name: str, folder: Path, p: world.WorldParams, seed: int,
             image: Path | None) -> np.ndarray:
    settings = GenerationSettings(image=str(image) if image else None, prompt=world.caption(p), model=name,
                                  seconds=SECONDS, steps=pipeline.c.source.steps(None), seed=seed, crf=10)
    job = JobDir.create(folder / "job", settings, folder / "video.mp4")
    return read_frames(pipeline.run(job))


def controls(scenes: list[world.WorldParams]) -> dict[str, list[str]]:
    count = yardstick.frame_count(SECONDS)
    grey = np.repeat(blank_start_frame(world.SIZE)[None], count, axis=0)  # text-to-video's first frame
    return {
        "the world's own clip (ceiling)": [judge(world.render(p, count), p) for p in scenes],
        f"caption-blind (the world's clip, always '{BLIND_MOTION}')":
            [judge(world.render(world.with_motion(p, BLIND_MOTION), count), p) for p in scenes],
        "the grey first frame, frozen": [judge(grey, p) for p in scenes],
    }


def measure(models: list[str], scenes: list[world.WorldParams]) -> dict[str, list[str]]:
    """Row label -> what the classifier read, per scene."""
    rows = controls(scenes)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        starts = [folder / f"start-{i}.png" for i in range(len(scenes))]
        for start, p in zip(starts, scenes, strict=True):
            Image.fromarray(world.render(p, 1)[0]).save(start)
        for name in models:
            pipeline = FramePackPipeline.from_model(name)
            source = pipeline.c.source
            label = f"`{name}` ({source.steps(None)} steps, cfg {source.cfg(None):g})"
            text, image = [], []
            for i, (p, start) in enumerate(zip(scenes, starts, strict=True)):
                text.append(judge(generate(pipeline, name, folder / f"{name}-t2v-{i}", p, i, None), p))
                image.append(judge(generate(pipeline, name, folder / f"{name}-i2v-{i}", p, i, start), p))
                print(f"{name} {i + 1}/{len(scenes)} '{world.caption(p)}': text {text[-1]}, image {image[-1]}",
                      file=sys.stderr, flush=True)
            rows[f"{label}, text only"] = text
            rows[f"{label}, from the scene's start frame"] = image
    return rows


def table(rows: dict[str, list[str]], scenes: list[world.WorldParams]) -> str:
    motions = [p.motion for p in scenes]
    lines = [(f"{len(scenes)} validation scenes of the world (each of the {len(set(motions))} motions "
              f"{len(scenes) // len(set(motions))} times), {SECONDS:g} s videos, seed = the scene's index; "
              f"the motion read from {SKIP / world.FPS:g} s on. Wilson 95% intervals."),
             "",
             "| generator | object drawn | caption's motion shown | 95% interval | what it showed most |",
             "|---|---|---|---|---|"]
    for label, got in rows.items():
        drawn = sum(g != yardstick.LOST for g in got)
        right = sum(g == m for g, m in zip(got, motions, strict=True))
        low, high = yardstick.wilson(right, len(got))
        common = ", ".join(f"{k} {v}" for k, v in Counter(got).most_common(3))
        lines.append(f"| {label} | {drawn}/{len(got)} | {right}/{len(got)} = {100 * right / len(got):.0f}% | "
                     f"{100 * low:.0f}-{100 * high:.0f}% | {common} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-fast"])
    parser.add_argument("--scenes", type=int, default=22, help="validation scenes (default 22: each motion twice)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", type=Path, help="write the table between this Markdown file's bench:text-to-video markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pool = world.scenes("validation", 40 * args.scenes, "independent")
    scenes = yardstick.one_per_motion_first(pool, len(world.MOTIONS))
    while len(scenes) < args.scenes:  # again one per motion, from the scenes not yet taken
        scenes += yardstick.one_per_motion_first([p for p in pool if p not in scenes], len(world.MOTIONS))
    scenes = scenes[: args.scenes]
    rows = measure(args.models, scenes)
    command = "python benchmarks/text_to_video.py" + (
        f" --models {' '.join(args.models)}" if args.models != ["tiny", "tiny-fast"] else "") + (
        f" --scenes {args.scenes}" if args.scenes != 22 else "") + (f" --doc {args.doc}" if args.doc else "")
    publish(table(rows, scenes), args.doc, "text-to-video", command)


if __name__ == "__main__":
    main()
