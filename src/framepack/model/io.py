"""Checkpoint I/O in the layout of ``lllyasviel/FramePackI2V_HY``.

A directory holds ``config.json`` and either one ``diffusion_pytorch_model.safetensors`` or
shards ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` with an index. diffusers'
``save_pretrained`` writes the same layout, so directories move freely between the two.

Loading builds the model on the meta device, checks every name, shape and dtype from the
safetensors headers before reading any data, then reads each tensor once, straight into its
final dtype: no second copy of a 13B model in RAM.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    """Whether ``file`` holds a torch/pickle checkpoint (whatever its name says)."""
    try:
        with open(file, "rb") as f:
            return f.read(4).startswith(PICKLE_MAGIC)
    except OSError:
        return False


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


def _default_dtype(found: dict[str, tuple[tuple[int, ...], str, Path]]) -> torch.dtype:
    tags = {tag for _, tag, _ in found.values()}
    stored = [STORAGE_DTYPES[t] for t in ("BF16", "F16", "F32", "F8_E4M3") if t in tags]
    # float8 is a storage format only: compute in bf16
    return torch.bfloat16 if not stored or stored[0] == torch.float8_e4m3fn else stored[0]


def load_transformer(
    cls: type["FramePackTransformer"],
    source: str | Path,
    *,
    config: TransformerConfig | str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> "FramePackTransformer":
    path = resolve_source(source, revision, subfolder, cache_dir, local_files_only)
    if path.is_file() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file or a checkpoint directory")
    cfg = _find_config(path, config)
    files = weight_files(path)
    found = read_headers(files)
    with torch.device("meta"):
        model = cls(cfg)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    check_state_dict(expected, found)

    target = dtype or _default_dtype(found)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                # copy=True: a fresh, allocator-aligned tensor even when dtype and device already
                # match. get_tensor's data sits at its (unaligned) file offset, and CPU kernels round
                # differently on unaligned data, so a reloaded model would not reproduce its outputs.
                state[name] = f.get_tensor(name).to(device=device, dtype=target, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded %s (%d tensors, %s) from %s", cfg.context_schedule, len(state), target, path)
    return model.eval()


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
