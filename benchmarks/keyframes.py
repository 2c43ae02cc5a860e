"""Keyframes on the demo model: is the frame at a keyframe's time closer to the keyframe image?

For each keyframe case and seed, the same video (demo start image and prompt, 3.6 s = 3 sections,
inverted) is made with and without the keyframe, and the frame at the keyframe's section boundary
is compared with the keyframe image (PSNR, dB; higher is closer). The frame just after the boundary
(made by the next section, which the keyframe reaches only through the overlap blend) is shown too.

Cases: a world frame of another scene (what the demo model knows how to draw) and a synthetic image
unlike anything in its training (a flat yellow square on flat blue).

Run: ``python benchmarks/keyframes.py [--seeds 3] [--steps 25] [--update-doc docs/generation.md]``
(12 videos with the defaults: 3 seeds, each without a keyframe and with each of 3 cases).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from doctable import publish

from framepack.components import asset
from framepack.jobs import JobDir
from framepack.keyframes import Keyframe, snap_keyframes
from framepack.pipeline import FramePackPipeline
from framepack.settings import GenerationSettings
from framepack.train import world
from framepack.video import read_frames

SECONDS = 3.6  # three sections: a keyframe can sit at either inner boundary


@dataclass(frozen=True)
class Case:
    name: str
    seconds: float
    image: np.ndarray  # (128, 128, 3) uint8


def cases() -> list[Case]:
    other = world.WorldParams("circle", "green", "plain", "purple", "stay", x=0.3, y=0.6)
    synthetic = np.zeros((world.SIZE, world.SIZE, 3), np.uint8)
    synthetic[:] = (30, 60, 200)
    synthetic[40:88, 40:88] = (250, 250, 40)
    return [Case("world frame (green circle on purple)", 1.2, world.render(other, 1)[0]),
            Case("world frame (green circle on purple)", 2.4, world.render(other, 1)[0]),
            Case("synthetic (yellow square on blue)", 2.4, synthetic)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def video(pipeline: FramePackPipeline, folder: Path, name: str, settings: GenerationSettings) -> np.ndarray:
    job = JobDir.create(folder / f"{name}.job", settings, folder / f"{name}.mp4")
    return read_frames(pipeline.run(job))


def measure(seeds: int, steps: int) -> list[dict]:
    pipeline = FramePackPipeline.from_model("tiny")
    prompt = asset("demo", "prompt.txt").read_text().strip()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for seed in range(seeds):
            base = GenerationSettings(str(asset("demo", "start.png")), prompt, model="tiny", seconds=SECONDS,
                                      steps=steps, seed=seed, crf=0)
            plain = video(pipeline, folder, f"plain-{seed}", base)
            for number, case in enumerate(cases()):
                image = folder / f"key-{number}.png"
                Image.fromarray(case.image).save(image)
                frames = video(pipeline, folder, f"key-{seed}-{number}",
                               base.replace(keyframes=(Keyframe(case.seconds, str(image)),)))
                at = snap_keyframes([case.seconds], len(pipeline.plans(base)), base.window)[0].frame
                rows.append({"case": case.name, "seconds": case.seconds, "seed": seed,
                             "without": psnr(plain[at], case.image), "with": psnr(frames[at], case.image),
                             "next_without": psnr(plain[at + 1], case.image),
                             "next_with": psnr(frames[at + 1], case.image)})
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], seeds: int, steps: int) -> str:
    caption = (f"Demo model, demo start image and prompt, {SECONDS:g} s (3 sections), {steps} steps, seeds "
               f"0-{seeds - 1}; PSNR (dB) of the frame at the keyframe's time against the keyframe image, and of the "
               "frame after it:")
    lines = [caption,
             "",
             "| keyframe | at | seed | without | with | gain | next frame without | with |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['seconds']:g} s | {r['seed']} | {r['without']:.2f} | {r['with']:.2f} | "
                     f"{r['with'] - r['without']:+.2f} | {r['next_without']:.2f} | {r['next_with']:.2f} |")
    gains = [r["with"] - r["without"] for r in rows]
    summary = (f"Mean gain at the keyframe: {np.mean(gains):+.2f} dB (smallest {min(gains):+.2f}, "
               f"{sum(g > 0 for g in gains)}/{len(gains)} videos closer with the keyframe).")
    lines += ["", summary]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--update-doc", dest="doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.seeds, args.steps)
    command = "python benchmarks/keyframes.py" + (f" --seeds {args.seeds}" if args.seeds != 3 else "") + (
        f" --steps {args.steps}" if args.steps != 25 else "") + (f" --update-doc {args.doc}" if args.doc else "")
    publish(table(rows, args.seeds, args.steps), args.doc, "keyframes", command)


if __name__ == "__main__":
    main()
