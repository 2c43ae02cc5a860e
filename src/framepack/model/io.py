"""Checkpoint I/O in the layout of ``lllyasviel/FramePackI2V_HY``.

A directory holds ``config.json`` and either one ``diffusion_pytorch_model.safetensors`` or
shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` with an index. diffusers'
``save_pretrained`` writes the same layout, so directories move freely between the two.

Loading builds the model on the meta device and checks every name, shape and dtype from the
safetensors headers before reading any data. Then each tensor is read a block of rows at a time,
each block mapped from the file, cast (or quantized to float8) straight into a fresh tensor on the
target device (or in pinned host memory), and unmapped: no state dict is ever collected and no
file stays mapped, so peak RSS is the model plus a few MB (benchmarks/loading.py measures it).

float8 storage (``storage_dtype=torch.float8_e4m3fn``): the weights of the linear layers inside
the transformer blocks (:func:`fp8_weight_names`) stay float8_e4m3fn; everything else is loaded
in the compute dtype. The scale convention, shared with whatever computes with these weights:

    a module whose ``weight`` is float8 and that has a float32 buffer ``weight_scale``
    (shape () per tensor, or (out_features, 1) per output channel) computes with
    ``weight.float() * weight_scale`` (:func:`dequantize`); without the buffer, the scale is 1.

Files as the community ships them load as they are: float8 weights with or without a companion
scale ``<module>.weight_scale`` (diffusers, ours) or ``<module>.scale_weight`` (ComfyUI, kijai's
"scaled" files); ComfyUI's ``scaled_fp8`` marker and input scales are dropped (activation hints,
meaningless when the matmul runs in bf16). With another storage, a scaled weight is dequantized
tensor by tensor, ``(weight.float() * scale).to(dtype)``.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import CONFIG_NAME, TransformerConfig, resolve_config

if TYPE_CHECKING:
    from .transformer import FramePackTransformer

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"
DEFAULT_PRESET = "hunyuan-13b"

# safetensors dtype tags we accept, and the torch dtype they hold
STORAGE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, or not matching the model."""


# ---- locating files ---------------------------------------------------------------------------------


def resolve_source(
    source: str | Path,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local file or directory, or a hub id fetched (and cached) by huggingface_hub.

    Only files matching ``allow_patterns`` are fetched (default: the JSON and safetensors files of
    ``subfolder``), so a repository's other large files are never downloaded.
    """
    path = Path(source).expanduser()
    if path.exists():
        path = path / subfolder if subfolder else path
        if not path.exists():
            raise CheckpointError(f"no subfolder {subfolder!r} in {source}")
        return path
    if not _HUB_ID.match(str(source)) or str(source).startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint not found: {source} (no such file or directory)")
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = allow_patterns or [f"{prefix}*.json", f"{prefix}*.safetensors"]
    return _download(str(source), revision, subfolder, cache_dir, local_files_only, patterns)


def _download(repo_id: str, revision, subfolder, cache_dir, local_files_only, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        # cached, and resumed where a previous download stopped
        root = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=patterns,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot get {repo_id!r} from the Hugging Face Hub ({first_line}); "
            "check the id and network, or pass a local directory"
        ) from None
    path = Path(root) / subfolder if subfolder else Path(root)
    if not path.exists():
        raise CheckpointError(f"no subfolder {subfolder!r} in {repo_id}")
    return path


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint file or directory, in load order."""
    if path.is_file():
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from None
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing[:5])}")
        return files
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors weights in {path}")
    return files


