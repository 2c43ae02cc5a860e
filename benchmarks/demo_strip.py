"""The README demo as a strip of frames, and whether its shape holds from the first frame to the last.

Makes exactly the video of ``framepack demo`` (the bundled start image and prompt, the demo model's
defaults and step cache), writes ``--strip PNG`` (every ``--every`` seconds, the last frame
included, side by side) and prints, per strip frame, the orange object's area and shape against the
first frame's: the prompt moves a triangle without turning or resizing it, so its mask, centred on
its centroid, must keep overlapping the first frame's (IoU 1.0 for a perfect model; an object that
softens into a blob, splits or vanishes falls well below).

    python benchmarks/demo_strip.py --strip docs/screenshots/demo-strip.png --doc docs/demo-model.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from framepack.demo import demo_settings
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.train import world, yardstick
from framepack.video import read_frames

FPS = 30
COLOUR = "orange"  # the demo prompt's object


def strip_indices(frames: int, every: float) -> list[int]:
    """Frame indices every ``every`` seconds, with the last frame always included."""
    step = max(1, round(every * FPS))
    indices = list(range(0, frames, step))
    return indices if indices[-1] == frames - 1 else indices + [frames - 1]


def shape_rows(frames: np.ndarray, indices: list[int]) -> list[tuple[float, float, float]]:
    """(seconds, area / first area, centred IoU with the first frame's mask) per strip frame."""
    masks = yardstick.object_masks(frames[indices], world.PALETTE[COLOUR])
    first = masks[:1][[0] * len(indices)]
    centred = yardstick.centred(masks, yardstick.centroids(first))
    overlap = yardstick.iou(centred, first)
    area = masks.sum(axis=(1, 2)) / max(1, int(masks[0].sum()))
    return [(i / FPS, float(a), float(o)) for i, a, o in zip(indices, area, overlap)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip", default="docs/screenshots/demo-strip.png", help="the PNG to write")
    parser.add_argument("--every", type=float, default=0.6, help="seconds between strip frames (default 0.6)")
    parser.add_argument("--model", default="tiny", help="the model (default tiny, the demo's)")
    parser.add_argument("--cache", default="model", help="step cache (default: the model's own, as the demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--doc", help="write the table between this doc's bench:demo-strip markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = demo_settings(model=args.model, cache=args.cache)
    with tempfile.TemporaryDirectory(prefix="framepack-demo-strip-") as scratch:
        job = JobDir.create(Path(scratch) / "demo.job", settings, Path(scratch) / "demo.mp4")
        frames = read_frames(FramePackPipeline.from_model(settings.model).run(job))
    indices = strip_indices(len(frames), args.every)
    Path(args.strip).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([frames[i] for i in indices], axis=1)).save(args.strip)
    rows = shape_rows(frames, indices)
    lines = [f"`framepack demo` ({settings.prompt!r}, seed {settings.seed}, model {settings.model}, its default "
             f"cfg, cache {settings.cache}): {len(frames)} frames; the strip `{args.strip}` shows the frames at these times.",
             "", "| second | object area / first frame's | shape: centred IoU with the first frame |", "|---|---|---|"]
    lines += [f"| {t:.1f} | {a:.2f} | {o:.2f} |" for t, a, o in rows]
    lines += ["", f"Lowest shape IoU: {min(o for _, _, o in rows):.2f}; area from {min(a for _, a, _ in rows):.2f} "
                  f"to {max(a for _, a, _ in rows):.2f} of the first frame's."]
    sys.path.insert(0, str(Path(__file__).parent))
    from doctable import publish  # beside this script

    publish("\n".join(lines), Path(args.doc) if args.doc else None, "demo-strip",
            "python benchmarks/demo_strip.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
