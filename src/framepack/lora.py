"""LoRA at generation: read three key formats, check them against the model, fuse, unfuse exactly.

A LoRA adds ``scale * (alpha / rank) * B @ A`` to the weight ``W`` (out, in) of a Linear layer,
with ``A`` (rank, in) and ``B`` (out, rank) (Hu et al. 2021, eq. 3, with the alpha/rank
convention of their code). Files come in three namings, all keyed by our module paths (the
released checkpoints' diffusers names, e.g. ``transformer_blocks.0.attn.to_q``):

=========  ==============================================  ============================  ===========================
format     down (A) / up (B) keys                          alpha                         who writes it
=========  ==============================================  ============================  ===========================
framepack  ``<path>.lora_A`` / ``<path>.lora_B``           metadata ``alphas`` (JSON)    :func:`save_lora` (ours)
musubi     ``lora_unet_<path, . -> _>.lora_down.weight``   ``lora_unet_<...>.alpha``     kohya-ss/musubi-tuner
           / ``.lora_up.weight``                           (0 or absent: alpha = rank)   (FramePack networks)
diffusers  ``transformer.<path>.lora_A.weight``            metadata ``lora_adapter_      diffusers / PEFT
           / ``.lora_B.weight``                            metadata`` (PEFT's config):   ``save_lora_weights``
                                                           ``transformer.lora_alpha``,
                                                           ``...alpha_pattern``; else
                                                           alpha = rank
=========  ==============================================  ============================  ===========================

Fusing writes ``W + sum_i scale_i * delta_i`` into each targeted weight in place (computed in
fp32, then stored in the weight's own dtype; an fp8 / int8 weight is dequantized, summed and
quantized again with a fresh scale), so sampling runs at the base model's speed. The weights it
replaces are kept (a host-memory copy of each targeted layer), and unfusing copies them back:
the base model comes back bit for bit, whatever rounding the fused sum had.

Why not PEFT's ``merge_adapter`` / ``unmerge_adapter`` here: PEFT's unmerge subtracts the delta
again, which is not exact in floating point, and PEFT's LoRA layers do not wrap our fp8 / int8
``QuantizedLinear``. PEFT is the trainer's (and the reference in tests/test_lora.py, which checks
our fused model against PEFT's unmerged LoRA forward).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .settings import LoraChoice

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("framepack", "musubi", "diffusers")
FRAMEPACK_FORMAT = "framepack-lora"  # our file's metadata["format"]
MUSUBI_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "transformer."
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key (PEFT's LoraConfig as JSON)
SHA_CHARS = 16  # hex digits of the sha256 a video records: enough to tell two files apart
HASH_CHUNK = 1 << 20


class LoraError(ValueError):
    """A LoRA file that cannot be used with this model; the message is one line."""


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update: down (rank, in) = A, up (out, rank) = B."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``(alpha / rank) * B @ A`` in fp32: (out, in)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up @ down) * (self.alpha / self.rank)


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file read into our module paths."""

    layers: dict[str, LoraLayer]
    format: str
    name: str = ""  # the file's name, for messages


# ---- the model's side ---------------------------------------------------------------------------------


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear layer a LoRA may target: plain ``nn.Linear`` and the fp8 / int8
    ``QuantizedLinear`` of a memory plan, by module path."""
    from .runtime.placement import QuantizedLinear

    return {name: (module.out_features, module.in_features) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, QuantizedLinear))}


def musubi_name(path: str) -> str:
    """musubi-tuner's module name for one of our paths: ``lora_unet_`` + the path with ``.`` -> ``_``."""
    return MUSUBI_PREFIX + path.replace(".", "_")


# ---- reading -----------------------------------------------------------------------------------------------


def detect_format(keys: Iterable[str], metadata: Mapping[str, str]) -> str | None:
    """Which of FORMATS a file's keys are written in (by its first key and metadata), or None."""
    if metadata.get("format") == FRAMEPACK_FORMAT:
        return "framepack"
    first = min(keys, default="")
    if first.startswith(MUSUBI_PREFIX):
        return "musubi"
    if first.endswith((".lora_A.weight", ".lora_B.weight")) or DIFFUSERS_METADATA in metadata:
        return "diffusers"
    return None


