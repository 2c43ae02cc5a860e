"""How smoothly the demo model's small VAE decodes: its own decoder against others, side by side.

Each VAE encodes and decodes the same rendered clips of the world (33 frames at 128 px, scenes of
the chosen split of the independent-start world, the same times) and two fixed clips (the circle
and the pan of ``benchmarks/extend_seam.py``). Reported per VAE:

- PSNR of the reconstruction, and its flicker (:func:`framepack.train.vae_task.flicker`: how much
  the error changes from one frame to the next, 0-255 scale);
- the mean absolute difference of consecutive frames across a group boundary (frame 4k into 4k+1,
  where one latent's frames end and the next one's begin) and inside a group, against the clip's
  own: a decoder that makes each latent's frames on its own steps at the boundaries;
- the time to decode the demo's 5 s (37 latents, 145 frames) in one call, median of 3.

    python benchmarks/vae_smoothness.py --vae shipped=src/framepack/assets/tiny/vae \
        --vae smooth=runs/gen2-vae-smooth/final --update-doc docs/demo-model.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from framepack.small_vae import GROUP, SmallVideoAutoencoder
from framepack.train import world
from framepack.train.vae_task import clip_batch, flicker, psnr, temporal_changes
from framepack.video import to_pixels

GROUPS = 8  # 33 frames a clip
DEMO_LATENTS = 37  # 145 frames


def step_profile(video: torch.Tensor) -> tuple[float, float]:
    """(B, 3, 1 + 4n, H, W) in [-1, 1] -> mean |consecutive difference| (0-255) across group
    boundaries and inside groups."""
    changes = temporal_changes(video).abs().mean(dim=(0, 1, 3, 4)) * 127.5  # (T - 1,)
    boundary = torch.arange(changes.numel()) % GROUP == 0  # frame 4k -> 4k + 1
    return float(changes[boundary].mean()), float(changes[~boundary].mean())


@torch.no_grad()
def measure(vae: SmallVideoAutoencoder, pixels: torch.Tensor) -> tuple[float, float, float, float]:
    """PSNR, flicker, and the reconstruction's changes across and inside groups."""
    recon = vae.decode_raw(vae.encode_raw(pixels)).clamp(-1, 1)
    return (psnr(recon, pixels), flicker(recon, pixels), *step_profile(recon))


@torch.no_grad()
def decode_seconds(vae: SmallVideoAutoencoder) -> float:
    latents = torch.randn(1, vae.config.latent_channels, DEMO_LATENTS, world.SIZE // 8, world.SIZE // 8)
    vae.decode(latents)  # warm-up
    times = []
    for _ in range(3):
        began = time.perf_counter()
        vae.decode(latents)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", action="append", required=True, metavar="NAME=DIR", help="a VAE to measure (repeat)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--update-doc", dest="doc", help="write the table between this doc's bench:vae_smoothness markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vaes = {}
    for spec in args.vae:
        name, sep, directory = spec.partition("=")
        if not sep or not Path(directory, "config.json").is_file():
            raise SystemExit(f"--vae wants NAME=DIR with a saved small VAE in DIR, got {spec!r}")
        vaes[name] = SmallVideoAutoencoder.from_pretrained(directory)
    scenes = world.scenes(args.split, args.clips, "independent")
    rng = np.random.default_rng(0)
    clips = {f"{args.split} ({args.clips} clips)": clip_batch(rng, iter(scenes), args.clips, GROUPS, world.SIZE)}
    from extend_seam import RENDERED  # beside this script: its rendered originals, a circle and a pan

    for name, params in zip(("circle", "pan"), RENDERED, strict=True):
        clips[name] = to_pixels(world.render(params, 1 + GROUP * GROUPS))
    lines = ["| clips | VAE | PSNR (dB) | flicker | change across a group boundary | change inside a group |",
             "|---|---|---:|---:|---:|---:|"]
    for clip_name, pixels in clips.items():
        across, inside = step_profile(pixels)
        lines.append(f"| {clip_name} | (the render) | | | {across:.2f} | {inside:.2f} |")
        for name, vae in vaes.items():
            value_psnr, value_flicker, across, inside = measure(vae, pixels)
            lines.append(f"| {clip_name} | {name} | {value_psnr:.2f} | {value_flicker:.2f} | {across:.2f} | {inside:.2f} |")
    timing = ["| VAE | decoder reads | decode of the 5 s demo (37 latents), s |", "|---|---|---:|"]
    for name, vae in vaes.items():
        reads = "the previous latent too" if vae.config.decoder_context else "one latent"
        timing.append(f"| {name} | {reads} | {decode_seconds(vae):.3f} |")
    setup = (f"CPU, {args.threads} threads; {args.split} scenes of the independent-start world, {1 + GROUP * GROUPS} "
             "frames at 128 px from random times, and the two rendered clips of extend_seam.py. Changes are mean "
             "absolute differences of consecutive frames, 0-255 scale.")
    from doctable import publish  # beside this script

    command = "python benchmarks/vae_smoothness.py " + " ".join(sys.argv[1:])
    publish(setup + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(timing), Path(args.doc) if args.doc else None,
            "vae_smoothness", command.strip())


if __name__ == "__main__":
    main()
