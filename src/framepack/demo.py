"""A placeholder for the main job until the embedded demo model exists.

Runs the *tiny preset with random weights* through the packed-history section loop (the
planner's forward layout, released context schedule, Euler flow-matching steps) on the CPU and reports, per section,
the packed context length and the time taken: the point of FramePack is that both stay constant
however long the video grows. It produces latents, not a video: there is no VAE yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .model import FramePackTransformer, HistoryInput
from .planning import START, plan_sections

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
    h, w = latent_size
    text = torch.randn(1, 8, cfg.text_embed_dim, generator=generator)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=generator)
    image = torch.randn(1, 4, cfg.image_proj_dim, generator=generator)
    video = [torch.randn(1, cfg.in_channels, 1, h, w, generator=generator)]  # position 0: the start latent
    zero = torch.zeros_like(video[0])

    def latent(source) -> torch.Tensor:
        if source is None:
            return zero
        return video[0] if source == START else video[source]

    stats = []
    for plan in plan_sections(sections, "forward", cfg.schedule, window):
        began = time.perf_counter()
        levels = [
            HistoryInput(level.kernel, torch.cat([latent(s) for s in level.sources], 2), torch.tensor(level.indices))
            for level in plan.levels
        ]
        x = torch.randn(1, cfg.in_channels, window, h, w, generator=generator)
        sigmas = torch.linspace(1.0, 0.0, steps + 1)
        window_indices = torch.tensor(plan.window_indices)
        with torch.no_grad():
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                v = model(x, s * 1000, text, None, pooled, image, window_indices, levels, guidance=10_000.0)
                x = x + (s_next - s) * v  # Euler step of the flow ODE
        video += list(x.split(1, dim=2))
        tokens = model.x_embedder(x).shape[1] + sum(
            model.clean_x_embedder(level.latents, level.kernel).shape[1] for level in levels
        )
        stats.append(SectionStat(plan.step + 1, len(video), tokens, time.perf_counter() - began))
        log.info("section %d/%d: %d context tokens, %.2f s", plan.step + 1, sections, tokens, stats[-1].seconds)
    return stats
