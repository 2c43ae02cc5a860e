"""Time per section, ours vs diffusers' ``HunyuanVideoFramepackPipeline``, side by side in one run.

The same tiny random components in the real Hugging Face layouts (tests/tiny_hub.py), the same
settings (Euler, seed, sections, resolution, distilled guidance), both decoding to pixels (ours also
encodes the mp4 and writes the job directory). Configurations, each run ``--repeats`` times in
alternation after one warm-up of each:

* uncached, both;
* each with its best step cache: ours ``--cache teacache:0.15`` (the reference's rule and
  threshold) and ``fbcache:0.05``; diffusers' FirstBlockCache at 0.05 (its default) on its own
  transformer, the one of its cache hooks that needs no per-model calibration.

The PSNR column compares each cached video with the same pipeline's uncached one (random weights:
a check that the cache is not skipping everything, not a quality gate; the demo model's gate is in
benchmarks/caching.py's table). Goals (issue 17): ours uncached <= 0.8x diffusers uncached;
ours cached <= 0.4x diffusers uncached.

Run: ``python benchmarks/vs_diffusers.py [--update-doc docs/generation.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).parent))

PROMPT = "a red circle moves to the right"
OUR_CACHES = ("teacache:0.15", "fbcache:0.05")
DIFFUSERS_FBCACHE = 0.05


@dataclass
class Case:
    name: str
    run: Callable[[int], np.ndarray]  # repeat index -> (T, H, W, 3) uint8 frames
    baseline: str | None  # the uncached case its PSNR is measured against
    seconds: list[float]
    frames: np.ndarray | None = None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    mse = float(np.mean((a[:n].astype(np.float64) - b[:n].astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def cases(work: Path, args: argparse.Namespace) -> list[Case]:
    import torch
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image
    from test_diffusers_pipeline import diffusers_pipeline

    from framepack.jobs import JobDir
    from framepack.pipeline import FramePackPipeline
    from framepack.settings import GenerationSettings
    from framepack.video import read_frames

    torch.set_num_threads(args.threads)
    # both use the posterior mean for the start frame (see tests/test_diffusers_pipeline.py)
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    model = work / "model"
    paths = {"framepack": model / "FramePackI2V_HY", "hunyuan": model / "HunyuanVideo", "redux": model / "flux_redux_bfl"}
    plain, cached = diffusers_pipeline(paths), diffusers_pipeline(paths)
    cached.transformer.enable_cache(FirstBlockCacheConfig(threshold=DIFFUSERS_FBCACHE))
    for pipe in (plain, cached):
        pipe.set_progress_bar_config(disable=True)
    ours = FramePackPipeline.from_model(str(model))
    image = work / "start.png"

    def run_ours(cache: str) -> Callable[[int], np.ndarray]:
        def run(i: int) -> np.ndarray:
            settings = GenerationSettings(image=str(image), prompt=PROMPT, model=str(model), seconds=1.2 * args.sections,
                                          steps=args.steps, sampler="euler", resolution=args.resolution, seed=1,
                                          cache=cache)
            name = f"{cache.replace(':', '-')}-{i}"
            job = JobDir.create(work / f"job-{name}", settings, work / f"{name}.mp4")
            ours.run(job)
            return read_frames(job.out)

        return run

    def run_theirs(pipe, hooked: bool = False) -> Callable[[int], np.ndarray]:
        def run(i: int) -> np.ndarray:
            # its pipeline does not open a cache context itself (one "cond" stream: distilled guidance,
            # no real CFG); the hooks' state is reset after each video
            context = pipe.transformer.cache_context("cond") if hooked else nullcontext()
            with context:
                out = pipe(image=Image.open(image).convert("RGB"), prompt=PROMPT, height=args.resolution,
                           width=args.resolution, num_frames=33 * args.sections, num_inference_steps=args.steps,
                           guidance_scale=10.0, sampling_type="inverted_anti_drifting",
                           generator=torch.Generator().manual_seed(1), output_type="np",
                           prompt_template={"template": ours.c.text.template, "crop_start": ours.c.text.crop_start})
            if hooked:
                pipe.transformer._reset_stateful_cache()
            return (np.clip(out.frames[0], 0, 1) * 255).round().astype(np.uint8)

        return run

    return [
        Case("ours, uncached", run_ours("none"), None, []),
        Case("diffusers, uncached", run_theirs(plain), None, []),
        *(Case(f"ours, --cache {c}", run_ours(c), "ours, uncached", []) for c in OUR_CACHES),
        Case(f"diffusers, FirstBlockCache {DIFFUSERS_FBCACHE:g}", run_theirs(cached, hooked=True), "diffusers, uncached", []),
    ]


def measure(all_cases: list[Case], repeats: int) -> None:
    for case in all_cases:  # warm-up, and the frames the PSNR column compares
        case.frames = case.run(-1)
    for i in range(repeats):
        for case in all_cases:  # alternating: a slow spell on a shared machine hits every case alike
            t0 = time.perf_counter()
            case.run(i)
            case.seconds.append(time.perf_counter() - t0)


def table(all_cases: list[Case], args: argparse.Namespace) -> str:
    by_name = {c.name: c for c in all_cases}
    theirs = statistics.median(by_name["diffusers, uncached"].seconds)
    lines = [(f"{args.sections} sections, {args.steps} Euler steps, {args.resolution}x{args.resolution}, median of "
              f"{args.repeats} alternating runs after a warm-up, {args.threads} threads"), "",
             "| pipeline | time per section (s) | / diffusers uncached | PSNR vs its uncached video (dB) |",
             "|---|---:|---:|---:|"]
    for case in all_cases:
        t = statistics.median(case.seconds)
        quality = "" if case.baseline is None else f"{psnr(case.frames, by_name[case.baseline].frames):.1f}"
        lines.append(f"| {case.name} | {t / args.sections:.3f} | **{t / theirs:.2f}** | {quality} |")
    lines += ["", "Goals (issue 17): ours uncached <= 0.8x diffusers uncached; ours cached <= 0.4x."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from generation import build_model, write_image

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--update-doc", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(work / "model")
        write_image(work / "start.png", args.resolution)
        all_cases = cases(work, args)
        measure(all_cases, args.repeats)
    from doctable import publish

    command = "python benchmarks/vs_diffusers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    publish(table(all_cases, args), args.update_doc, "vs_diffusers", command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
