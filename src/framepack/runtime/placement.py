"""Where weights live and in what format: the mechanisms a memory plan applies.

``runtime/plan.py`` decides; this file only does, on any ``nn.Module``:

* ``store_weights(module, mode)``: keep weights as fp32, bf16, fp8 (e4m3fn, one scale per tensor)
  or int8 (one scale per output channel); fp8 and int8 layers compute in the activations' dtype.
* ``offload_blocks(model, onload, ...)``: diffusers' block-level group offloading, to CPU memory or
  to a fresh directory on disk, with prefetch on a side CUDA stream when asked.
* ``used_once(module, device)``: a module on the device for one call, then back where it was.

Why our own fp8/int8 layer rather than diffusers' ``apply_layerwise_casting`` or torchao:

* ``apply_layerwise_casting`` stores ``weight.to(float8_e4m3fn)`` with no scale. e4m3fn's smallest
  normal number is 2**-6 = 0.0156: Gaussian weights of std 0.02 fall 57 % below it, among the
  subnormals, which keep fewer significant bits. One scale per tensor (amax / 448) moves them
  into the normal range, where rounding costs at most 2**-4 relative. benchmarks/precision.py
  measures both (docs/precision-and-offload.md).
* torchao's int8 weight-only tensors are tensor subclasses that diffusers' disk offload refuses
  ("safetensors cannot serialize TorchAO subclass tensors"); ours are plain int8 buffers plus a
  scale, so every storage mode composes with every offload mode.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WeightMode = Literal["fp32", "bf16", "fp8", "int8"]
WEIGHT_MODES: tuple[str, ...] = ("fp32", "bf16", "fp8", "int8")
OffloadTarget = Literal["cpu", "disk"]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448: the largest finite e4m3fn value
INT8_MAX = 127  # symmetric range [-127, 127]: -128 would make the grid lopsided

# Modules kept in the compute dtype whatever the mode (regexes on qualified names, as in
# diffusers' skip patterns). The top-level velocity head: it is small, its error goes straight
# into the prediction, and FramePackTransformer.forward casts its input to ``proj_out.weight.dtype``.
KEEP_IN_COMPUTE_DTYPE: tuple[str, ...] = (r"^proj_out$",)

_FLOAT_MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored in fp8 or int8 with scales; computes in the input's dtype.

    ``weight``: (out, in) float8_e4m3fn or int8; ``weight_scale``: fp32, () per tensor (fp8) or
    (out, 1) per output channel (int8); ``bias``: (out,) in the compute dtype, or None. The real
    weight is ``weight * weight_scale`` (the convention of model/io.py's float8 loading and of
    diffusers), rebuilt for each call: only one layer's worth exists in the compute dtype.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # Frozen parameters, not buffers: diffusers' group offloading with a CUDA stream (prefetch)
        # moves a block's buffers on but never back, so as buffers every block's 8-bit weights
        # would stay on the GPU (measured on an H200: the 13B's fp8 offload ran out of memory at
        # 12 GB). As parameters they travel like any Linear's weight.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: Literal["fp8", "int8"],
                    compute_dtype: torch.dtype | None = None) -> "QuantizedLinear":
        """Quantize ``linear``'s weight; a float8 weight loaded by model/io.py (with or without
        its ``weight_scale``) is adopted as it is for fp8, not rounded a second time. The bias is
        cast to ``compute_dtype`` (default: kept as it is)."""
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype or linear.bias.dtype, copy=True)
        if mode == "fp8" and linear.weight.dtype == FP8:
            return cls(linear.weight.detach(), _loaded_scale(linear), bias)
        weight = _real_weight(linear, torch.float32)
        quantize = quantize_fp8 if mode == "fp8" else quantize_int8
        return cls(*quantize(weight), bias)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the model sees it, in ``dtype``: (out, in)."""
        # fp8 and int8 values are exact in bf16 and fp32, so only the product rounds.
        return self.weight.to(dtype) * self.weight_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.weight.dtype}"


