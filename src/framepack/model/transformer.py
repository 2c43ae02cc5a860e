"""FramePackTransformer: the HunyuanVideo backbone with FramePack's packed history context.

This file only assembles. The blocks live in ``blocks.py``, RoPE in ``rope.py``, attention in
``attention.py``, checkpoint I/O in ``io.py``.

Packed image stream (coarsest history first, the noisy window last)::

    [ k4 history | k2 history | k1 history (incl. start frame) | noisy window ]

then ``[SigLIP image tokens | refined text tokens]`` as the conditioning stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TransformerConfig, resolve_config
from ..packing import Kernel
from .blocks import (
    ConditionEmbedding,
    DualStreamBlock,
    HistoryEmbedder,
    ImageProjection,
    OutputNorm,
    PatchEmbed,
    SingleStreamBlock,
    TokenRefiner,
)
from .inputs import HistoryInput, check_forward_inputs
from .io import load_transformer, save_transformer
from .rope import identity_rope, rope_cos_sin

# A step cache: given the image stream entering the blocks, the first block's modulated input
# (computed only if asked for) and the blocks themselves, returns the image stream leaving them.
BlockCache = Callable[
    [torch.Tensor, Callable[[], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]], torch.Tensor
]


@dataclass(frozen=True)
class _Context:
    shape: torch.Size  # of the noisy latents it was made for
    history: torch.Tensor | None  # (B, Lhist, D) the history levels' tokens, farthest first
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin over the history and the noisy window
    image_tokens: torch.Tensor | None  # (B, Li, D) projected SigLIP tokens


class FramePackTransformer(nn.Module):
    """Predicts the flow velocity of a noisy window of latent frames, given packed history.

    Parameter names and shapes equal the released ``lllyasviel/FramePackI2V_HY`` checkpoints.
    """

    def __init__(self, config: TransformerConfig | str = "hunyuan-13b") -> None:
        super().__init__()
        cfg = self.config = resolve_config(config)
        dim, heads, ratio = cfg.inner_dim, cfg.num_attention_heads, cfg.mlp_ratio
        self.x_embedder = PatchEmbed(cfg.in_channels, dim, cfg.patch)
        self.clean_x_embedder = (
            HistoryEmbedder(cfg.in_channels, dim, cfg.history_kernels) if cfg.has_clean_x_embedder else None
        )
        self.context_embedder = TokenRefiner(cfg.text_embed_dim, dim, heads, cfg.num_refiner_layers)
        self.image_projection = ImageProjection(cfg.image_proj_dim, dim) if cfg.has_image_proj else None
        self.time_text_embed = ConditionEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(dim, heads, ratio) for _ in range(cfg.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, ratio) for _ in range(cfg.num_single_layers)
        )
        self.norm_out = OutputNorm(dim)
        self.proj_out = nn.Linear(dim, cfg.out_channels * _volume(cfg.patch))
        self.gradient_checkpointing = False

    # ---- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        pooled_text: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        latent_indices: torch.Tensor | None = None,
        history: Sequence[HistoryInput] = (),
        guidance: torch.Tensor | None = None,
        cache: BlockCache | None = None,
        memo: dict | None = None,
    ) -> torch.Tensor:
        """Velocity (B, C, T, H, W) for noisy ``latents`` (B, C, T, H, W) at ``timestep`` (B,).

        text: (B, Lt, text_dim) LLaMA states with ``text_mask`` (B, Lt) bool (None = all valid);
        pooled_text: (B, pooled_dim); image_embeds: (B, Li, image_dim); latent_indices: (B, T)
        frame indices of the noisy window (default 0..T-1); history: context levels, nearest
        first; timestep and guidance are the model's units (sigma * 1000). ``cache`` is a step
        cache the sampler owns (``framepack.cache``): the model itself keeps no state between calls.
        ``memo``: a dict the caller keeps for calls whose history, window indices and image
        embeddings are the same (a section's steps): what depends only on them (the history's patch
        embeddings, the RoPE tables, the image tokens) is computed at the first call and reused.
        """
        b, _, t, height, width = latents.shape
        timestep, guidance, latent_indices, history = self._check_inputs(
            latents, timestep, text, text_mask, pooled_text, image_embeds, latent_indices, history, guidance
        )
        cfg, dtype = self.config, self.dtype
        grid = (t // cfg.patch_size_t, height // cfg.patch_size, width // cfg.patch_size)

        # Image stream: the history levels, each patchified by its own kernel, then the noisy window
        context = memo.get("context") if memo is not None else None
        if context is None:
            context = self._context(latents.shape, latent_indices, history, image_embeds, grid)
            if memo is not None:
                memo["context"] = context
        if context.shape != latents.shape:
            raise ValueError(f"memo made for latents of shape {tuple(context.shape)}, called with {tuple(latents.shape)}")
        noisy = self.x_embedder(latents.to(dtype))  # (B, T*h*w, D)
        img = torch.cat([context.history, noisy], dim=1) if context.history is not None else noisy  # (B, Limg, D)
        rope = context.rope

        # Conditioning stream: [SigLIP tokens | refined text], padded text only at the end.
        temb = self.time_text_embed(timestep, pooled_text.to(dtype), guidance)
        text, text_mask = compact_text(text.to(dtype), text_mask)
        txt = self.context_embedder(text, timestep, text_mask)
        if context.image_tokens is not None:
            txt = torch.cat([context.image_tokens, txt], dim=1)
        key_mask = None  # (B, Limg + Lcond) bool: image stream and SigLIP tokens always visible
        if text_mask is not None:
            key_mask = F.pad(text_mask, (img.shape[1] + txt.shape[1] - text_mask.shape[1], 0), value=True)

        temb_act = F.silu(temb)  # every AdaLN reads silu(temb); compute it once
        # single-stream blocks attend over [image; conditioning]: no rotation on conditioning tokens
        no_rope = identity_rope(b, txt.shape[1], rope[0].shape[-1], img.device)
        full_rope = (torch.cat([rope[0], no_rope[0]], dim=1), torch.cat([rope[1], no_rope[1]], dim=1))

        def blocks(img: torch.Tensor) -> torch.Tensor:
            return self._blocks(img, txt, temb_act, rope, full_rope, key_mask)

        if cache is None:
            img = blocks(img)
        else:  # the cache decides whether to run the blocks or reuse their last residual
            img = cache(img, lambda: self.transformer_blocks[0].modulated_input(img, temb_act), blocks)

        n_img, n_noisy = img.shape[1], noisy.shape[1]
        x = self.norm_out(img[:, n_img - n_noisy :], temb_act)  # keep the noisy window only
        x = self.proj_out(x.to(self.proj_out.weight.dtype))  # (B, T*h*w, C*pt*ph*pw)
        return unpatchify(x, grid, cfg.patch)

    # ---- helpers ---------------------------------------------------------------------------------

    def _context(self, shape: torch.Size, latent_indices: torch.Tensor, history: Sequence[HistoryInput],
                 image_embeds: torch.Tensor | None, grid: tuple[int, int, int]) -> _Context:
        """What a forward reads from its history, window indices and image embeddings only."""
        cfg, dtype = self.config, self.dtype
        streams: list[torch.Tensor] = []
        ropes = [self._rope(latent_indices, grid, (1, 1, 1))]
        for level in history:  # nearest first, so every level is put in front of the last
            streams.insert(0, self.clean_x_embedder(level.latents.to(dtype), level.kernel))
            ropes.insert(0, self._rope(level.indices, grid, _pool_kernel(level.kernel, cfg.patch)))
        rope = (torch.cat([c for c, _ in ropes], dim=1), torch.cat([s for _, s in ropes], dim=1))
        image = None if self.image_projection is None else self.image_projection(image_embeds.to(dtype))
        return _Context(shape, torch.cat(streams, dim=1) if streams else None, rope, image)

    def _rope(self, indices: torch.Tensor, grid: tuple[int, int, int], pool: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        return rope_cos_sin(indices, grid[1], grid[2], cfg.rope_axes_dim, cfg.rope_theta, pool)

    def _blocks(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        full_rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """All dual- then single-stream blocks; returns the image stream (B, Limg, D)."""
        for block in self.transformer_blocks:
            img, txt = self._run(block, img, txt, temb_act, rope, key_mask)
        for block in self.single_transformer_blocks:
            img, txt = self._run(block, img, txt, temb_act, full_rope, key_mask)
        return img

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Recompute activations in backward: memory per block instead of per model.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_inputs(self, *args):
        return check_forward_inputs(self.config, *args)

    # ---- dtype, precision, checkpointing ----------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    def cast(self, dtype: torch.dtype, fp32_output_head: bool = False) -> "FramePackTransformer":
        """Cast all weights to ``dtype``; optionally keep ``proj_out`` (the velocity head) in fp32."""
        self.to(dtype)
        if fp32_output_head:
            self.proj_out.to(torch.float32)
        return self

    def enable_gradient_checkpointing(self, enabled: bool = True) -> "FramePackTransformer":
        self.gradient_checkpointing = enabled
        return self

    # ---- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        config: TransformerConfig | str | Path | None = None,
        dtype: torch.dtype | None = None,
        storage_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        pin_memory: bool = False,
        mapped: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
    ) -> "FramePackTransformer":
        """Load from a local directory, a single ``.safetensors`` file, or a Hugging Face hub id.

        Directories follow the layout of ``lllyasviel/FramePackI2V_HY`` (config.json + sharded
        safetensors + index). ``config`` overrides the directory's config.json (a single file
        without one beside it assumes ``hunyuan-13b``). ``dtype`` (the compute dtype) defaults to
        the stored dtype (bf16 for float8 storage). ``storage_dtype=torch.float8_e4m3fn`` keeps the
        blocks' linear weights in float8 with their scales (see ``model/io.py``); ``pin_memory``
        with a CUDA ``device`` puts the weights in pinned host memory instead, for offloading;
        ``mapped`` leaves float8 weights of a float8 file in the file's pages (for disk offload).
        Tensors are read one at a time from memory-mapped files: peak RSS is the model plus about
        one tensor. Hub downloads are cached and resumable (huggingface_hub).
        """
        return load_transformer(
            cls,
            source,
            config=config,
            dtype=dtype,
            storage_dtype=storage_dtype,
            device=device,
            pin_memory=pin_memory,
            mapped=mapped,
            revision=revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors shards (with an index) loadable here and in diffusers."""
        save_transformer(self, directory, max_shard_size=max_shard_size)


