"""3-axis rotary position embedding (RoPE) and its pooled form for compressed history frames.

Pure functions. Shapes: B batch, T frames, h x w the post-patch grid of the noisy window, d the
head dim, L tokens. cos/sin tables are fp32 and carry a batch axis because every sample may
have its own frame indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import Kernel


def axis_angles(positions: torch.Tensor, dim: int, theta: float) -> torch.Tensor:
    """RoPE angles ``pos * theta^(-2k/dim)`` for k < dim/2, each repeated for its (re, im) pair.

    positions: (...,) float -> (..., dim)
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    freqs = 1.0 / (theta**exponents)
    angles = positions.to(torch.float32)[..., None] * freqs
    return angles.repeat_interleave(2, dim=-1)


def rope_grid(
    frame_indices: torch.Tensor, height: int, width: int, axes_dim: tuple[int, int, int], theta: float
) -> torch.Tensor:
    """Angles for every (t, y, x) of a T x h x w grid.

    The t position is the given frame index (FramePack's "random access" into time), y and x
    count the post-patch grid of the noisy window for every stream.

    frame_indices: (B, T) -> angles (B, T, h, w, d)
    """
    b, t = frame_indices.shape
    device = frame_indices.device
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    a_t = axis_angles(frame_indices, axes_dim[0], theta)[:, :, None, None, :].expand(b, t, height, width, -1)
    a_y = axis_angles(ys, axes_dim[1], theta)[None, None, :, None, :].expand(b, t, height, width, -1)
    a_x = axis_angles(xs, axes_dim[2], theta)[None, None, None, :, :].expand(b, t, height, width, -1)
    return torch.cat([a_t, a_y, a_x], dim=-1)


def replicate_pad_to_multiple(x: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Pad the last three axes of (B, C, T, H, W) at the end, by repetition, to multiples of kernel."""
    pads: list[int] = []
    for size, k in zip(reversed(x.shape[-3:]), reversed(kernel)):
        pads += [0, (-size) % k]
    if not any(pads):
        return x
    return F.pad(x, pads, mode="replicate")


def rope_cos_sin(
    frame_indices: torch.Tensor,
    height: int,
    width: int,
    axes_dim: tuple[int, int, int],
    theta: float,
    pool: Kernel = (1, 1, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for one stream, flattened in (t, h, w) token order.

    For a history level patchified ``pool`` times coarser than the noisy window, the full-
    resolution cos and sin grids are replicate-padded and average-pooled with that kernel
    (cos and sin separately, as the released model was trained), so a compressed token sits at
    the mean rotation of the positions it covers.

    frame_indices: (B, T) -> cos, sin: (B, L, d)
    """
    angles = rope_grid(frame_indices, height, width, axes_dim, theta)  # (B, T, h, w, d)
    cos, sin = angles.cos(), angles.sin()
    if pool != (1, 1, 1):
        cos, sin = (avg_pool_grid(table, pool) for table in (cos, sin))
    return cos.flatten(1, 3), sin.flatten(1, 3)


def avg_pool_grid(table: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """(B, T, h, w, d) -> (B, T', h', w', d), replicate-padded then averaged over ``kernel``."""
    grid = table.permute(0, 4, 1, 2, 3)  # (B, d, T, h, w)
    grid = F.avg_pool3d(replicate_pad_to_multiple(grid, kernel), kernel, stride=kernel)
    return grid.permute(0, 2, 3, 4, 1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(re, im) pairs on the last axis -> (-im, re): multiplication by i."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys. x: (B, L, H, d); cos, sin: (B, L, d) fp32, equal within each pair
    (one angle per pair). Computed in fp32.

    ``x * cos + rotate_pairs(x) * sin`` as one complex product per pair, ``(re + i im)(cos + i sin)``:
    the same float operations (tested bit for bit), without materialising the rotated copy (3x
    faster on CPU, where it was a seventh of the transformer's time). Under torch.compile the same
    product in real arithmetic: inductor generates no code for complex tensors (it warned so on an
    H200 and ran them as unfused eager kernels), while the definition itself fuses into one kernel."""
    xf = x.float()
    if torch.compiler.is_compiling():
        return (xf * cos[:, :, None] + rotate_pairs(xf) * sin[:, :, None]).to(x.dtype)
    turn = torch.complex(cos[..., 0::2], sin[..., 0::2])[:, :, None, :]
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * turn).flatten(-2)
    return out.to(x.dtype)


def identity_rope(batch: int, length: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos = 1, sin = 0: positions for tokens that carry no RoPE (text, image embeddings)."""
    return (
        torch.ones(batch, length, dim, device=device, dtype=torch.float32),
        torch.zeros(batch, length, dim, device=device, dtype=torch.float32),
    )