# How pickles start: torch.save's zip archive, or a bare pickle (protocol 2+ opcode)
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def is_pickle(file: Path) -> bool:
    """Whether ``file`` holds a torch/pickle checkpoint (whatever its name says).

    A safetensors file starts with its header's length (8 bytes, little-endian) and then the
    header's "{"; that length's low byte may well be 0x80, a bare pickle's first byte, so what
    looks like safetensors is never called a pickle."""
    try:
        with open(file, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return False
    return head.startswith(PICKLE_MAGIC)


def read_headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """name -> (shape, dtype tag, file) from the safetensors headers only (no tensor data).

    safetensors checks that the header's offsets cover the file exactly, so a truncated file
    fails here, before any data is read."""
    entries: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        if is_pickle(file):
            raise CheckpointError(f"{file} is a pickle (torch.save) file, not safetensors; framepack does not "
                                  "load pickles, since loading one can run code: convert it to safetensors")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    if name in entries:
                        raise CheckpointError(f"tensor {name!r} appears in both {entries[name][2].name} and {file.name}")
                    entries[name] = (tuple(view.get_shape()), view.get_dtype(), file)
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types, OSError, or ValueError
            raise CheckpointError(f"{file}: not a readable safetensors file, or truncated ({exc})") from None
    return entries


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[tuple[int, ...], str, Path]]
) -> None:
    """Raise CheckpointError naming the first few missing, unexpected and mis-shaped tensors."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{k} {found[k][0]} (model expects {expected[k]})"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k][0]) != tuple(expected[k])
    ]
    bad_dtype = sorted(f"{k} ({found[k][1]})" for k in found if found[k][1] not in STORAGE_DTYPES)
    if missing:
        problems.append(f"{len(missing)} missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors with the wrong shape: {_listing(mismatched, 3)}")
    if bad_dtype:
        problems.append(f"unsupported storage dtypes (want F32, F16, BF16 or F8_E4M3): {_listing(bad_dtype, 3)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


# ---- float8 storage: which weights, and the scale convention --------------------------------------

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448: the largest finite e4m3fn value
SCALE_NAME = "weight_scale"  # the buffer beside a float8 weight (see the module docstring)
# Companion of "<module>.weight" holding its scale: ours and diffusers' spelling, then ComfyUI's and kijai's
SCALE_SUFFIXES = (".weight_scale", ".scale_weight")
# ComfyUI's scaled-fp8 marker, input (activation) scales and per-layer format notes: hints for fp8
# matmuls on the activations; our matmuls run in bf16, so they carry nothing we use.
IGNORED_NAMES = ("scaled_fp8",)
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
# The blocks hold ~97% of the 13B model's parameters; embedders, the token refiner and the output
# head stay in the compute dtype (small, and the most sensitive to rounding).
FP8_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")


def fp8_weight_names(model: nn.Module) -> set[str]:
    """The parameters kept float8 when float8 storage is chosen: the weights of the layers that
    fp8 storage quantizes (``runtime.placement.quantized_linear_names``, the one rule the planner
    and ``store_weights`` use), restricted to those inside the blocks. The rest of them load in
    the compute dtype; ``store_weights(model, "fp8")`` then adopts these and quantizes the rest."""
    from ..runtime.placement import quantized_linear_names

    return {f"{name}.weight" for name in quantized_linear_names(model) if name.startswith(FP8_BLOCKS)}


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight a layer computes with: ``weight.float() * scale`` (scale None = 1), in ``dtype``."""
    if scale is None:
        return weight.to(dtype)
    return (weight.float() * scale.to(weight.device)).to(dtype)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax scaling into e4m3fn: (float8 weight, float32 scale of shape ()).

    A plain cast would flush most of a typical weight (|w| ~ 1e-2) into e4m3's few subnormals;
    scaling the largest magnitude to 448 uses the whole range."""
    amax = weight.detach().abs().max().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_scale(module: nn.Module) -> torch.Tensor | None:
    """A module's float8 weight scale, or None (scale 1)."""
    return module._buffers.get(SCALE_NAME)


def _scale_owner(name: str) -> str | None:
    """"x.weight" for a scale companion "x.weight_scale" / "x.scale_weight", else None."""
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


Found = dict[str, tuple[tuple[int, ...], str, Path]]


def split_companions(found: Found) -> tuple[Found, dict[str, str], list[str]]:
    """(tensors the model holds, weight name -> its scale's name, ignored names).

    A scale whose weight is not in the file stays among the tensors, so the check names it."""
    ignored = sorted(n for n in found if n in IGNORED_NAMES or n.endswith(IGNORED_SUFFIXES))
    scales: dict[str, str] = {}
    for name in found:
        owner = _scale_owner(name)
        if owner is None or owner not in found:
            continue
        if owner in scales:
            raise CheckpointError(f"{owner} has two scales in the checkpoint: {scales[owner]} and {name}")
        scales[owner] = name
    dropped = set(ignored) | set(scales.values())
    return {n: e for n, e in found.items() if n not in dropped}, scales, ignored


