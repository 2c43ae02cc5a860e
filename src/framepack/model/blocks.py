"""Building blocks of the HunyuanVideo backbone that FramePack packs its context into.

Module and parameter names are those of the released checkpoints (see
``tests/data/framepack_13b_state_dict.json``): a block's attributes are named for the
state-dict keys they must produce, which is why a few look odd (``to_out.0``, ``ff.net.2``).

Shapes: B batch, L tokens, D model width, H heads, d head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..packing import Kernel
from .attention import attention
from .rope import apply_rope, replicate_pad_to_multiple

TIMESTEP_FEATURES = 256  # width of the sinusoidal timestep / guidance features
LN_EPS = 1e-6
# The token refiner's MLP is 4x wide whatever the config's mlp_ratio (HunyuanVideo fixes it).
REFINER_MLP_RATIO = 4.0


# ---- pure helpers -----------------------------------------------------------------------------


def timestep_features(t: torch.Tensor, dim: int = TIMESTEP_FEATURES, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [cos | sin] of a (B,) float timestep (DDPM style, cos first)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: LayerNorm without affine, then ``(1 + scale)`` and ``shift`` per sample. x: (B, L, D)."""
    x = F.layer_norm(x, x.shape[-1:], eps=LN_EPS)
    return x * (1 + scale[:, None]) + shift[:, None]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, H*d) -> (B, L, H, d)"""
    return x.unflatten(-1, (heads, -1))


# ---- small modules ----------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the head dim; the variance is computed in fp32 as in the released model."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(self.weight.dtype) * self.weight


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (timestep, guidance and pooled-text embedders)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ActivatedProjection(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return F.silu(x) if self.activation == "silu" else F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str = "gelu_tanh") -> None:
        super().__init__()
        # index 1 held a dropout in the original code; kept so the weights keep their names
        self.net = nn.Sequential(ActivatedProjection(dim, hidden, activation), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConditionEmbedding(nn.Module):
    """temb = timestep + guidance + pooled text (CLIP-L): the vector every AdaLN reads."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool) -> None:
        super().__init__()
        self.timestep_embedder = MLPEmbedder(TIMESTEP_FEATURES, dim)
        self.guidance_embedder = MLPEmbedder(TIMESTEP_FEATURES, dim) if guidance else None
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None) -> torch.Tensor:
        dtype = pooled.dtype
        temb = self.timestep_embedder(timestep_features(timestep).to(dtype)) + self.text_embedder(pooled)
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("guidance is required: this model has a distilled-guidance embedder")
            temb = temb + self.guidance_embedder(timestep_features(guidance).to(dtype))
        return temb


# ---- token refiner (LLaMA states -> model width) ----------------------------------------------


class SelfAttention(nn.Module):
    """Plain biased self-attention of the token refiner (no qk-norm, no RoPE)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](attention(q, k, v, key_mask))


class GateNorm(nn.Module):
    """SiLU -> Linear -> (gate_attn, gate_mlp) of a refiner block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_attn, gate_mlp = self.linear(F.silu(temb)).chunk(2, dim=-1)
        return gate_attn[:, None], gate_mlp[:, None]


class RefinerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ff = FeedForward(dim, int(dim * mlp_ratio), activation="silu")
        self.norm_out = GateNorm(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        gate_attn, gate_mlp = self.norm_out(temb)
        x = x + gate_attn * self.attn(self.norm1(x), key_mask)
        return x + gate_mlp * self.ff(self.norm2(x))


class RefinerStack(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.refiner_blocks = nn.ModuleList(RefinerBlock(dim, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.refiner_blocks:
            x = block(x, temb, key_mask)
        return x


class TokenRefiner(nn.Module):
    """Refines LLaMA hidden states, conditioned on the timestep and their own masked mean.

    The released model masks refiner attention with ``m_i & m_j``; a key-only mask gives the
    valid tokens the same result (their rows are all-valid anyway) and keeps padded rows finite.
    """

    def __init__(self, text_dim: int, dim: int, heads: int, layers: int, mlp_ratio: float = REFINER_MLP_RATIO) -> None:
        super().__init__()
        self.time_text_embed = ConditionEmbedding(dim, text_dim, guidance=False)
        self.proj_in = nn.Linear(text_dim, dim)
        self.token_refiner = RefinerStack(dim, heads, layers, mlp_ratio)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """text: (B, Lt, text_dim), mask: (B, Lt) bool or None (all valid) -> (B, Lt, D)"""
        if mask is None:
            pooled = text.float().mean(dim=1)
        else:
            weights = mask.float()[..., None]
            pooled = (text.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        temb = self.time_text_embed(timestep, pooled.to(text.dtype), None)
        return self.token_refiner(self.proj_in(text), temb, mask)


# ---- patch embedders ------------------------------------------------------------------------------


def patchify(conv: nn.Conv3d, latents: torch.Tensor) -> torch.Tensor:
    """Replicate-pad (B, C, T, H, W) to the conv's kernel, convolve, flatten to (B, L, D)."""
    kernel: Kernel = conv.kernel_size  # type: ignore[assignment]
    return conv(replicate_pad_to_multiple(latents, kernel)).flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel: Kernel) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return patchify(self.proj, latents)


def history_embedder_name(rate: int) -> str:
    """State-dict name of the embedder for kernel rate R: proj, proj_2x, proj_4x, ..."""
    return "proj" if rate == 1 else f"proj_{rate}x"


class HistoryEmbedder(nn.Module):
    """One patchify conv per history kernel (FramePack's ``clean_x_embedder``)."""

    def __init__(self, in_channels: int, dim: int, kernels: tuple[Kernel, ...]) -> None:
        super().__init__()
        self.names: dict[Kernel, str] = {}
        for kernel in kernels:
            name = history_embedder_name(kernel[0])
            self.names[tuple(kernel)] = name
            self.add_module(name, nn.Conv3d(in_channels, dim, kernel_size=kernel, stride=kernel))

    def forward(self, latents: torch.Tensor, kernel: Kernel) -> torch.Tensor:
        try:
            conv = getattr(self, self.names[tuple(kernel)])
        except KeyError:
            raise ValueError(f"no history embedder for kernel {tuple(kernel)}; have {list(self.names)}") from None
        return patchify(conv, latents)


class ImageProjection(nn.Module):
    """SigLIP tokens -> model width: Linear(E, 3D) -> SiLU -> Linear(3D, D)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(in_dim, 3 * dim)
        self.down = nn.Linear(3 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


# ---- transformer blocks -------------------------------------------------------------------------


class AdaLNZero(nn.Module):
    """Linear over silu(temb) -> ``chunks`` modulation vectors (shift, scale, gate, ...)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, chunks * dim)
        self.chunks = chunks

    def forward(self, temb_act: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(temb_act).chunk(self.chunks, dim=-1)


class DualStreamAttention(nn.Module):
    """Joint attention over [image; text] with separate projections per stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)

    def forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.heads
        q = apply_rope(self.norm_q(split_heads(self.to_q(img), h)), *rope)
        k = apply_rope(self.norm_k(split_heads(self.to_k(img), h)), *rope)
        v = split_heads(self.to_v(img), h)
        q_txt = self.norm_added_q(split_heads(self.add_q_proj(txt), h))
        k_txt = self.norm_added_k(split_heads(self.add_k_proj(txt), h))
        v_txt = split_heads(self.add_v_proj(txt), h)
        out = attention(
            torch.cat([q, q_txt], dim=1), torch.cat([k, k_txt], dim=1), torch.cat([v, v_txt], dim=1), key_mask
        )
        n_img = img.shape[1]
        return self.to_out[0](out[:, :n_img]), self.to_add_out(out[:, n_img:])


class DualStreamBlock(nn.Module):
    """MM-DiT block: each stream has its own AdaLN-Zero, projections and MLP; attention is joint.

    The stream arguments are named as in diffusers' blocks (``hidden_states`` the image stream,
    ``encoder_hidden_states`` the conditioning), so its cache hooks find them by name.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = AdaLNZero(dim, 6)
        self.norm1_context = AdaLNZero(dim, 6)
        self.attn = DualStreamAttention(dim, heads)
        self.ff = FeedForward(dim, int(dim * mlp_ratio))
        self.ff_context = FeedForward(dim, int(dim * mlp_ratio))

    def modulated_input(self, hidden_states: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        """The image stream as this block's attention reads it: AdaLN(x) with its first shift and scale."""
        shift, scale = self.norm1(temb_act)[:2]
        return modulate(hidden_states, shift, scale)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img, txt = hidden_states, encoder_hidden_states
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb_act)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb_act)
        attn_img, attn_txt = self.attn(modulate(img, shift, scale), modulate(txt, c_shift, c_scale), rope, key_mask)
        img = img + gate[:, None] * attn_img
        txt = txt + c_gate[:, None] * attn_txt
        img = img + gate_mlp[:, None] * self.ff(modulate(img, shift_mlp, scale_mlp))
        txt = txt + c_gate_mlp[:, None] * self.ff_context(modulate(txt, c_shift_mlp, c_scale_mlp))
        return img, txt


class SingleStreamAttention(nn.Module):
    """q, k, v of the single-stream block; no output projection (proj_out mixes it with the MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = RMSNorm(dim // heads), RMSNorm(dim // heads)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = self.heads
        q = apply_rope(self.norm_q(split_heads(self.to_q(x), h)), *rope)
        k = apply_rope(self.norm_k(split_heads(self.to_k(x), h)), *rope)
        return attention(q, k, split_heads(self.to_v(x), h), key_mask)


class SingleStreamBlock(nn.Module):
    """``x + gate * proj_out([attn(m) ; gelu(proj_mlp(m))])`` with m = AdaLN(x), x = [image; text].

    The rope tables cover the whole sequence with identity rotation on text tokens. The streams
    come in and go out separately, as in the dual-stream block and diffusers' single blocks, so
    step caches (diffusers' hooks, TeaCache) see the image stream's residual on its own.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.attn = SingleStreamAttention(dim, heads)
        self.norm = AdaLNZero(dim, 3)
        self.proj_mlp = nn.Linear(dim, int(dim * mlp_ratio))
        self.proj_out = nn.Linear(dim + int(dim * mlp_ratio), dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb_act: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_img = hidden_states.shape[1]
        x = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # (B, Limg + Lcond, D)
        shift, scale, gate = self.norm(temb_act)
        m = modulate(x, shift, scale)
        mixed = torch.cat([self.attn(m, rope, key_mask), F.gelu(self.proj_mlp(m), approximate="tanh")], dim=-1)
        update = gate[:, None] * self.proj_out(mixed)
        return hidden_states + update[:, :n_img], encoder_hidden_states + update[:, n_img:]


class OutputNorm(nn.Module):
    """Final AdaLN; the released weights chunk its linear as (scale, shift), in that order."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(temb_act).chunk(2, dim=-1)
        return modulate(x, shift, scale)
