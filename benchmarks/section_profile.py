"""Where a demo section's time goes: transformer, VAE decode, previews, the section's writes, the rest.

Runs ``framepack demo``'s settings on the embedded demo model (CPU) with timers around each part
(wrapping the functions the pipeline calls; nothing in the library is changed) and prints each
part's share of the sections' wall time. A section's wall time runs from its start to the next
section's start (the last one's to the end of the run), so it includes any wait for the previous
section's writes. Those writes (mp4 segment, pending frames, commit, provisional video) run in the
pipeline's video thread beside the next section's sampling: their time is shown apart (they
overlap the sampling, and on a 2-core machine they take CPU from it, which shows up as a slower
transformer). The first section is left out of the shares (it warms up the allocator and the
kernels) unless ``--all`` is given.

With ``--compile`` the same run is then repeated with the transformer's blocks compiled
(``generate --compile``), alternating with uncompiled runs, and a second table compares the two:
the first section (which compiles) and the median of the others.

With ``--decode-dtypes fp32 bf16`` the run is repeated with the demo VAE decoding in each dtype
(``SmallVideoAutoencoder.decode_dtype``; ``framepack`` picks bf16 where the CPU multiplies it
natively), alternating, and a table compares the decode's and the section's time.

Run: ``python benchmarks/section_profile.py [--model tiny-fast] [--compile] [--decode-dtypes fp32 bf16]
[--repeats 2] [--update-doc docs/generation.md [--name section_profile]]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

PARTS = ("transformer", "VAE decode", "preview", "writes and provisional video")
BACKGROUND = PARTS[-1]
VIDEO_THREAD = "framepack-video"  # the pipeline's background thread (its thread_name_prefix)


class Timers:
    """Wall seconds per part and per section, from wrapped callables (thread-safe)."""

    def __init__(self) -> None:
        self.section = 0
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.lock = threading.Lock()

    def wrap(self, part: str, fn: Callable, background: bool = False) -> Callable:
        """``background``: the part runs in the pipeline's video thread; anything else called from
        that thread (the provisional video's own segment) is counted in it, not on its own."""

        def timed(*args, **kwargs):
            if not background and threading.current_thread().name.startswith(VIDEO_THREAD):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.seconds[(self.section, part)] += time.perf_counter() - t0

        return timed


def instrument(pipeline, timers: Timers) -> None:
    """Wrap what a section calls: the model and VAE on the pipeline's components, the video
    functions where ``framepack.pipeline`` looks them up."""
    import framepack.pipeline as module

    model = pipeline.c.transformer
    model.forward = timers.wrap("transformer", model.forward)
    pipeline.c.vae.decode = timers.wrap("VAE decode", pipeline.c.vae.decode)
    module.preview_frames = timers.wrap("preview", module.preview_frames)
    # a section's writes and the provisional video, in the video thread, are timed as one part
    pipeline._write_section = timers.wrap(BACKGROUND, pipeline._write_section, background=True)


def profile(args: argparse.Namespace, compiled: bool = False, decode_dtype: str | None = None) -> tuple[list[float], Timers]:
    import torch

    from framepack.components import resolve_dtype
    from framepack.demo import demo_settings
    from framepack.jobs import JobDir
    from framepack.memory import tune_allocator
    from framepack.pipeline import Done, FramePackPipeline, SectionStarted

    torch.set_num_threads(args.threads)
    tune_allocator()  # as the CLI does
    settings = demo_settings(seconds=args.seconds, steps=args.steps, model=args.model)
    pipeline = FramePackPipeline.from_model(settings.model)
    if decode_dtype is not None:
        pipeline.c.vae.decode_dtype = resolve_dtype(decode_dtype, torch.device("cpu"))
    if compiled:
        from framepack.runtime.compile import compile_blocks

        compile_blocks(pipeline.c.transformer)
    timers = Timers()
    instrument(pipeline, timers)
    starts: list[float] = []

    def on_event(event) -> None:
        if isinstance(event, SectionStarted | Done):
            starts.append(time.perf_counter())
        if isinstance(event, SectionStarted):
            timers.section = event.step

    with tempfile.TemporaryDirectory() as tmp:
        job = JobDir.create(Path(tmp) / "job", settings, Path(tmp) / "demo.mp4")
        pipeline.run(job, on_event=on_event)
    return [b - a for a, b in zip(starts, starts[1:])], timers


def report(walls: list[float], timers: Timers, first: int) -> str:
    steps = range(first, len(walls))
    total = sum(walls[s] for s in steps)
    part = {p: sum(timers.seconds[(s, p)] for s in steps) for p in PARTS}
    inline = {p: part[p] for p in PARTS if p != BACKGROUND}
    background = part[BACKGROUND]
    rest = total - sum(inline.values())
    lines = [f"{len(steps)} sections timed (of {len(walls)}), {total:.2f} s of section wall time", "",
             "| part | seconds per section | share of a section |", "|---|---:|---:|"]
    for name, seconds in [*inline.items(), ("the rest", rest)]:
        lines.append(f"| {name} | {seconds / len(steps):.3f} | {100 * seconds / total:.1f}% |")
    lines.append(f"| mp4 segment, pending frames, commit, provisional video (video thread, beside the next section) | "
                 f"{background / len(steps):.3f} | ({100 * background / total:.1f}%) |")
    outside = total - inline["transformer"]
    lines += ["", f"not the transformer: **{100 * outside / total:.1f}%** of a section (goal <= 15%)"]
    return "\n".join(lines)


def versus_compiled(args: argparse.Namespace) -> tuple[str, str]:
    """(profile of a compiled run, eager vs compiled table), from alternating runs in this process."""
    eager: list[list[float]] = []
    compiled: list[list[float]] = []
    for _ in range(args.repeats):
        eager.append(profile(args)[0])
        walls, timers = profile(args, compiled=True)
        compiled.append(walls)
    lines = [(f"{args.repeats} alternating runs of each; the first section of the first compiled run compiles the "
              "blocks (later runs in the same process reuse the compiled code)"), "",
             "| run | first section (s) | median of the other sections (s) |", "|---|---:|---:|"]
    for name, runs in (("eager", eager), ("--compile", compiled)):
        firsts = ", ".join(f"{r[0]:.2f}" for r in runs)
        lines.append(f"| {name} | {firsts} | {statistics.median(t for r in runs for t in r[1:]):.3f} |")
    ratio = statistics.median(t for r in compiled for t in r[1:]) / statistics.median(t for r in eager for t in r[1:])
    lines += ["", f"compiled / eager, sections after the first: **{ratio:.2f}**"]
    return report(walls, timers, 0 if args.all else 1), "\n".join(lines)


def versus_decode_dtypes(args: argparse.Namespace) -> str:
    """The VAE's decode and the sections' wall time per decode dtype, from alternating runs in this process."""
    runs: dict[str, list[tuple[list[float], Timers]]] = {d: [] for d in args.decode_dtypes}
    for _ in range(args.repeats):
        for dtype in args.decode_dtypes:
            runs[dtype].append(profile(args, decode_dtype=dtype))
    first = 0 if args.all else 1
    lines = [f"{args.repeats} alternating runs of each; sections {first + 1} on", "",
             "| VAE decode in | VAE decode per section (s), median | section wall time (s), median |", "|---|---:|---:|"]
    medians = {}
    for dtype, results in runs.items():
        decode = [timers.seconds[(s, "VAE decode")] for walls, timers in results for s in range(first, len(walls))]
        walls = [w for ws, _ in results for w in ws[first:]]
        medians[dtype] = statistics.median(walls)
        lines.append(f"| {dtype} | {statistics.median(decode):.3f} | {medians[dtype]:.3f} |")
    base, *others = args.decode_dtypes
    lines += [""] + [f"section wall time, {d} / {base}: **{medians[d] / medians[base]:.2f}**" for d in others]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default) or tiny-fast, the few-step student")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all", action="store_true", help="include the first section")
    p.add_argument("--compile", action="store_true", help="also compare with compiled blocks")
    p.add_argument("--decode-dtypes", nargs="+", choices=["bf16", "fp32"], default=[],
                   help="also compare the demo VAE decoding in these dtypes (the first is the baseline)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each, with --compile or --decode-dtypes")
    p.add_argument("--update-doc", type=Path, default=None)
    p.add_argument("--name", default="section_profile", help="the doc's bench:NAME markers")
    args = p.parse_args(argv)
    walls, timers = profile(args)
    from framepack.components import resolve_model

    steps = resolve_model(args.model).steps(args.steps)
    # headings one level below the doc's section that holds the table (docs/generation.md: "### Where a
    # section's time goes"), so a doc's outline stays whole
    text = [f"#### A demo section ({args.model}, {args.seconds:g} s video, {steps} steps, {args.threads} threads)", "",
            report(walls, timers, 0 if args.all else 1)]
    if args.compile:
        compiled_profile, versus = versus_compiled(args)
        text += ["", "#### The same with --compile", "", compiled_profile, "", versus]
    if args.decode_dtypes:
        text += ["", "#### The VAE's decode dtype", "", versus_decode_dtypes(args)]
    from doctable import publish

    command = "python benchmarks/section_profile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    publish("\n".join(text), args.update_doc, args.name, command.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
