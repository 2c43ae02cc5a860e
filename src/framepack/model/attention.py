"""The one attention entry point: PyTorch SDPA with an optional key mask, or flash / sage attention.

Batches with different text lengths are handled by a boolean key mask (B, 1, 1, L): padded keys
are invisible to every query, so each sample sees exactly what it would see alone. No varlen
kernel is needed, which is what lets us train batches on plain PyTorch.

The kernel is SDPA unless a run chose another with :func:`use_attention` (``generate
--attention``): flash-attn's ``flash_attn_func`` or SageAttention's ``sageattn``, both on CUDA only
and only where their package is installed. Neither takes a key mask, so a masked batch runs them
one sample at a time over that sample's visible keys (what SDPA's mask computes).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (B, L, H, d) x3 -> (B, L, H, d)

BACKENDS = ("sdpa", "flash", "sage")
# backend -> (module to import, what to pip install)
PACKAGES = {"flash": ("flash_attn", "flash-attn"), "sage": ("sageattention", "sageattention")}

# The kernel of the forward in progress in this thread (None: SDPA). Set only for the length of a
# forward by use_attention's hooks, so nothing outlives the run that chose it.
_kernel: ContextVar[Kernel | None] = ContextVar("framepack_attention_kernel", default=None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, L, H, d); key_mask: (B, L) bool, True = visible, or None. Returns (B, L, H*d)."""
    # compiled blocks are traced with SDPA (torch.compile cannot read a ContextVar); compile_blocks
    # refuses another backend, so this never hides a choice
    kernel = None if torch.compiler.is_compiling() else _kernel.get()
    if kernel is None:
        return sdpa(q, k, v, key_mask)
    return by_sample(kernel, q, k, v, key_mask)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def by_sample(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None) -> torch.Tensor:
    """A mask-free kernel over a key-masked batch: each sample alone, over its visible keys."""
    if key_mask is None:
        return kernel(q, k, v).flatten(2)
    outs = [kernel(q[i : i + 1], k[i : i + 1, key_mask[i]], v[i : i + 1, key_mask[i]]) for i in range(len(q))]
    return torch.cat(outs).flatten(2)


def missing_for(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run on ``device`` (one line), or None if it can."""
    if backend not in BACKENDS:
        return f"unknown attention {backend!r}; choose from {', '.join(BACKENDS)}"
    if backend == "sdpa":
        return None
    module, package = PACKAGES[backend]
    problems = []
    if torch.device(device).type != "cuda":
        problems.append(f"a CUDA device (this run is on {torch.device(device).type})")
    if importlib.util.find_spec(module) is None:
        problems.append(f"the {package} package (pip install {package})")
    return f"--attention {backend} needs {' and '.join(problems)}" if problems else None


def load_kernel(backend: str) -> Kernel | None:
    """The kernel for ``backend`` (None for SDPA); its package must be importable (see missing_for)."""
    if backend == "sdpa":
        return None
    if backend == "flash":
        flash = importlib.import_module("flash_attn").flash_attn_func
        return lambda q, k, v: _half(flash, q, k, v)
    sage = importlib.import_module("sageattention").sageattn
    return lambda q, k, v: _half(lambda a, b, c: sage(a, b, c, tensor_layout="NHD", is_causal=False), q, k, v)


def _half(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Both kernels take fp16/bf16 only: an fp32 run computes attention in bf16 (and says so in the docs)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return kernel(q, k, v)
    return kernel(q.bfloat16(), k.bfloat16(), v.bfloat16()).to(q.dtype)


def use_attention(model: torch.nn.Module, backend: str) -> Callable[[], None]:
    """Every forward of ``model`` uses ``backend``'s kernel; returns a function that undoes it.

    Forward hooks set the kernel for the length of each call, in whichever thread makes it (the
    pipeline samples in a worker thread), and leave SDPA in force outside.
    """
    kernel = load_kernel(backend)
    if kernel is None:
        return lambda: None
    tokens: list = []

    def enter(module, args, kwargs):
        tokens.append(_kernel.set(kernel))

    def leave(module, args, kwargs, output):
        _kernel.reset(tokens.pop())

    handles = [model.register_forward_pre_hook(enter, with_kwargs=True),
               model.register_forward_hook(leave, with_kwargs=True, always_call=True)]
    return lambda: [h.remove() for h in handles] and None
