"""The README demo as a strip of frames, and whether its shape holds from the first frame to the last.

Makes exactly the video of ``framepack demo`` (the bundled start image and prompt, the demo model's
defaults and step cache), writes ``--strip PNG`` (every ``--every`` seconds, the last frame
included, side by side) and prints, per strip frame, the tracked object against the world's
analytic ground truth of the bundled scene (``assets/demo/scene.json``, whose render is the start
image): its area, and its IoU in place and centred (as ``framepack eval``'s shape fidelity; 1.0 for
a perfect model, far below for an object that stalls, softens into a blob, splits or vanishes).

    python benchmarks/demo_strip.py --strip docs/screenshots/demo-strip.png --doc docs/demo-model.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from framepack.components import asset
from framepack.demo import demo_settings
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.train import world, yardstick
from framepack.video import FPS, read_frames


def demo_scene() -> world.WorldParams:
    """The world scene whose render is the bundled start image (``assets/demo/scene.json``)."""
    return world.WorldParams(**json.loads(asset("demo", "scene.json").read_text()))


def strip_indices(frames: int, every: float) -> list[int]:
    """Frame indices every ``every`` seconds, with the last frame always included."""
    step = max(1, round(every * FPS))
    indices = list(range(0, frames, step))
    return indices if indices[-1] == frames - 1 else indices + [frames - 1]


def shape_rows(frames: np.ndarray, indices: list[int], scene: world.WorldParams) -> list[tuple[float, ...]]:
    """(seconds, area / true area, IoU in place, centred IoU) per strip frame, against the truth."""
    in_place, aligned = yardstick.shape_ious(frames, scene)
    area = yardstick.object_masks(frames, world.PALETTE[scene.color]).sum(axis=(1, 2))
    true_area = yardstick.true_masks(scene, len(frames), frames.shape[2]).sum(axis=(1, 2))
    return [(i / FPS, float(area[i] / max(1, true_area[i])), float(in_place[i]), float(aligned[i])) for i in indices]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strip", default="docs/screenshots/demo-strip.png", help="the PNG to write")
    parser.add_argument("--every", type=float, default=0.6, help="seconds between strip frames (default 0.6)")
    parser.add_argument("--model", default="tiny-fast", help="the model (default tiny-fast, the demo's)")
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
    scene = demo_scene()
    rows = shape_rows(frames, indices, scene)
    lines = [(f"`framepack demo` ({settings.prompt!r}, seed {settings.seed}, model {settings.model}, its default "
              f"cfg, cache {settings.cache}): {len(frames)} frames; the strip `{args.strip}` shows the frames at "
              "these times. Against the world's render of the scene:"),
             "", "| second | area / true area | IoU in place | IoU centred |", "|---|---|---|---|"]
    lines += [f"| {t:.1f} | {a:.2f} | {p:.2f} | {c:.2f} |" for t, a, p, c in rows]
    lines += ["", (f"Lowest IoU in place {min(r[2] for r in rows):.2f}, centred {min(r[3] for r in rows):.2f}; "
                   f"area from {min(r[1] for r in rows):.2f} to {max(r[1] for r in rows):.2f} of the true area.")]
    sys.path.insert(0, str(Path(__file__).parent))
    from doctable import publish  # beside this script

    publish("\n".join(lines), Path(args.doc) if args.doc else None, "demo-strip",
            "python benchmarks/demo_strip.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
