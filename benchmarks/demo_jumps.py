"""Does the demo's object move steadily, or jump? The largest frame-to-frame step of its centroid.

The yardstick's IoU averages a jump away (a frame or two of an object in the wrong place), but a
viewer sees it. For each model and seed, the video of ``framepack demo`` (the bundled scene and
prompt, the model's defaults, the given seed) is tracked as the yardstick tracks objects
(``yardstick.object_masks`` in the scene's colour) and its centroid's steps between consecutive
frames are compared with the world's analytic truth of the same scene: the largest step (px, at
128 px) and the frames whose step exceeds 8 times the true largest step (jumps: a latent
holds 4 frames, so steps of 4 frames' motion are the decoder's judder).

Controls, on the same scene: the world's own clip (steps as the truth: no jump), the start frame
frozen (no step at all), and the world's clip with a pause and a catch-up (frames 60-89 held at
frame 60, then the true frame 90: one jump of 30 frames' motion), which the measurement must catch.

    python benchmarks/demo_jumps.py --models tiny tiny-fast --doc docs/demo-model.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_strip import demo_scene
from doctable import publish

from framepack.demo import demo_settings
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.train import world, yardstick
from framepack.video import FPS, read_frames

JUMP = 8.0  # a jump: a step of over 8 frames' true motion (a latent holds 4 frames, and a decoder that
# moves the object once per latent makes steps of 4: judder, not a jump)
PAUSE = (60, 90)  # the catch-up control's held frames


def steps(frames: np.ndarray, scene: world.WorldParams) -> np.ndarray:
    """Per pair of consecutive frames, the centroid's step in px (NaN where either frame lost the object)."""
    masks = yardstick.object_masks(frames, world.PALETTE[scene.color])
    centres = yardstick.centroids(masks)  # NaN rows where nothing was tracked
    return np.linalg.norm(np.diff(centres, axis=0), axis=1)


def row(label: str, frames: np.ndarray, truth: float, scene: world.WorldParams) -> str:
    s = steps(frames, scene)
    lost = int(np.isnan(s).sum())
    if np.all(np.isnan(s)):
        return f"| {label} | n/a | n/a | 0 | {lost} |"
    at = int(np.nanargmax(s))
    return (f"| {label} | {np.nanmax(s):.1f} | {(at + 1) / FPS:.2f} s | {int(np.nansum(s > JUMP * truth))} | "
            f"{lost} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "tiny-fast"], help="model names or directories")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the demo's seed and 1-6")
    parser.add_argument("--mode", help="sampling mode (default: the model's own, as the demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", type=Path, help="write the table between this doc's bench:NAME markers")
    parser.add_argument("--name", default="demo-jumps", help="the markers' NAME (default demo-jumps)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or [demo_settings().seed, *range(1, 7)]
    scene = demo_scene()
    videos: list[tuple[str, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="framepack-demo-jumps-") as scratch:
        for model in args.models:
            pipeline = FramePackPipeline.from_model(model)
            for seed in seeds:
                settings = demo_settings(model=model, seed=seed, cache="model")  # exactly `framepack demo --seed`
                settings = settings.replace(mode=args.mode) if args.mode else settings
                job = JobDir.create(Path(scratch) / f"{len(videos)}.job", settings, Path(scratch) / f"{len(videos)}.mp4")
                videos.append((f"`{model}`, seed {seed}", read_frames(pipeline.run(job))))
                print(videos[-1][0], file=sys.stderr, flush=True)
    clip = world.render(scene, len(videos[0][1]))  # the truth, as long as the demo's video
    truth = float(np.nanmax(steps(clip, scene)))
    paused = clip.copy()
    paused[PAUSE[0]:PAUSE[1]] = clip[PAUSE[0]]
    mode = f", mode {args.mode}" if args.mode else ""
    lines = [(f"`framepack demo`'s scene and prompt ({len(clip)} frames at 128 px{mode}), seeds {', '.join(map(str, seeds))}; "
              f"the centroid of the object tracked in the scene's colour. The true largest step is {truth:.1f} px "
              f"a frame; a jump is a step over {JUMP:g} times that ({JUMP * truth:.1f} px)."),
             "", "| video | largest step (px) | at | jumps | frames without the object |", "|---|---|---|---|---|",
             row("control: the world's own clip", clip, truth, scene),
             row("control: the start frame, frozen", np.repeat(clip[:1], len(clip), axis=0), truth, scene),
             row(f"control: the world's clip paused at frames {PAUSE[0]}-{PAUSE[1] - 1}, then caught up", paused, truth,
                 scene)]
    lines += [row(label, frames, truth, scene) for label, frames in videos]
    publish("\n".join(lines), args.doc, args.name, "python benchmarks/demo_jumps.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