def _split_key(key: str, fmt: str, musubi_paths: Mapping[str, str]) -> tuple[str, str] | None:
    """(our module path, "down" | "up" | "alpha") for one key, or None if it names no layer of ours."""
    if fmt == "framepack":
        for suffix, part in ((".lora_A", "down"), (".lora_B", "up")):
            if key.endswith(suffix):
                return key[: -len(suffix)], part
        return None
    if fmt == "musubi":
        module, _, rest = key.partition(".")
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
        path = musubi_paths.get(module)
        return None if part is None or path is None else (path, part)
    if not key.startswith(DIFFUSERS_PREFIX):
        return None
    body = key[len(DIFFUSERS_PREFIX):]
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".alpha", "alpha")):
        if body.endswith(suffix):
            return body[: -len(suffix)], part
    return None


def _pattern_alpha(path: str, patterns: Mapping[str, float]) -> float | None:
    """PEFT's ``alpha_pattern``: a key matches a module path ending in it (as a regex)."""
    for pattern, alpha in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?({pattern})", path):
                return float(alpha)
        except re.error:
            continue
    return None


def _metadata_alphas(fmt: str, metadata: Mapping[str, str], name: str) -> tuple[dict[str, float], float | None, dict]:
    """(alpha per path, default alpha or None = the rank, PEFT alpha_pattern) from a file's metadata."""
    try:
        if fmt == "framepack":
            alphas = json.loads(metadata.get("alphas", "{}"))
            return {str(k): float(v) for k, v in alphas.items()}, None, {}
        if fmt == "diffusers" and DIFFUSERS_METADATA in metadata:
            config = json.loads(metadata[DIFFUSERS_METADATA])
            # diffusers packs the transformer's PEFT config under "transformer."; PEFT's own files do not
            packed = {k[len(DIFFUSERS_PREFIX):]: v for k, v in config.items() if k.startswith(DIFFUSERS_PREFIX)}
            config = packed or config
            alpha = config.get("lora_alpha")
            return {}, None if alpha is None else float(alpha), dict(config.get("alpha_pattern") or {})
    except (ValueError, TypeError, AttributeError) as exc:
        raise LoraError(f"{name}: its metadata is damaged ({exc})") from None
    return {}, None, {}


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
               shapes: Mapping[str, tuple[int, int]], name: str = "LoRA") -> LoraWeights:
    """Read a LoRA state dict into our module paths, checked against the model's Linear ``shapes``.

    Raises LoraError naming the first key (in sorted order) that fits no layer of the model, whose
    shape does not fit its layer, or whose partner (down / up) is missing.
    """
    fmt = detect_format(tensors, metadata)
    if fmt is None:
        first = min(tensors, default=None)
        if first is None:
            raise LoraError(f"{name} holds no tensors: it is not a LoRA")
        raise LoraError(f"{name} is not a LoRA in a known format (framepack, musubi, diffusers): first key {first!r}")
    musubi_paths = {musubi_name(path): path for path in shapes}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    first_key: dict[str, str] = {}
    for key in sorted(tensors):
        split = _split_key(key, fmt, musubi_paths)
        if split is None or split[0] not in shapes:
            raise LoraError(f"{name}: key {key!r} fits no layer of this model (a LoRA for another architecture, "
                            f"or not a {fmt} LoRA)")
        path, part = split
        first_key.setdefault(path, key)
        parts.setdefault(path, {})[part] = tensors[key]
        if part != "alpha":
            _check_shape(key, part, tensors[key], shapes[path], parts[path], name)
    alphas, default_alpha, pattern = _metadata_alphas(fmt, metadata, name)
    layers = {}
    for path, found in parts.items():
        for part, label in (("down", "down (A)"), ("up", "up (B)")):
            if part not in found:
                raise LoraError(f"{name}: key {first_key[path]!r} has no matching {label} tensor for {path}")
        rank = found["down"].shape[0]
        alpha = _alpha(path, found.get("alpha"), alphas, pattern, default_alpha, rank)
        if not math.isfinite(alpha):
            raise LoraError(f"{name}: the alpha of {path} is not a finite number")
        layers[path] = LoraLayer(found["down"], found["up"], alpha)
    return LoraWeights(layers, fmt, name)


