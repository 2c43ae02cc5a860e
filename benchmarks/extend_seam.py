"""The seam of ``generate --extend``: the frame difference across the join against the original's own.

For a few videos (made by the demo model in its inverted mode and in forward mode, and rendered
clips of the training world that the model never made), extend each by one section in a mode and
measure, with :func:`framepack.extend.seam`, the largest mean absolute frame difference over the
join (the last new frame into the video and the blend) against the differences between consecutive
frames inside the original clip. The join is "within" when it is no larger than the original's
largest. Prints a table; ``--update-doc docs/generation.md`` writes it between the doc's markers.

    python benchmarks/extend_seam.py --update-doc docs/generation.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from framepack.components import asset
from framepack.extend import file_sha256, frame_differences, seam
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.settings import GenerationSettings
from framepack.train.world import WorldParams, caption, render
from framepack.video import overlap_frames, read_frames, to_frames, to_pixels, write_segment

DEMO_PROMPT = "An orange triangle moves to the right on a striped red background"
SOURCE_SECONDS = 2.4  # 2 sections: 73 frames
SOURCE_FRAMES = round(SOURCE_SECONDS * 30) + 1
NEW_SECONDS = 1.2  # one new section
RENDERED = (  # clips of the world the demo model was trained on, rendered (not generated)
    WorldParams("circle", "red", "plain", "blue", "right", speed=10.0, x=0.3, y=0.5),
    WorldParams("square", "yellow", "stripes", "purple", "pan left", speed=12.0),
)


@dataclass(frozen=True)
class Row:
    source: str
    mode: str
    frames: tuple[int, int]  # original, extended
    join: float
    inside: tuple[float, ...]
    new: tuple[float, ...]
    within: bool


def _make(pipeline: FramePackPipeline, settings: GenerationSettings, root: Path) -> Path:
    job = JobDir.create(root, settings, root.with_suffix(".mp4"))
    return pipeline.run(job)


def _extend(pipeline: FramePackPipeline, video: Path, prompt: str, mode: str, steps: int, seed: int,
            root: Path) -> Row:
    settings = GenerationSettings(image=None, prompt=prompt, model="tiny", seconds=NEW_SECONDS, steps=steps,
                                  seed=seed, mode=mode, extend=str(video), extend_sha256=file_sha256(video))
    out = _make(pipeline, settings, root)
    original, extended = read_frames(video), read_frames(out)
    measured = seam(original, extended, backwards=mode == "inverted", overlap=overlap_frames(settings.window))
    return Row(video.stem, mode, (len(original), len(extended)), measured.join, measured.inside, measured.new,
               measured.within)


def _spread(values: tuple[float, ...]) -> str:
    v = np.array(values)
    return f"{v.min():.2f} / {np.median(v):.2f} / {v.max():.2f}"


def vae_round_trips(pipeline: FramePackPipeline) -> list[str]:
    """Table rows: each rendered original's frame differences before and after the demo VAE alone
    (encode, decode): how smooth a continuation through that VAE can be at best."""
    lines = []
    for i, params in enumerate(RENDERED):
        clip = render(params, SOURCE_FRAMES)
        with torch.no_grad():
            rebuilt = to_frames(pipeline.c.vae.decode(pipeline.c.vae.encode(to_pixels(clip))))
        lines.append(f"| rendered-{i + 1} | {_spread(tuple(frame_differences(clip)))} | "
                     f"{_spread(tuple(frame_differences(rebuilt)))} |")
    return lines


def measure(steps: int, seed: int, scratch: Path) -> tuple[list[Row], list[str]]:
    pipeline = FramePackPipeline.from_model("tiny")
    start = str(asset("demo", "start.png"))
    sources: list[tuple[Path, str, tuple[str, ...]]] = []
    for mode in ("inverted", "forward"):
        made = _make(pipeline, GenerationSettings(image=start, prompt=DEMO_PROMPT, model="tiny", seconds=SOURCE_SECONDS,
                                                  steps=steps, seed=seed, mode=mode), scratch / f"demo-{mode}")
        sources.append((made, DEMO_PROMPT, (mode,)))
    for i, params in enumerate(RENDERED):
        clip = scratch / f"rendered-{i + 1}.mp4"
        write_segment(clip, render(params, SOURCE_FRAMES))
        sources.append((clip, caption(params), ("inverted", "forward")))
    rows = []
    for video, prompt, modes in sources:
        for mode in modes:
            rows.append(_extend(pipeline, video, prompt, mode, steps, seed, scratch / f"{video.stem}-{mode}-extended"))
    return rows, vae_round_trips(pipeline)


def table(rows: list[Row]) -> str:
    header = ("| original | extended in mode | frames (original -> extended) | join | original's differences: "
              "min / median / max | new frames' differences: min / median / max | join within the original's |")
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.source} | {r.mode} | {r.frames[0]} -> {r.frames[1]} | {r.join:.2f} | {_spread(r.inside)} | "
                     f"{_spread(r.new)} | {'yes' if r.within else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=31337)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--update-doc", dest="doc", help="write the table between this doc's bench:extend_seam markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="framepack-extend-seam-") as scratch:
        rows, vae = measure(args.steps, args.seed, Path(scratch))
    setup = (f"Demo model (CPU, {args.threads} threads), {args.steps} steps, seed {args.seed}; each original "
             f"({SOURCE_SECONDS:g} s) extended by one section ({NEW_SECONDS:g} s). Mean absolute difference of "
             "consecutive frames, 0-255 scale; the join is the largest over the last new frame into the video "
             f"and the blend; {(time.perf_counter() - began) / 60:.1f} min in all.")
    from doctable import publish  # beside this script

    command = "python benchmarks/extend_seam.py " + " ".join(sys.argv[1:])
    vae_table = "\n".join(["The demo VAE alone (each rendered original encoded and decoded, no generation):", "",
                           "| original | differences: min / median / max | after the VAE: min / median / max |",
                           "|---|---|---|", *vae])
    publish(setup + "\n\n" + table(rows) + "\n\n" + vae_table, Path(args.doc) if args.doc else None, "extend_seam",
            command.strip())


if __name__ == "__main__":
    main()