def _volume(kernel: Kernel) -> int:
    return kernel[0] * kernel[1] * kernel[2]


def _pool_kernel(kernel: Kernel, patch: Kernel) -> Kernel:
    """How many noisy-window tokens one history token covers, per axis."""
    return (kernel[0] // patch[0], kernel[1] // patch[1], kernel[2] // patch[2])


def compact_text(text: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Move valid tokens to the front and crop to the longest sample.

    Returns a mask of None when no sample has padding left (batch 1 always), so attention takes
    SDPA's unmasked path; otherwise a prefix mask.
    """
    if mask is None or bool(mask.all()):
        return text, None
    counts = mask.sum(dim=1)
    longest = max(int(counts.max()), 1)
    # stable sort on "is padding": valid tokens keep their order and come first
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :longest]
    text = torch.gather(text, 1, order[..., None].expand(-1, -1, text.shape[-1]))
    mask = torch.arange(longest, device=mask.device)[None] < counts[:, None]
    return text, (None if bool(mask.all()) else mask)


def unpatchify(x: torch.Tensor, grid: tuple[int, int, int], patch: Kernel) -> torch.Tensor:
    """(B, T*h*w, C*pt*ph*pw) -> (B, C, T*pt, h*ph, w*pw)"""
    t, h, w = grid
    pt, ph, pw = patch
    x = x.unflatten(1, (t, h, w)).unflatten(-1, (-1, pt, ph, pw))  # (B, t, h, w, C, pt, ph, pw)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