def _check_shape(key: str, part: str, tensor: torch.Tensor, layer: tuple[int, int],
                 found: Mapping[str, torch.Tensor], name: str) -> None:
    out_features, in_features = layer
    shape = _shape(tensor)
    ok = len(shape) == 2 and (shape[1] == in_features if part == "down" else shape[0] == out_features)
    other = found.get("up" if part == "down" else "down")
    if ok and other is not None:  # the ranks of A and B agree
        ok = (shape[0] == other.shape[1]) if part == "down" else (shape[1] == other.shape[0])
    if not ok:
        expected = f"(rank, {in_features})" if part == "down" else f"({out_features}, rank)"
        raise LoraError(f"{name}: key {key!r} has shape {shape}, but its layer takes {expected} "
                        f"(a LoRA for another model size, or damaged)")
    if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
        raise LoraError(f"{name}: key {key!r} holds non-finite or non-float values")


def _alpha(path: str, tensor: torch.Tensor | None, alphas: Mapping[str, float], pattern: Mapping[str, float],
           default: float | None, rank: int) -> float:
    if tensor is not None:
        value = float(tensor.float().reshape(-1)[0]) if tensor.numel() else 0.0
        return value if value != 0 else float(rank)  # musubi: alpha 0 means "no scaling" (alpha = rank)
    if path in alphas:
        return alphas[path]
    matched = _pattern_alpha(path, pattern)
    if matched is not None:
        return matched
    return float(rank) if default is None else default


def read_lora(path: str | Path, shapes: Mapping[str, tuple[int, int]]) -> LoraWeights:
    """Read a .safetensors LoRA file (any of FORMATS) for a model with these Linear ``shapes``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist" if not path.exists() else f"LoRA {path} is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise LoraError(f"cannot read LoRA {path.name} as safetensors ({first})") from None
    return parse_lora(tensors, metadata, shapes, path.name)


def file_sha256(path: str | Path, chars: int = SHA_CHARS) -> str:
    """The first ``chars`` hex digits of a file's sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:chars]


def lora_choice(path: str | Path, scale: float = 1.0) -> LoraChoice:
    """A LoRA for the settings: the file's absolute path, the scale, its sha256 prefix."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist" if not path.exists() else f"LoRA {path} is not a file")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"LoRA {path.name} is not a .safetensors file")
    return LoraChoice(str(path.resolve()), float(scale), file_sha256(path))


def parse_lora_option(text: str) -> tuple[str, float]:
    """``FILE[:SCALE]`` -> (file, scale); scale 1.0 when absent. A colon in the name stays in it
    unless what follows the last colon is a number."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ValueError(f"the scale of LoRA {head!r} must be a finite number, got {tail!r}")
        return head, scale
    return text, 1.0


# ---- the mp4's record and finding the files again -------------------------------------------------------------


def recorded_loras(loras: Sequence[LoraChoice]) -> list[dict]:
    """What a video records of its LoRAs: each file by name only, its sha256 prefix (hashed now
    where the settings were made without one, from the file just used) and scale."""
    def sha(c: LoraChoice) -> str | None:
        return c.sha256 if c.sha256 is not None or not Path(c.path).is_file() else file_sha256(c.path)

    return [{"path": Path(c.path).name, "scale": c.scale, "sha256": sha(c)} for c in loras]


