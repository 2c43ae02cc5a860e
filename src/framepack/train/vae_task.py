"""Training task "vae": the small video autoencoder on the synthetic world.

Batches are short clips (1 + 4n frames) of random world scenes at random times. The loss is the
reconstruction MSE of every frame, plus the first-frame head decoding a *group* latent into the
last frame of its group (what the decoder must do when a decoded span starts mid-video), plus a
small L2 on the latents to keep their scale bounded; the scaling factor that brings latents to
unit variance is measured at export.

``temporal_weight`` (default 0) adds the MSE between the clip's consecutive-frame differences and
the reconstruction's: per-frame errors that change from frame to frame are flicker, and errors that
change at a group boundary are a step, though both cost little PSNR. ``decoder_context: 1`` widens
an ``init`` autoencoder's decoder to read the previous latent too
(:meth:`SmallVideoAutoencoder.with_decoder_context`); with ``train_only: "decoder"`` that is a stage
that smooths the frames without moving the latent space, so a transformer trained on it still fits.
The exported ``metrics.json`` gives the held-out PSNR and :func:`flicker`.

``world_start`` picks the world's start-position sampler (:data:`framepack.train.world.STARTS`):
"by-motion" (the default: the shipped VAE's config trains and measures on the same scenes as
before), "independent" or "determined", whose training scenes are their ``train`` split and whose held-out PSNR is
measured on its ``validation`` split (the test split is left for the shipped model's report).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..small_vae import GROUP, SmallVAEConfig, SmallVideoAutoencoder
from ..trainer import register
from . import world

LATENT_L2 = 1e-4


def clip_batch(rng: np.random.Generator, params_stream: Iterator, batch: int, groups: int, size: int,
               crop: int | None = None) -> torch.Tensor:
    """(B, 3, 1 + 4 * groups, crop, crop) in [-1, 1] from random scenes, times and crops.

    The autoencoder is convolutional, so training on crops of full-size renders teaches it the
    full-size world at a fraction of the cost.
    """
    frames = 1 + GROUP * groups
    crop = crop or size
    clips = []
    for _ in range(batch):
        params = next(params_stream)
        start = int(rng.integers(0, world.FPS * 20))
        top, left = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        clips.append(world.render(params, frames, size=size, start=start)[:, top : top + crop, left : left + crop])
    video = torch.from_numpy(np.stack(clips)).float() / 127.5 - 1  # (B, T, H, W, 3)
    return video.permute(0, 4, 1, 2, 3).contiguous()


def temporal_changes(video: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, 3, T - 1, H, W): each frame minus the one before it."""
    return video[:, :, 1:] - video[:, :, :-1]


def _decoding_loss(model: SmallVideoAutoencoder, z: torch.Tensor, pixels: torch.Tensor,
                   temporal_weight: float) -> torch.Tensor:
    recon = model.decode_raw(z)
    loss = F.mse_loss(recon, pixels)
    if temporal_weight:
        loss = loss + temporal_weight * F.mse_loss(temporal_changes(recon), temporal_changes(pixels))
    # a span that starts mid-video: the first head must give the last frame of the group
    mid = model.decoder(z[:, :, 1], first=True)
    return loss + 0.25 * F.mse_loss(mid, pixels[:, :, GROUP])


def reconstruction_loss(model: SmallVideoAutoencoder, pixels: torch.Tensor, temporal_weight: float = 0.0) -> torch.Tensor:
    z = model.encode_raw(pixels)
    return _decoding_loss(model, z, pixels, temporal_weight) + LATENT_L2 * z.pow(2).mean()


def decoder_loss(model: SmallVideoAutoencoder, pixels: torch.Tensor, temporal_weight: float = 0.0) -> torch.Tensor:
    """The reconstruction loss with the encoder frozen (no latent penalty: the latents are fixed)."""
    with torch.no_grad():
        z = model.encode_raw(pixels)
    return _decoding_loss(model, z, pixels, temporal_weight)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = F.mse_loss(a.clamp(-1, 1), b).item()
    return 10 * np.log10(4.0 / max(mse, 1e-12))


def flicker(recon: torch.Tensor, pixels: torch.Tensor) -> float:
    """Mean absolute difference, on the 0-255 scale, between the reconstruction's consecutive-frame
    changes and the clip's: 0 when every frame's error is the same as the one before it."""
    change = temporal_changes(recon.clamp(-1, 1)) - temporal_changes(pixels)
    return float(change.abs().mean()) * 127.5


def held_out_scenes(clips: int, start: str = "by-motion") -> list[world.WorldParams]:
    """The scenes a VAE is measured on: the first world's fixed held-out set (its published PSNR),
    or the validation split of the world of sampler ``start``."""
    return world.held_out(clips) if start == "by-motion" else world.scenes("validation", clips, start)


