"""Generation benchmarks on a tiny random model in the real Hugging Face layouts (CPU).

1. Constant cost per section: a 5 s and a 60 s video, each in a fresh process; per-section time
   and the process's peak RSS. Goals: last-section time / second-section time <= 1.05 and
   peak RSS(60 s) / peak RSS(5 s) <= 1.10.
2. Ours vs diffusers' ``HunyuanVideoFramepackPipeline`` on identical components and settings
   (Euler, same seed, same sections), whole-run wall time per section, alternating runs.
   Goal: ours / diffusers <= 1.0.

Run: ``python benchmarks/generation.py [--update-doc docs/generation.md]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).parent))


def build_model(root: Path) -> Path:
    from tiny_hub import write_all

    paths = write_all(root)
    (root / "framepack.json").write_text(json.dumps(
        {"transformer": paths["framepack"].name, "hunyuan": paths["hunyuan"].name, "redux": paths["redux"].name}))
    return root


def write_image(path: Path, size: int) -> Path:
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 255 // size, yy * 255 // size, np.full((size, size), 90)], -1).astype(np.uint8)
    img[(yy - size // 3) ** 2 + (xx - size // 2) ** 2 < (size // 6) ** 2] = (220, 30, 30)
    Image.fromarray(img).save(path)
    return path


def child(args: argparse.Namespace) -> None:
    """One generation in this process; prints per-section seconds and peak RSS as JSON."""
    import torch

    from framepack.jobs import JobDir
    from framepack.memory import tune_allocator
    from framepack.pipeline import FramePackPipeline, SectionFinished
    from framepack.settings import GenerationSettings

    torch.set_num_threads(args.threads)
    tune_allocator()  # as `framepack generate` does
    work = Path(args.work)
    settings = GenerationSettings(image=str(work / "start.png"), prompt="a red circle moves to the right",
                                  model=str(work / "model"), seconds=args.seconds, steps=args.steps,
                                  resolution=args.resolution, seed=1, sampler="unipc")
    pipeline = FramePackPipeline.from_model(settings.model)
    job = JobDir.create(work / f"job-{args.seconds:g}", settings, work / f"video-{args.seconds:g}.mp4")
    times: list[float] = []
    cpu: list[float] = []
    last_cpu = [time.process_time()]

    def on_event(event) -> None:
        # CPU seconds of this process (all threads) per section: robust to other load on a shared
        # machine, and it counts the background video work too
        if isinstance(event, SectionFinished):
            times.append(event.seconds)
            now = time.process_time()
            cpu.append(now - last_cpu[0])
            last_cpu[0] = now

    pipeline.run(job, on_event=on_event)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"sections": times, "cpu": cpu, "peak_rss_mb": peak_kb / 1024}))


def run_child(work: Path, seconds: float, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--work", str(work), "--seconds", str(seconds), "--steps",
           str(args.steps), "--resolution", str(args.resolution), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def constant_cost(work: Path, args: argparse.Namespace) -> list[str]:
    short, long = run_child(work, 5, args), run_child(work, 60, args)
    lines = [
        "| video | sections | 2nd section wall / CPU (s) | last section wall / CPU (s) | median section wall / CPU (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("5 s", short), ("60 s", long)):
        t, c = r["sections"], r["cpu"]
        lines.append(
            f"| {name} | {len(t)} | {t[1]:.3f} / {c[1]:.3f} | {t[-1]:.3f} / {c[-1]:.3f} "
            f"| {statistics.median(t):.3f} / {statistics.median(c):.3f} | {r['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    for label, key in (("wall", "sections"), ("CPU", "cpu")):
        s = long[key]
        tail, head = statistics.median(s[-5:]), statistics.median(s[1:6])
        lines.append(
            f"- {label} time, 60 s video: last / second section **{s[-1] / s[1]:.3f}** (goal <= 1.05); "
            f"median of the last 5 / median of sections 2-6 **{tail / head:.3f}**"
        )
    lines.append(f"- peak RSS 60 s / 5 s: **{long['peak_rss_mb'] / short['peak_rss_mb']:.3f}** (goal <= 1.10)")
    return lines


def versus_diffusers(work: Path, args: argparse.Namespace) -> list[str]:
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image
    from test_diffusers_pipeline import diffusers_pipeline

    from framepack.jobs import JobDir
    from framepack.pipeline import FramePackPipeline
    from framepack.settings import GenerationSettings

    torch.set_num_threads(args.threads)
    # both use the posterior mean for the start frame (see tests/test_diffusers_pipeline.py)
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    paths = {"framepack": work / "model" / "FramePackI2V_HY", "hunyuan": work / "model" / "HunyuanVideo",
             "redux": work / "model" / "flux_redux_bfl"}
    theirs = diffusers_pipeline(paths)
    ours = FramePackPipeline.from_model(str(work / "model"))
    sections = args.versus_sections
    image = work / "start.png"

    def run_ours(i: int) -> float:
        settings = GenerationSettings(image=str(image), prompt="a red circle moves to the right", model=str(work / "model"),
                                      seconds=1.2 * sections, steps=args.steps, sampler="euler",
                                      resolution=args.resolution, seed=1)
        job = JobDir.create(work / f"vs-{i}", settings, work / f"vs-{i}.mp4")
        t0 = time.perf_counter()
        ours.run(job)
        return time.perf_counter() - t0

    def run_theirs(i: int) -> float:
        t0 = time.perf_counter()
        theirs(image=Image.open(image).convert("RGB"), prompt="a red circle moves to the right",
               height=args.resolution, width=args.resolution, num_frames=33 * sections,
               num_inference_steps=args.steps, guidance_scale=10.0, sampling_type="inverted_anti_drifting",
               generator=torch.Generator().manual_seed(1), output_type="np",
               prompt_template={"template": ours.c.text.template, "crop_start": ours.c.text.crop_start})
        return time.perf_counter() - t0

    run_ours(-1), run_theirs(-1)  # warm-up
    pairs = [(run_ours(i), run_theirs(i)) for i in range(args.repeats)]
    o, t = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    return [
        f"{sections} sections, {args.steps} Euler steps, {args.resolution}x{args.resolution}, {args.repeats} alternating runs "
        "(both decode to pixels; ours also encodes the mp4 and writes the job directory)",
        "",
        "| pipeline | time per section (s) |",
        "|---|---:|",
        f"| ours | {o / sections:.3f} |",
        f"| diffusers | {t / sections:.3f} |",
        f"| ratio ours / diffusers (median of pairs) | **{ratio:.3f}** (goal <= 1.0) |",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--versus-sections", type=int, default=3)
    p.add_argument("--update-doc", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_model(work / "model")
        write_image(work / "start.png", args.resolution)
        report = ["### Constant cost per section (tiny random model, "
                  f"{args.resolution}x{args.resolution}, {args.steps} UniPC steps, inverted)", ""]
        report += constant_cost(work, args)
        report += ["", "### Ours vs diffusers' pipeline", ""] + versus_diffusers(work, args)
    text = "\n".join(report)
    print(text)
    if args.update_doc is not None:
        from doctable import update_doc

        command = "python benchmarks/generation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        update_doc(args.update_doc, "generation", text, command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
