"""Inputs of the packed transformer and their validation.

Every shape problem is reported as a ``ValueError`` that names the argument, before any
computation, instead of surfacing later as a cryptic matmul error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import TransformerConfig
from ..packing import Kernel


@dataclass
class HistoryInput:
    """One context level of the packed history.

    kernel: the patchify kernel (t, h, w) of this level, one the model has an embedder for.
    latents: (B, C, T, H, W) clean latents, same H and W as the noisy window.
    indices: (B, T) or (T,) frame index of every latent (its RoPE time position).
    """

    kernel: Kernel
    latents: torch.Tensor
    indices: torch.Tensor


def _per_sample(value: torch.Tensor | float | None, batch: int, name: str, device: torch.device) -> torch.Tensor | None:
    """Scalar or (B,) -> (B,) float."""
    if value is None:
        return None
    value = torch.as_tensor(value, device=device, dtype=torch.float32)
    if value.ndim == 0:
        return value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(value.shape)}")
    return value


def _indices(indices: torch.Tensor, batch: int, frames: int, name: str) -> torch.Tensor:
    """(T,) or (B, T) -> (B, T)."""
    if indices.ndim == 1:
        indices = indices[None].expand(batch, -1)
    if indices.shape != (batch, frames):
        raise ValueError(f"{name} must have shape ({frames},) or ({batch}, {frames}), got {tuple(indices.shape)}")
    return indices


def check_forward_inputs(
    cfg: TransformerConfig,
    latents: torch.Tensor,
    timestep: torch.Tensor | float,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
    pooled_text: torch.Tensor,
    image_embeds: torch.Tensor | None,
    latent_indices: torch.Tensor | None,
    history: Sequence[HistoryInput],
    guidance: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[HistoryInput]]:
    """Validate, and normalise timestep/guidance to (B,) and all indices to (B, T)."""
    if latents.ndim != 5 or latents.shape[1] != cfg.in_channels:
        raise ValueError(f"latents must have shape (B, {cfg.in_channels}, T, H, W), got {tuple(latents.shape)}")
    b, _, t, height, width = latents.shape
    if t % cfg.patch_size_t or height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(
            f"latents frames/height/width {(t, height, width)} must be multiples of the patch {cfg.patch}"
        )
    device = latents.device
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_embed_dim:
        raise ValueError(f"text must have shape ({b}, L, {cfg.text_embed_dim}), got {tuple(text.shape)}")
    if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool):
        raise ValueError(f"text_mask must be a bool tensor of shape {tuple(text.shape[:2])}, got "
                         f"{text_mask.dtype} {tuple(text_mask.shape)}")
    if text_mask is not None and not bool(text_mask.any(dim=1).all()):
        raise ValueError("text_mask marks no valid token for at least one sample")
    if pooled_text.shape != (b, cfg.pooled_projection_dim):
        raise ValueError(f"pooled_text must have shape ({b}, {cfg.pooled_projection_dim}), got {tuple(pooled_text.shape)}")
    if cfg.has_image_proj:
        if image_embeds is None:
            raise ValueError("image_embeds is required: this model conditions on SigLIP image tokens")
        if image_embeds.ndim != 3 or image_embeds.shape[0] != b or image_embeds.shape[2] != cfg.image_proj_dim:
            raise ValueError(f"image_embeds must have shape ({b}, N, {cfg.image_proj_dim}), got {tuple(image_embeds.shape)}")
    elif image_embeds is not None:
        raise ValueError("image_embeds given, but this model has no image projection")
    timestep_b = _per_sample(timestep, b, "timestep", device)
    guidance_b = _per_sample(guidance, b, "guidance", device)
    if cfg.guidance_embeds and guidance_b is None:
        raise ValueError("guidance is required: this model has a distilled-guidance embedder")
    if latent_indices is None:
        latent_indices = torch.arange(t, device=device)
    latent_indices = _indices(latent_indices, b, t, "latent_indices")

    levels = []
    for i, level in enumerate(history):
        name = f"history[{i}]"
        if not cfg.has_clean_x_embedder:
            raise ValueError(f"{name}: this model has no history embedders")
        if tuple(level.kernel) not in [tuple(k) for k in cfg.history_kernels]:
            raise ValueError(f"{name}.kernel {tuple(level.kernel)} is not one of the model's {list(cfg.history_kernels)}")
        lat = level.latents
        if lat.ndim != 5 or lat.shape[0] != b or lat.shape[1] != cfg.in_channels or lat.shape[3:] != latents.shape[3:]:
            raise ValueError(
                f"{name}.latents must have shape ({b}, {cfg.in_channels}, T, {height}, {width}), got {tuple(lat.shape)}"
            )
        levels.append(HistoryInput(tuple(level.kernel), lat, _indices(level.indices, b, lat.shape[2], f"{name}.indices")))
    return timestep_b, guidance_b, latent_indices, levels
