"""Reusing the HunyuanVideo VAE's decoded temporal tiles from one section's decode to the next."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

NAME = "framepack_repeated_tiles"


def _digest(x: torch.Tensor) -> tuple:
    data = x.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return tuple(x.shape), x.dtype, hashlib.blake2b(memoryview(data), digest_size=16).digest()


class RepeatedTiles(ModelHook):
    """A diffusers hook on the VAE's decoder that gives back, instead of decoding it again, the output
    for an input it decoded in the previous ``decode`` call.

    diffusers decodes a span of more than 4 latents in temporal tiles of 5 latents every 3, each tile
    on its own (``AutoencoderKLHunyuanVideo._temporal_tiled_decode``), and FramePack decodes each
    section together with the 9 latents of the section before it: two of a section's six tiles hold
    only latents the previous section's decode already tiled the same way (window 9, both modes),
    so a third of the decode repeats. The decoder runs only on its input, so the same input bits give
    the same output bits (tested bit for bit on the CPU against diffusers' own decode; on CUDA it
    relies on the same kernel being chosen for the same shapes, as cuDNN does unless benchmark mode is
    on). Outputs are kept on the CPU (diffusers' blend writes into the tiles, so copies go out), the
    tiles decoded in one call until the end of the next: a section's span shares latents only with
    the span before it (``runtime.plan.kept_tile_bytes`` counts them in the plan's host memory).
    """

    def __init__(self) -> None:
        super().__init__()
        self.previous: dict[tuple, torch.Tensor] = {}
        self.current: dict[tuple, torch.Tensor] = {}
        self.decoded = 0  # decoder runs, for tests and benchmarks

    @classmethod
    def attach(cls, decoder: torch.nn.Module) -> RepeatedTiles:
        hook = cls()
        HookRegistry.check_if_exists_or_initialize(decoder).register_hook(hook, NAME)
        return hook

    @contextmanager
    def call(self) -> Iterator[None]:
        self.previous, self.current = self.current, {}
        try:
            yield
        finally:
            self.previous = {}

    def new_forward(self, module: torch.nn.Module, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            return self.fn_ref.original_forward(z, *args, **kwargs)
        key = _digest(z)
        kept = self.previous.pop(key, None)  # a tile reused once holds older latents: not needed again
        if kept is not None:
            return kept.to(z.device, copy=True)
        self.decoded += 1
        out = self.fn_ref.original_forward(z)
        self.current[key] = out.detach().to("cpu", copy=True)
        return out
