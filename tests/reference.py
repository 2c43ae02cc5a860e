"""Bridges to diffusers' independent port, used as the numerical reference in tests and benchmarks."""

from __future__ import annotations

import dataclasses

import torch

from framepack.config import TransformerConfig
from framepack.model import FramePackTransformer, HistoryInput

# keys of our config that diffusers' HunyuanVideoFramepackTransformer3DModel does not take
_OURS_ONLY = {"history_kernels", "context_schedule", "max_inverted_padding"}  # planning fields diffusers has no use for


def diffusers_kwargs(cfg: TransformerConfig) -> dict:
    kwargs = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _OURS_ONLY}
    kwargs["rope_axes_dim"] = tuple(cfg.rope_axes_dim)
    return kwargs


def diffusers_twin(model: FramePackTransformer):
    """diffusers' port with the same config and our weights copied through the state dict."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    twin = HunyuanVideoFramepackTransformer3DModel(**diffusers_kwargs(model.config))
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return twin.to(model.dtype).eval()


def random_inputs(cfg: TransformerConfig, batch: int = 1, frames: int = 9, height: int = 8, width: int = 8,
                  text_len: int = 12, image_tokens: int = 5, valid_text=None, seed: int = 0,
                  index_offsets=None, history_frames=(2, 2, 16)) -> dict:
    """Inputs in the released model's layout: 1x [start, post], 2x, 4x history, inverted indices."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    valid_text = valid_text or [text_len] * batch
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    for i, n in enumerate(valid_text):
        mask[i, :n] = True
    offsets = index_offsets or [0] * batch
    n1, n2, n4 = history_frames
    base = frames + 2 + n1 + n2 + n4  # [start | window | post | 2x | 4x] like the inverted layout
    def idx(lo, n):
        return torch.stack([torch.arange(lo, lo + n) + o for o in offsets])
    history = [
        HistoryInput((1, 2, 2), r(batch, cfg.in_channels, n1, height, width),
                     torch.stack([torch.tensor([0] + list(range(frames + 1, frames + n1))) + o for o in offsets])),
        HistoryInput((2, 4, 4), r(batch, cfg.in_channels, n2, height, width), idx(frames + n1, n2)),
        HistoryInput((4, 8, 8), r(batch, cfg.in_channels, n4, height, width), idx(frames + n1 + n2, n4)),
    ]
    del base
    return dict(
        latents=r(batch, cfg.in_channels, frames, height, width),
        timestep=torch.rand(batch, generator=g) * 1000,
        text=r(batch, text_len, cfg.text_embed_dim),
        text_mask=mask,
        pooled_text=r(batch, cfg.pooled_projection_dim),
        image_embeds=r(batch, image_tokens, cfg.image_proj_dim) if cfg.has_image_proj else None,
        latent_indices=idx(1, frames),
        history=history,
        guidance=torch.full((batch,), 10_000.0) if cfg.guidance_embeds else None,
    )


def run_diffusers(twin, inputs: dict) -> torch.Tensor:
    """diffusers supports one set of frame indices per batch: use sample 0's."""
    h1, h2, h4 = inputs["history"]
    out = twin(
        hidden_states=inputs["latents"].to(twin.dtype),
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["text"].to(twin.dtype),
        encoder_attention_mask=inputs["text_mask"],
        pooled_projections=inputs["pooled_text"].to(twin.dtype),
        image_embeds=inputs["image_embeds"].to(twin.dtype),
        indices_latents=inputs["latent_indices"][0],
        guidance=inputs["guidance"],
        latents_clean=h1.latents.to(twin.dtype), indices_latents_clean=h1.indices[0],
        latents_history_2x=h2.latents.to(twin.dtype), indices_latents_history_2x=h2.indices[0],
        latents_history_4x=h4.latents.to(twin.dtype), indices_latents_history_4x=h4.indices[0],
        return_dict=False,
    )[0]
    return out
