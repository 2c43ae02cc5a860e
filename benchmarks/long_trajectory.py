"""Where a translated object is over a long video: its tracked displacement against the world's.

Inverted sampling tells each section how far it is from the start frame only through the blank RoPE
gap between them. In the released layout every middle section of a long video gets the same gap
(2 windows), so it shows the object where it would be about 2.4 s after the start: the motion
stops for most of the video and catches up at the end. A model trained with
``TransformerConfig.max_inverted_padding`` reads the true distance instead
(docs/training-gen2.md, "Long inverted videos").

For each model, validation scenes of the independent-start world whose caption is a translation
(left, right, up, down), each made once at the model's default settings for the length (seed
``--seed`` + i). Per time: the mean displacement of the tracked object along its caption's direction
(pixels), the world's own (the object stops at the border), and the mean in-place IoU. Prints a
table; ``--update-doc FILE`` writes it between the file's ``bench:NAME`` markers.

    python benchmarks/long_trajectory.py --models tiny --update-doc docs/training-gen2.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from framepack.pipeline import FramePackPipeline
from framepack.train import world, yardstick
from framepack.train.evaluate import YardstickConfig, pipeline_generator

DIRECTION = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


def translations(split: str, n: int) -> list[world.WorldParams]:
    """The first ``n`` scenes of ``split`` (independent starts) whose motion is a translation."""
    pool = world.scenes(split, 40 * n + 40, "independent")
    chosen = [p for p in pool if p.motion in DIRECTION][:n]
    if len(chosen) < n:
        raise SystemExit(f"only {len(chosen)} translations among the {len(pool)} {split} scenes drawn")
    return chosen


def along(track: np.ndarray, motion: str) -> np.ndarray:
    """Displacement from the first frame along the caption's direction, per frame (pixels)."""
    return (track - track[0]) @ np.array(DIRECTION[motion])


def measure(model: str, scenes: list[world.WorldParams], seconds: float, seed: int, root: Path):
    """(tracked displacement, true displacement, in-place IoU), each (videos, frames)."""
    pipeline = FramePackPipeline.from_model(model)
    generate = pipeline_generator(pipeline, YardstickConfig(model=model), root / Path(model).name)
    tracked, true, ious = [], [], []
    for i, p in enumerate(scenes):
        frames = generate(world.render(p, 1)[0], world.caption(p), seconds, seed + i)
        rgb = world.PALETTE[p.color]
        tracked.append(along(yardstick.centroids(yardstick.object_masks(frames, rgb)), p.motion))
        true.append(along(yardstick.centroids(yardstick.true_masks(p, len(frames), frames.shape[2])), p.motion))
        ious.append(yardstick.shape_ious(frames, p)[0])
        print(f"{model}: video {i + 1}/{len(scenes)} ({world.caption(p)})", file=sys.stderr, flush=True)
    return np.array(tracked), np.array(true), np.array(ious)


def table(results: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], every: float) -> str:
    names = list(results)
    truth = next(iter(results.values()))[1]  # the same scenes and lengths for every model
    header = "| second | the world: displacement (px) | " + " | ".join(
        f"`{n}`: displacement (px) | `{n}`: IoU in place" for n in names) + " |"
    lines = [header, "|---|---|" + "---|---|" * len(names)]
    frames = truth.shape[1]
    for second in np.arange(0.0, (frames - 1) / world.FPS + 1e-9, every):
        k = min(frames - 1, int(round(second * world.FPS)))
        cells = [f"{np.nanmean(results[n][0][:, k]):.1f} | {np.nanmean(results[n][2][:, k]):.2f}" for n in names]
        lines.append(f"| {second:g} | {np.nanmean(truth[:, k]):.1f} | " + " | ".join(cells) + " |")
    means = [f"{np.nanmean(results[n][2]):.3f}" for n in names]
    lines.append("| mean over the video | | " + " | ".join(f" | {m}" for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny"])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--seed", type=int, default=500)
    parser.add_argument("--every", type=float, default=3.0, help="a row every this many seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="long_trajectory", help="the doc's bench marker name")
    parser.add_argument("--update-doc", dest="doc", help="write the table between this doc's bench:NAME markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scenes = translations(args.split, args.videos)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="framepack-trajectory-") as scratch:
        results = {m: measure(m, scenes, args.seconds, args.seed, Path(scratch)) for m in args.models}
    setup = (f"{args.videos} {args.split} translations of the independent-start world, {args.seconds:g} s each at "
             f"each model's defaults (seeds from {args.seed}), CPU threads: {args.threads}, "
             f"{(time.perf_counter() - began) / 60:.1f} min. Displacement: the object's centroid along its "
             "caption's direction from the first frame, mean over the videos.")
    from doctable import publish  # beside this script

    command = "python benchmarks/long_trajectory.py " + " ".join(sys.argv[1:])
    publish(setup + "\n\n" + table(results, args.every), Path(args.doc) if args.doc else None, args.name,
            command.strip())


if __name__ == "__main__":
    main()
