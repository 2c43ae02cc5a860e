"""Colour drift correction on the demo model: does ``--color-match`` lower the drift of 30 s videos?

For each case (a start frame of the demo world and its caption, a seed, a sampling mode) the same
30 s video is made without correction and with each method of framepack.color_match (the same
seed: the sampled latents are the same, only the written pixels differ). Reported per video: the
drift of FramePack's paper, ``|M(first 15% of frames) - M(last 15%)|``, for colourfulness and
sharpness as ``framepack eval`` computes them (framepack.train.evaluate), and the PSNR of the
corrected video against the uncorrected one (how much the correction changes; higher = less).

Run: ``OMP_NUM_THREADS=1 python benchmarks/color_match.py [--cases 4] [--steps 10] [--update-doc docs/generation.md]``
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from doctable import publish

from framepack.color_match import METHODS
from framepack.components import asset
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.settings import GenerationSettings
from framepack.train import world
from framepack.train.evaluate import colourfulness, drift, sharpness
from framepack.video import read_frames

SECONDS = 30.0
CORRECTED = [m for m in METHODS if m != "none"]


@dataclass(frozen=True)
class Case:
    name: str
    image: np.ndarray  # (128, 128, 3) uint8
    prompt: str
    seed: int
    mode: str | None  # None: the model's own (inverted anti-drifting)


def cases(count: int) -> list[Case]:
    """The demo start frame and prompt (the model's mode, then vanilla sampling, which drifts more),
    then held-out scenes of the world with their captions."""
    demo = np.asarray(Image.open(asset("demo", "start.png")).convert("RGB"))
    prompt = asset("demo", "prompt.txt").read_text().strip()
    found = [Case("demo start", demo, prompt, 0, None), Case("demo start", demo, prompt, 0, "vanilla")]
    for i, scene in enumerate(world.held_out(count)):
        found.append(Case(world.caption(scene), world.render(scene, 1)[0], world.caption(scene), i + 1,
                          None if i % 2 == 0 else "vanilla"))
    return found[:count]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def measure(count: int, steps: int) -> list[dict]:
    pipeline = FramePackPipeline.from_model("tiny")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for number, case in enumerate(cases(count)):
            image = folder / f"start-{number}.png"
            Image.fromarray(case.image).save(image)
            base = GenerationSettings(str(image), case.prompt, model="tiny", seconds=SECONDS, steps=steps,
                                      seed=case.seed, mode=case.mode, crf=0)
            videos = {}
            for method in METHODS:
                began = time.perf_counter()
                name = f"{number}-{method}"
                job = JobDir.create(folder / f"{name}.job", base.replace(color_match=method), folder / f"{name}.mp4")
                videos[method] = read_frames(pipeline.run(job))
                print(f"{case.name} ({case.mode or 'inverted'}, seed {case.seed}) {method}: "
                      f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
            row = {"case": case.name, "mode": case.mode or "inverted", "seed": case.seed, "frames": len(videos["none"])}
            for method, frames in videos.items():
                row[method] = {"colour": drift(colourfulness(frames)), "sharpness": drift(sharpness(frames)),
                               "psnr": psnr(frames, videos["none"])}
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict], steps: int) -> str:
    caption = (f"Demo model, {SECONDS:g} s videos ({rows[0]['frames']} frames), {steps} steps, crf 0; drift = "
               "|M(first 15% of frames) - M(last 15%)| (lower is better) for colourfulness and sharpness, as "
               "`framepack eval` computes them; PSNR (dB) of the corrected video against the uncorrected one:")
    head = "| start frame / prompt | mode | seed | colour drift: none |" + "".join(f" {m} |" for m in CORRECTED)
    head += " sharpness drift: none |" + "".join(f" {m} |" for m in CORRECTED)
    head += "".join(f" PSNR {m} vs none |" for m in CORRECTED)
    lines = [caption, "", head, "|" + "---|" * (3 + 2 * len(METHODS) + len(CORRECTED))]
    for r in rows:
        cells = [r["case"], r["mode"], str(r["seed"])]
        cells += [f"{r[m]['colour']:.2f}" for m in METHODS] + [f"{r[m]['sharpness']:.2f}" for m in METHODS]
        cells += [f"{r[m]['psnr']:.1f}" for m in CORRECTED]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m in CORRECTED:
        lower = sum(r[m]["colour"] < r["none"]["colour"] for r in rows)
        lines.append(f"- {m}: mean colour drift {np.mean([r[m]['colour'] for r in rows]):.2f} against "
                     f"{np.mean([r['none']['colour'] for r in rows]):.2f} uncorrected ({lower}/{len(rows)} videos "
                     f"lower), mean sharpness drift {np.mean([r[m]['sharpness'] for r in rows]):.2f} against "
                     f"{np.mean([r['none']['sharpness'] for r in rows]):.2f}, mean PSNR against the uncorrected "
                     f"video {np.mean([r[m]['psnr'] for r in rows]):.1f} dB.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="videos (each made once per method)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--update-doc", dest="doc", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = measure(args.cases, args.steps)
    command = "OMP_NUM_THREADS=1 python benchmarks/color_match.py" + (
        f" --cases {args.cases}" if args.cases != 4 else "") + (f" --steps {args.steps}" if args.steps != 10 else "") + (
        f" --update-doc {args.doc}" if args.doc else "")
    publish(table(rows, args.steps), args.doc, "color-match", command)


if __name__ == "__main__":
    main()
