"""``generate --compile``: torch.compile of the transformer's blocks, compiled once per run.

Only the blocks are compiled, not the whole forward: the forward packs a history whose layout is
Python data (levels, kernels), and the blocks are where the time goes. Each block class is
traced once and every instance reuses that code (its parameters are inputs, not constants).

Sequence lengths are symbolic from the first trace (``dynamic=True``): the packed length changes
between sections only through what fills the history and the text length through the prompt of
each section, and neither must trigger a recompilation once the first section has compiled.
"""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks ``compile_blocks`` compiles: dual-stream then single-stream."""
    return [*model.transformer_blocks, *model.single_transformer_blocks]


def compile_problem(attention: str) -> str | None:
    """Why the blocks cannot be compiled with this attention backend (one line), or None.

    Compiled blocks are traced with SDPA: the flash-attn and SageAttention kernels are picked per
    forward outside the graph (model/attention.py), which torch.compile cannot follow.
    """
    if attention == "sdpa":
        return None
    return f"--compile works with --attention sdpa only, not {attention}"


def compile_blocks(model: nn.Module, attention: str = "sdpa") -> int:
    """Compile every block of ``model`` in place (``nn.Module.compile``); returns how many.

    The first forward compiles (seconds to minutes); the weights, their names and the module tree
    are unchanged, so loading, offloading hooks and state dicts work as before. ValueError with
    :func:`compile_problem`'s line for another attention backend than SDPA.
    """
    problem = compile_problem(attention)
    if problem:
        raise ValueError(problem)
    blocks = compiled_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    log.info("torch.compile: %d transformer blocks (compiled during the first section)", len(blocks))
    return len(blocks)