def _loaded_scale(linear: nn.Module) -> torch.Tensor:
    scale = getattr(linear, "weight_scale", None)  # absent in unscaled community files: scale 1
    return torch.ones((), device=linear.weight.device) if scale is None else scale.detach().float()


def _real_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight a Linear computes with, whatever it was loaded as (float8 + scale or not)."""
    weight = linear.weight.detach()
    if weight.dtype == FP8:
        return (weight.float() * _loaded_scale(linear)).to(dtype)
    return weight.to(dtype)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, fp32 per-tensor scale) with ``weight ~= q * scale``.

    The scale maps the largest magnitude to 448, so values >= amax * 2**-6 / 448 are normal
    numbers and round with relative error <= 2**-4 (3 mantissa bits, round to nearest); smaller
    ones are subnormal, with absolute error <= 2**-10 * scale.
    """
    w = weight.detach().float()
    amax = w.abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 per-output-channel scale (out, 1)); error per weight <= scale / 2."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantized_linear_names(module: nn.Module, keep: Sequence[str] = KEEP_IN_COMPUTE_DTYPE) -> list[str]:
    """The rule for which layers fp8 / int8 storage puts in 8 bits, in one place (store_weights
    applies it, the planner's runtime.sizes counts with it): every module of exact type
    ``nn.Linear`` (subclasses, e.g. attention's out_proj, may read ``.weight`` in ways
    QuantizedLinear can't serve) whose qualified name matches none of ``keep``. The lean loader
    (model/io.py ``fp8_weight_names``) keeps float8 the subset inside the blocks (docs/memory.md)."""
    patterns = [re.compile(p) for p in keep]
    return [name for name, child in module.named_modules()
            if type(child) is nn.Linear and name and not any(p.search(name) for p in patterns)]