@torch.no_grad()
def fit_preview_map(model: SmallVideoAutoencoder, scaling_factor: float, clips: int = 16,
                    size: int = world.SIZE, start: str = "by-motion") -> torch.Tensor:
    """Least-squares latent -> RGB map over held-out clips: latent 0 previews frame 0, latent k the
    mean of its four frames."""
    from ..video import fit_latent_to_rgb

    rng = np.random.default_rng(1)
    pixels = clip_batch(rng, iter(held_out_scenes(clips, start)), clips, groups=8, size=size)  # (B, 3, 33, H, W)
    maps_in, maps_out = [], []
    for clip in pixels:
        z = model.encode_raw(clip[None]) * scaling_factor  # (1, C, 9, h, w)
        frames = torch.cat([clip[:, :1], clip[:, 1:].unflatten(1, (-1, GROUP)).mean(2)], dim=1)  # (3, 9, H, W)
        maps_in.append(z)
        maps_out.append(((frames.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy())
    return fit_latent_to_rgb(torch.cat(maps_in, dim=2), np.concatenate(maps_out))


@torch.no_grad()
def evaluate(model: SmallVideoAutoencoder, clips: int = 16, size: int = world.SIZE,
             start: str = "by-motion") -> dict[str, float]:
    """Reconstruction PSNR on held-out scenes (1 + 4*8 frames each; :func:`held_out_scenes`) and the latent std."""
    model.eval()
    rng = np.random.default_rng(0)
    pixels = clip_batch(rng, iter(held_out_scenes(clips, start)), clips, groups=8, size=size)
    z = model.encode_raw(pixels)
    recon = model.decode_raw(z)
    return {"psnr_db": psnr(recon, pixels), "flicker": flicker(recon, pixels), "latent_std": float(z.std())}


class VAETask:
    def __init__(self, args: dict) -> None:
        self.cfg = SmallVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.get("model", {}).items()})
        self.groups = int(args.get("groups", 2))
        self.size = int(args.get("size", world.SIZE))
        self.crop = int(args.get("crop", self.size))
        self.model = SmallVideoAutoencoder(self.cfg)
        self.world_start = str(args.get("world_start", "by-motion"))
        if self.world_start not in world.STARTS:
            raise ValueError(f"world_start must be one of {world.STARTS}, got {self.world_start!r}")
        if args.get("init"):
            # a second stage: start from exported weights (the config comes with them)
            self.model = SmallVideoAutoencoder.from_pretrained(args["init"]).train()
            self.cfg = self.model.config
        if int(args.get("decoder_context", 0)):
            if not args.get("init"):
                raise ValueError("decoder_context widens a trained decoder: give init too")
            self.model = self.model.with_decoder_context()
            self.cfg = self.model.config
        self.temporal_weight = float(args.get("temporal_weight", 0.0))
        self.train_only = args.get("train_only")
        if self.train_only not in (None, "decoder"):
            raise ValueError(f"train_only must be 'decoder' or absent, got {self.train_only!r}")
        if self.train_only == "decoder":
            # The latent space is the encoder's: freezing it lets the transformer train on these
            # latents while the decoder keeps improving.
            self.model.encoder.requires_grad_(False)
        self.keeps_latents = self.train_only == "decoder" and bool(args.get("init"))

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng(seed)
        scenes = world.stream(seed, self.world_start)
        while True:
            yield clip_batch(rng, scenes, batch_size, self.groups, self.size, self.crop)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        if self.train_only == "decoder":
            return decoder_loss(model, batch, self.temporal_weight)
        return reconstruction_loss(model, batch, self.temporal_weight)

    def export(self, model: nn.Module, directory: Path) -> None:
        # measured at the task's render size (the world's own for every shipped config)
        stats = evaluate(model, size=self.size, start=self.world_start)
        # A decoder-only stage keeps the factor its init was exported with, bit for bit: the latents
        # a transformer was trained on are the same.
        scale = self.cfg.scaling_factor if self.keeps_latents else 1.0 / stats["latent_std"]
        preview = tuple(tuple(row) for row in fit_preview_map(model, scale, size=self.size, start=self.world_start).tolist())
        final = SmallVideoAutoencoder(SmallVAEConfig(**{**self.cfg.__dict__, "scaling_factor": scale, "preview_map": preview}))
        final.load_state_dict(model.state_dict())
        final.save_pretrained(directory)
        (directory / "metrics.json").write_text(
            f'{{"psnr_db": {stats["psnr_db"]:.2f}, "flicker": {stats["flicker"]:.3f}, "latent_std": {stats["latent_std"]:.4f}}}\n')


register("vae")(VAETask)
