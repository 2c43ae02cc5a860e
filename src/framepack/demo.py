"""A placeholder for the main job until the embedded demo model exists.

Runs the *tiny preset with random weights* through the packed-history section loop (forward
order, released context schedule, Euler flow-matching steps) on the CPU and reports, per section,
the packed context length and the time taken: the point of FramePack is that both stay constant
however long the video grows. It produces latents, not a video: there is no VAE yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .model import FramePackTransformer, HistoryInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SectionStat:
    index: int
    history_latents: int
    context_tokens: int
    seconds: float


def run_random_weights_demo(
    sections: int = 6, steps: int = 4, latent_size: tuple[int, int] = (16, 16), window: int = 9, seed: int = 0
) -> list[SectionStat]:
    generator = torch.Generator().manual_seed(seed)
    model = FramePackTransformer("tiny").eval()
    cfg = model.config
    schedule = cfg.schedule
    h, w = latent_size
    text = torch.randn(1, 8, cfg.text_embed_dim, generator=generator)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=generator)
    image = torch.randn(1, 4, cfg.image_proj_dim, generator=generator)
    start = torch.randn(1, cfg.in_channels, 1, h, w, generator=generator)
    history = start  # (1, C, T, h, w), oldest first
    stats = []
    for section in range(sections):
        began = time.perf_counter()
        # nearest-first context from the end of the history; older latents are not packed at all
        recent = history.flip(2)[:, :, : schedule.frames]
        first = history.shape[2]  # the new window's first frame index
        levels = [
            HistoryInput(level.kernel, recent[:, :, lo:hi].flip(2), torch.arange(first - hi, first - lo))
            for level, (lo, hi) in zip(schedule.levels, schedule.split(recent.shape[2]))
            if hi > lo
        ]
        levels[0] = HistoryInput(  # the start frame always rides along at full resolution
            levels[0].kernel, torch.cat([start, levels[0].latents], 2), torch.cat([torch.tensor([0]), levels[0].indices])
        )
        x = torch.randn(1, cfg.in_channels, window, h, w, generator=generator)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                v = model(x, s * 1000, text, None, pooled, image, torch.arange(first, first + window), levels, guidance=10_000.0)
                x = x + (s_next - s) * v  # Euler step of the flow ODE
        history = torch.cat([history, x], dim=2)
        tokens = model.x_embedder(x).shape[1] + sum(model.clean_x_embedder(l.latents, l.kernel).shape[1] for l in levels)
        stats.append(SectionStat(section + 1, history.shape[2], tokens, time.perf_counter() - began))
        log.info("section %d/%d: %d context tokens, %.2f s", section + 1, sections, tokens, stats[-1].seconds)
    return stats
