"""The one attention entry point: PyTorch SDPA with an optional key mask.

Batches with different text lengths are handled by a boolean key mask (B, 1, 1, L): padded keys
are invisible to every query, so each sample sees exactly what it would see alone. No varlen
kernel is needed, which is what lets us train batches on plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q, k, v: (B, L, H, d); key_mask: (B, L) bool, True = visible, or None. Returns (B, L, H*d)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)