def find_recorded(video: Path, recorded: Sequence[LoraChoice]) -> tuple[LoraChoice, ...]:
    """The LoRAs a video records (by file name), found beside the video or in the current
    directory, with the recorded sha256 prefix; one line naming the file otherwise."""
    found = []
    for choice in recorded:
        name = Path(str(choice.path).replace("\\", "/")).name
        places = [video.parent / name, Path.cwd() / name]
        candidates = [p for p in places if p.is_file()]
        match = next((p for p in candidates if choice.sha256 is None or file_sha256(p) == choice.sha256), None)
        if match is None:
            where = "has another sha256" if candidates else "is neither beside the video nor in the current directory"
            raise LoraError(f"{video} was made with the LoRA {name!r} (sha256 {choice.sha256}), which {where}; "
                            "give the LoRAs with --lora")
        found.append(LoraChoice(str(match.resolve()), choice.scale, choice.sha256))
    return tuple(found)


# ---- fusing ------------------------------------------------------------------------------------------------------


def _uses_offload_hooks(model: nn.Module) -> bool:
    """diffusers' group offloading keeps its own copies of the weights: writing ours would miss them."""
    return any(getattr(m, "_diffusers_hook", None) is not None for m in model.modules())


def summed_deltas(loras: Sequence[tuple[LoraWeights, float]], device: torch.device | str = "cpu"
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, sum of scale * delta) per targeted layer, fp32 (one layer's worth at a time)."""
    paths = sorted({path for weights, scale in loras if scale != 0 for path in weights.layers})
    for path in paths:
        total = None
        for weights, scale in loras:
            layer = weights.layers.get(path)
            if layer is None or scale == 0:  # scale 0 is no LoRA: not even a rounding step
                continue
            part = layer.delta(device) * scale
            total = part if total is None else total + part
        yield path, total


def _quantized_sum(weight: torch.Tensor, scale: torch.Tensor | None, delta: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An fp8 / int8 weight (with its scale, None = 1) plus delta, quantized again as it was stored."""
    from .runtime.placement import FP8, FP8_MAX, quantize_fp8, quantize_int8

    real = weight.float() * (1.0 if scale is None else scale.float()) + delta
    if scale is None:  # an unscaled float8 file: stays unscaled (clamped to the format's range)
        return real.clamp(-FP8_MAX, FP8_MAX).to(weight.dtype), None
    q, new_scale = (quantize_fp8 if weight.dtype == FP8 else quantize_int8)(real)
    return q, new_scale.reshape(scale.shape).to(scale.dtype)


class LoraFusion:
    """The LoRAs fused into one model, and the base weights they replaced (on the host).

    ``fuse`` replaces whatever was fused before (the base weights are restored first);
    ``unfuse`` restores them bit for bit. The model itself keeps no LoRA state: this object does.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.fused: tuple = ()  # what is fused now: the key the caller gave
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def fuse(self, loras: Sequence[tuple[LoraWeights, float]], key: tuple = ()) -> int:
        """Fuse ``loras`` (weights, scale) into the model; returns the number of layers changed."""
        self._check_writable()
        self.unfuse()
        shapes = linear_shapes(self.model)
        for weights, _ in loras:  # all checked before any layer changes
            missing = next((p for p in sorted(weights.layers) if p not in shapes), None)
            if missing is not None:
                raise LoraError(f"{weights.name}: layer {missing} is not a Linear layer of this model")
        changed = 0
        with torch.no_grad():
            for path, delta in summed_deltas(loras):
                self._add(path, delta)
                changed += 1
        self.fused = key
        log.info("fused %d LoRA(s) into %d layers", sum(1 for _, s in loras if s != 0), changed)
        return changed

    def _add(self, path: str, delta: torch.Tensor) -> None:
        module = self.model.get_submodule(path)
        weight = module.weight
        scale = getattr(module, "weight_scale", None)
        delta = delta.to(weight.device)
        # the copies live on the host: on a GPU they would cost as much memory as the layers themselves
        self._originals[path] = (weight.detach().to("cpu", copy=True),
                                 None if scale is None else scale.detach().to("cpu", copy=True))
        if weight.dtype.itemsize == 1:  # fp8 / int8 storage: dequantize, add, quantize again
            q, new_scale = _quantized_sum(weight.detach(), None if scale is None else scale.detach(), delta)
            weight.copy_(q)
            if scale is not None:
                scale.copy_(new_scale)
        else:
            # in place (copy_): hooks, compiled graphs and tied references all see the new values
            weight.copy_((weight.float() + delta).to(weight.dtype))

    def _check_writable(self) -> None:
        if _uses_offload_hooks(self.model):
            raise LoraError("LoRAs cannot be changed on a transformer whose blocks are offloaded; they are fused "
                            "before a memory plan is applied (framepack generate and the web app do), once per load")
        for path, (weight, scale) in self._originals.items():
            module = self.model.get_submodule(path)
            now_scale = getattr(module, "weight_scale", None)
            if (module.weight.dtype != weight.dtype or module.weight.shape != weight.shape
                    or (scale is None) != (now_scale is None)):
                # e.g. fp8 storage applied after fusing: the kept copies no longer fit the layers
                raise LoraError(f"{path} was stored in another format after the LoRAs were fused; load the model "
                                "again to change its LoRAs")

    def unfuse(self) -> None:
        """Put the base weights back, exactly."""
        if not self._originals:
            return
        self._check_writable()
        with torch.no_grad():
            for path, (weight, scale) in self._originals.items():
                module = self.model.get_submodule(path)
                module.weight.copy_(weight.to(module.weight.device))
                if scale is not None:
                    module.weight_scale.copy_(scale.to(module.weight_scale.device))
        self._originals.clear()
        self.fused = ()


def load_choices(choices: Sequence[LoraChoice], model: nn.Module) -> list[tuple[LoraWeights, float]]:
    """Read and check each chosen file for ``model`` (a file changed since it was chosen is refused)."""
    shapes = linear_shapes(model)
    loaded = []
    for choice in choices:
        path = Path(choice.path)
        if not path.is_file():
            raise LoraError(f"LoRA file {path} does not exist" if not path.exists() else f"LoRA {path} is not a file")
        if choice.sha256 is not None and file_sha256(path) != choice.sha256:
            raise LoraError(f"LoRA {path.name} has changed since it was chosen (sha256 {file_sha256(path)}, "
                            f"recorded {choice.sha256})")
        loaded.append((read_lora(path, shapes), choice.scale))
    return loaded


# ---- saving ---------------------------------------------------------------------------------------------------


def lora_state_dict(weights: LoraWeights, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of ``weights`` in the naming of ``fmt`` (one of FORMATS)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose from {', '.join(FORMATS)}")
    tensors: dict[str, torch.Tensor] = {}
    layers = weights.layers
    for path, layer in layers.items():
        down, up = layer.down.contiguous(), layer.up.contiguous()
        if fmt == "framepack":
            tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = down, up
        elif fmt == "musubi":
            name = musubi_name(path)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
        else:
            tensors[f"{DIFFUSERS_PREFIX}{path}.lora_A.weight"] = down
            tensors[f"{DIFFUSERS_PREFIX}{path}.lora_B.weight"] = up
    if fmt == "framepack":
        metadata = {"format": FRAMEPACK_FORMAT, "alphas": json.dumps({p: l.alpha for p, l in layers.items()})}
    elif fmt == "musubi":
        metadata = {}
    else:
        metadata = {DIFFUSERS_METADATA: json.dumps(_peft_config(layers), sort_keys=True)}
    return tensors, metadata


def _peft_config(layers: Mapping[str, LoraLayer]) -> dict:
    """PEFT's LoraConfig fields as diffusers packs them: the commonest rank / alpha, the rest by pattern."""
    from collections import Counter

    rank = Counter(l.rank for l in layers.values()).most_common(1)[0][0] if layers else 0
    alpha = Counter(l.alpha for l in layers.values()).most_common(1)[0][0] if layers else 0.0
    config = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {re.escape(p): l.rank for p, l in layers.items() if l.rank != rank},
        "alpha_pattern": {re.escape(p): l.alpha for p, l in layers.items() if l.alpha != alpha},
    }
    return {f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}


def save_lora(weights: LoraWeights, path: str | Path, fmt: str = "framepack") -> Path:
    """Write ``weights`` as a .safetensors file in the naming of ``fmt`` (written whole, then renamed)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, metadata = lora_state_dict(weights, fmt)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