def check_scales(found: Found, scales: dict[str, str]) -> None:
    """Each scale is a float tensor with one value, or one per output channel of its weight."""
    problems = []
    for weight, scale in sorted(scales.items()):
        shape, tag, _ = found[scale]
        out = found[weight][0][0] if found[weight][0] else 1
        numel = _numel(shape)
        if tag not in STORAGE_DTYPES or tag == "F8_E4M3":
            problems.append(f"{scale} is {tag} (want F32, F16 or BF16)")
        elif numel not in (1, out):
            problems.append(f"{scale} has shape {shape} (want one value, or {out}: one per output channel)")
    if problems:
        raise CheckpointError("unusable float8 scales: " + _listing(problems, 3))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _scale_shape(scale: torch.Tensor, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """float32, shape () or (out, 1, ...): broadcastable against the weight."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(weight_shape[:1] + (1,) * (len(weight_shape) - 1))


# ---- reading tensors lazily -----------------------------------------------------------------------

# Tensors are read a block of rows at a time, each block through its own short-lived mapping of the
# file: what the file adds to our resident set is one block, not the tensor (a 13B block's MLP
# weight is 113M elements) nor the shard (a mapping keeps every page it touched resident until it
# is closed). Arithmetic (dequantizing, quantizing) runs in one reused float32 scratch block, so no
# allocation churns the heap. 1M elements: 4 MB of float32.
BLOCK_ELEMENTS = 1 << 20


def data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) byte offsets in ``file`` of each tensor's data.

    The safetensors layout: an 8-byte little-endian header length, the JSON header, then the data,
    which the header's ``data_offsets`` count from. Read after safe_open has validated the file."""
    with open(file, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {
        name: (base + entry["data_offsets"][0], base + entry["data_offsets"][1])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def row_blocks(shape: tuple[int, ...], block_elements: int | None = None) -> list[slice]:
    """Slices of the first axis, each of at most ``block_elements`` (default BLOCK_ELEMENTS)
    elements, one row at least."""
    if not shape:
        return [slice(None)]
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(_numel(shape[1:]), 1))
    return [slice(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [slice(0, 0)]


def _rows_of(tensor: torch.Tensor, rows: slice) -> torch.Tensor:
    """Rows of ``tensor``; a tensor of shape () (a scalar, or a per-tensor scale) as it is."""
    return tensor if tensor.dim() == 0 else tensor[rows]


def mapped_blocks(
    fd: int, span: tuple[int, int], dtype: torch.dtype, shape: tuple[int, ...]
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, zero-copy CPU view of those rows of the stored tensor), block after block.

    Each view holds the only reference to its own mapping, which is unmapped when the view is
    dropped (CPython frees at once): copy out of a view and let it go, and the file's pages leave
    the resident set block by block. A view kept by mistake keeps its pages, never dangles."""
    start, end = span
    if end == start:
        yield slice(None), torch.empty(shape, dtype=dtype)
        return
    row_bytes = (end - start) // shape[0] if shape else end - start
    for rows in row_blocks(shape):
        a, b = (start, end) if not shape else (start + rows.start * row_bytes, start + rows.stop * row_bytes)
        raw = _mapped_bytes(fd, a, b)
        yield rows, raw.view(dtype).reshape((rows.stop - rows.start, *shape[1:]) if shape else ())
        del raw


def _mapped_bytes(fd: int, a: int, b: int) -> torch.Tensor:
    """Bytes ``a:b`` of the file as a uint8 tensor over its own private mapping (nothing read yet)."""
    base = a - a % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be aligned to this
    # ACCESS_COPY: a private, writable mapping (torch.frombuffer warns on read-only buffers); we
    # never write, so no page is ever copied. frombuffer's tensor keeps the mmap object alive.
    return torch.frombuffer(mmap.mmap(fd, b - base, offset=base, access=mmap.ACCESS_COPY),
                            dtype=torch.uint8, count=b - a, offset=a - base)


def mapped_tensor(fd: int, span: tuple[int, int], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The stored tensor as a zero-copy view of its own private mapping of the file: no page is
    read until touched, and the mapping goes when the last view of it is dropped."""
    start, end = span
    if end == start:
        return torch.empty(shape, dtype=dtype)
    return _mapped_bytes(fd, start, end).view(dtype).reshape(shape)


class _Reader:
    """One checkpoint file open for reading, and the float32 scratch block shared by its tensors."""

    def __init__(self, file: Path, scratch: torch.Tensor) -> None:
        self.fd = os.open(file, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self.scratch = scratch

    def close(self) -> None:
        os.close(self.fd)

    def blocks(self, span: tuple[int, int], dtype: torch.dtype, shape: tuple[int, ...]):
        return mapped_blocks(self.fd, span, dtype, shape)

    def mapped(self, span: tuple[int, int], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        return mapped_tensor(self.fd, span, dtype, shape)

    def scaled(self, view: torch.Tensor, scale: torch.Tensor | None, rows: slice) -> torch.Tensor:
        """view.float() * scale, in the scratch block (valid until the next call)."""
        if view.numel() > self.scratch.numel():  # one row longer than a block
            self.scratch = torch.empty(view.numel(), dtype=torch.float32)
        work = self.scratch[: view.numel()].view(view.shape).copy_(view)
        return work if scale is None else work.mul_(_rows_of(scale, rows))


def read_tensor(
    reader: _Reader, span: tuple[int, int], stored: tuple[torch.dtype, tuple[int, ...]],
    scale: torch.Tensor | None, dtype: torch.dtype,
    make: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], quantize: bool, mapped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tensor made by ``make`` and filled from the file, its float8 scale or None).

    - ``quantize`` and stored float8: the bytes as they are; the file's scale (if any) kept;
      with ``mapped``, not even copied: a view of the file (:func:`mapped_tensor`).
    - ``quantize``: ``quantize_fp8(stored.float() * scale)``, the same values block by block.
    - else: ``stored.to(dtype)``, or ``(stored.float() * scale).to(dtype)`` with a scale.
    A fresh, allocator-aligned tensor even when nothing changes: CPU kernels round differently on
    data at an unaligned file offset, so a reloaded model would not reproduce its outputs."""
    stored_dtype, shape = stored
    blocks = lambda: reader.blocks(span, stored_dtype, shape)  # noqa: E731  (a fresh pass each call)
    if mapped and quantize and stored_dtype == FP8:
        return reader.mapped(span, FP8, shape), scale
    if quantize and stored_dtype == FP8 or not quantize and scale is None:
        dest = make(shape, FP8 if quantize else dtype)
        for rows, view in blocks():
            _rows_of(dest, rows).copy_(view)  # copy_ casts on the way, without a scratch copy
        return dest, scale if quantize else None
    new_scale = None
    if quantize:  # the absmax over the whole tensor first, as quantize_fp8 takes it
        amax = torch.zeros((), dtype=torch.float32)
        for rows, view in blocks():
            if view.numel():
                amax = torch.maximum(amax, reader.scaled(view, scale, rows).abs_().max())
        new_scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    dest = make(shape, FP8 if quantize else dtype)
    for rows, view in blocks():
        work = reader.scaled(view, scale, rows)
        if new_scale is not None:
            work.div_(new_scale).clamp_(-FP8_MAX, FP8_MAX)
        _rows_of(dest, rows).copy_(work)
    return dest, new_scale


def _place(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` where the meta placeholder ``name`` is (what load_state_dict(assign=True) does)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        # float8 weights are storage, not something to train
        trainable = module._parameters[leaf].requires_grad and tensor.dtype != FP8
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=trainable)
    else:
        module._buffers[leaf] = tensor


# ---- loading ------------------------------------------------------------------------------------------


def _find_config(path: Path, config: TransformerConfig | str | Path | None) -> TransformerConfig:
    if config is not None:
        return resolve_config(config)
    candidate = path / CONFIG_NAME if path.is_dir() else path.parent / CONFIG_NAME
    if candidate.is_file():
        return TransformerConfig.from_file(candidate)
    if path.is_dir():
        raise CheckpointError(f"no {CONFIG_NAME} in {path}; pass config= (a preset name or a config file)")
    log.info("no %s beside %s; assuming the %r preset", CONFIG_NAME, path.name, DEFAULT_PRESET)
    return resolve_config(DEFAULT_PRESET)


def _default_dtype(found: Found) -> torch.dtype:
    tags = {tag for _, tag, _ in found.values()}
    stored = [STORAGE_DTYPES[t] for t in ("BF16", "F16", "F32", "F8_E4M3") if t in tags]
    # float8 is a storage format only: compute in bf16
    return torch.bfloat16 if not stored or stored[0] == FP8 else stored[0]


def check_placement(dtype: torch.dtype | None, storage_dtype: torch.dtype | None, device: torch.device,
                    pin_memory: bool, mapped: bool = False) -> None:
    """One-line errors for arguments that cannot work, before any file is opened."""
    if mapped and (storage_dtype != FP8 or device.type != "cpu" or pin_memory):
        raise ValueError("mapped loading leaves float8 block weights in the file's pages: it needs "
                         "storage_dtype=torch.float8_e4m3fn on the CPU, without pin_memory")
    if dtype == FP8:
        raise ValueError("dtype float8_e4m3fn is a storage format, not a compute dtype: pass "
                         "storage_dtype=torch.float8_e4m3fn (the blocks' weights stay float8, compute runs "
                         "in bf16)")
    if storage_dtype not in (None, FP8):
        raise ValueError(f"storage_dtype must be None (weights in the compute dtype) or torch.float8_e4m3fn, "
                         f"got {storage_dtype}")
    if pin_memory and device.type != "cuda":
        raise ValueError(f"pin_memory keeps the weights in page-locked host memory for a CUDA device; "
                         f"the device is {device}")


def load_transformer(
    cls: type["FramePackTransformer"],
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
    """See :meth:`FramePackTransformer.from_pretrained`; ``pin_memory`` with a CUDA ``device`` puts
    the weights in pinned host memory instead (for offloading hooks to stream them in).

    ``mapped`` (CPU, float8 storage): block weights the file already stores in float8 are not
    read at all: each stays a view of its own private mapping of the file, paged in when touched.
    For a model about to be block-offloaded to disk: the offload reads each group once, writes
    it to its own file and replaces its tensors, which unmaps them, so the resident set holds
    about one block at a time instead of the whole model (benchmarks/cpu_13b.py measures it).
    The checkpoint files must not change while such a model exists."""
    device = torch.device(device)
    check_placement(dtype, storage_dtype, device, pin_memory, mapped)
    path = resolve_source(source, revision, subfolder, cache_dir, local_files_only)
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file or a checkpoint directory")
    cfg = _find_config(path, config)
    files = weight_files(path)
    found = read_headers(files)
    tensors, scales, ignored = split_companions(found)
    with torch.device("meta"):
        model = cls(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_state_dict(expected, tensors)
    check_scales(found, scales)
    if ignored:
        log.info("ignoring %d tensors of other tools' float8 formats: %s", len(ignored), _listing(ignored))

    target = dtype or _default_dtype(tensors)
    fp8_names = fp8_weight_names(model) if storage_dtype == FP8 else set()
    make = _allocator(device, pin_memory)
    scratch = torch.empty(BLOCK_ELEMENTS, dtype=torch.float32)
    for file in files:
        spans = data_offsets(file)
        reader = _Reader(file, scratch)
        try:
            in_file = sorted((n for n in tensors if tensors[n][2] == file), key=lambda n: spans[n])  # file order
            for name in in_file:
                shape, tag, _ = tensors[name]
                scale = _read_scale(found, scales.get(name), shape)
                tensor, scale = read_tensor(reader, spans[name], (STORAGE_DTYPES[tag], shape), scale, target,
                                            make, quantize=name in fp8_names, mapped=mapped)
                _place(model, name, tensor)
                if scale is not None:  # float8 storage: the scale goes with its weight, where make puts it
                    owner = model.get_submodule(name.rpartition(".")[0])
                    owner.register_buffer(SCALE_NAME, make(tuple(scale.shape), scale.dtype).copy_(scale))
        finally:
            reader.close()
    log.info("loaded %s (%d tensors, %s%s) from %s", cfg.context_schedule, len(tensors), target,
             f", {len(fp8_names)} float8 block weights" if fp8_names else "", path)
    return model.eval()


def _allocator(device: torch.device, pin: bool) -> Callable[[tuple[int, ...], torch.dtype], torch.Tensor]:
    """Where loaded tensors go: the device, or page-locked host memory (``pin``, for a CUDA device)."""
    if pin:
        return lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=True)
    return lambda shape, dtype: torch.empty(shape, dtype=dtype, device=device)


def _read_scale(found: Found, name: str | None, weight_shape: tuple[int, ...]) -> torch.Tensor | None:
    if name is None:
        return None
    shape, tag, file = found[name]
    with safe_open(str(file), framework="pt", device="cpu") as f:  # a few bytes
        return _scale_shape(f.get_tensor(name).to(STORAGE_DTYPES[tag], copy=True), weight_shape)


# ---- saving -------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_transformer(model: "FramePackTransformer", directory: str | Path, max_shard_size: int | str = "5GB") -> None:
    """config.json + safetensors (sharded with an index above ``max_shard_size``)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    written = set()
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state[name] for name in names}
        _atomic_write(directory / filename, lambda p, s=shard: save_file(s, str(p), metadata={"format": "pt"}))
        written.add(filename)
    index = directory / INDEX_NAME
    if split.is_sharded:
        body = {"metadata": {"total_size": split.metadata.get("total_size", 0)}, "weight_map": split.tensor_to_filename}
        _atomic_write(index, lambda p: p.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n"))
    elif index.exists():
        index.unlink()
    # drop weights of an earlier save that the new layout does not use
    for stale in directory.glob("diffusion_pytorch_model*.safetensors"):
        if stale.name not in written:
            stale.unlink()
    _atomic_write(directory / CONFIG_NAME, model.config.save)