def store_weights(
    module: nn.Module,
    mode: str,
    compute_dtype: torch.dtype | None = None,
    keep: Sequence[str] = KEEP_IN_COMPUTE_DTYPE,
) -> nn.Module:
    """Store ``module``'s weights as ``mode`` (fp32, bf16, fp8, int8), in place; returns it.

    fp32/bf16: the whole module is cast (``compute_dtype`` must be None or the same dtype).
    fp8/int8: everything else is cast to ``compute_dtype`` (default bf16), and every plain
    ``nn.Linear`` whose qualified name matches none of ``keep`` becomes a ``QuantizedLinear``.
    Convolutions, norms and embeddings stay in the compute dtype (they are a small share of a
    video transformer's bytes). Linears loaded with float8 weights (``from_pretrained(...,
    storage_dtype=torch.float8_e4m3fn)``) are adopted for fp8, dequantized with their
    ``weight_scale`` for the other modes. Apply after any ``.to(dtype)``: casting the module
    later would upcast the fp8 buffers (float8 counts as a floating type) and undo the saving.
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"unknown weight storage mode {mode!r}; choose one of {', '.join(WEIGHT_MODES)}")
    if mode in _FLOAT_MODES:
        dtype = _FLOAT_MODES[mode]
        if compute_dtype not in (None, dtype):
            raise ValueError(f"weight mode {mode} computes in {dtype}, not {compute_dtype}")
        _dequantize_loaded(module, dtype)
        return module.to(dtype)
    compute_dtype = compute_dtype or torch.bfloat16
    if not compute_dtype.is_floating_point or compute_dtype.itemsize < 2:
        raise ValueError(f"compute dtype must be a 16- or 32-bit float type, not {compute_dtype}")
    targets = quantized_linear_names(module, keep)
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        setattr(parent, leaf, QuantizedLinear.from_linear(getattr(parent, leaf), mode, compute_dtype))  # type: ignore[arg-type]
    _dequantize_loaded(module, compute_dtype)  # float8 weights of the kept layers, if loaded so
    _cast_unquantized(module, compute_dtype)
    log.debug("stored %d Linear layers as %s (compute %s)", len(targets), mode, compute_dtype)
    return module


def _dequantize_loaded(module: nn.Module, dtype: torch.dtype) -> None:
    """Replace float8 weights left by model/io.py (outside QuantizedLinear) by their real values."""
    for m in module.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, QuantizedLinear) or not isinstance(weight, torch.Tensor) or weight.dtype != FP8:
            continue
        real = _real_weight(m, dtype)
        if hasattr(m, "weight_scale"):
            delattr(m, "weight_scale")
        m.weight = nn.Parameter(real, requires_grad=False)


def _cast_unquantized(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating tensor to ``dtype`` except those a QuantizedLinear stores (its scales
    stay fp32: in bf16 they would add 2**-8 of error to every weight)."""
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            continue
        for p in m.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in m.named_buffers(recurse=False):
            if b.is_floating_point():
                setattr(m, name, b.to(dtype))


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers as stored (shared tensors counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def offload_blocks(
    model: nn.Module,
    onload: str | torch.device,
    offload_to: OffloadTarget = "cpu",
    path: str | Path | None = None,
    blocks_per_group: int = 1,
    prefetch: bool = False,
    block_modules: Sequence[str] | None = None,
) -> Path | None:
    """Keep ``model``'s blocks off the device; each group of blocks is moved on just for its call.

    diffusers' ``apply_group_offloading`` (block level) groups the children that are ModuleLists
    (FramePackTransformer's ``transformer_blocks`` and ``single_transformer_blocks``; pass
    ``block_modules`` for other layouts); the rest of the model is one more group, onloaded for
    the whole forward. ``offload_to="disk"`` writes each group once as safetensors in a NEW
    directory under ``path`` (returned), because diffusers reuses any file already there under
    the same group name, even one written for other weights; the caller removes it when done.
    ``prefetch`` loads the next group on a side CUDA stream while the current one computes.
    """
    from diffusers.hooks import apply_group_offloading

    onload = torch.device(onload)
    if offload_to not in ("cpu", "disk"):
        raise ValueError(f"offload_to must be 'cpu' or 'disk', not {offload_to!r}")
    if offload_to == "disk" and path is None:
        raise ValueError("offload to disk needs a path")
    if blocks_per_group < 1:
        raise ValueError(f"blocks_per_group must be >= 1, not {blocks_per_group}")
    if prefetch and onload.type != "cuda":
        raise ValueError(f"prefetch needs a CUDA onload device (a side stream), not {onload}")
    if prefetch and blocks_per_group != 1:
        raise ValueError("prefetch works one block at a time: use blocks_per_group=1")
    directory = None
    if offload_to == "disk":
        Path(path).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        directory = Path(tempfile.mkdtemp(prefix="framepack-offload-", dir=path))
    # block_modules only when asked: older diffusers releases lack the keyword
    extra = {} if block_modules is None else {"block_modules": list(block_modules)}
    apply_group_offloading(
        model,
        onload_device=onload,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=blocks_per_group,
        use_stream=prefetch,
        offload_to_disk_path=None if directory is None else str(directory),
        **extra,
    )
    log.debug("block offload: onload %s, offload to %s%s, %d block(s) per group, prefetch %s",
              onload, offload_to, f" ({directory})" if directory else "", blocks_per_group, prefetch)
    return directory


@contextmanager
def used_once(module: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """``with used_once(encoder, "cuda") as enc: enc(x)``: on ``device`` inside, back home after.

    For the text and image encoders, which run once per job and must leave the GPU before the
    transformer needs it. Home is the device of the first parameter or buffer (CPU if none).
    """
    first = next(iter((*module.parameters(), *module.buffers())), None)
    home = first.device if first is not None else torch.device("cpu")
    target = torch.device(device)
    module.to(target)
    try:
        yield module
    finally:
        module.to(home)
        if target.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back before the next component loads
