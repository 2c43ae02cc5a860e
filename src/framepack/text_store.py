"""Prompt embeddings shipped with a model, so a run whose prompts are all stored never loads the text encoders.

For the demo model the text encoders are small, but building them means importing transformers'
LLaMA and CLIP code, which is most of ``framepack demo``'s fixed cost on two CPU cores (about 3 s
of a few-second command). A model directory may ship ``text_embeddings.safetensors`` (named by
its manifest's ``"text_embeddings"``): the embeddings of a few prompts (the demo's own, and the
empty negative prompt), made by the model's own encoders. :class:`StoredTextEncoder` serves those
and loads the real encoders on the first prompt it does not hold, so the output is the same either way.

The file records the identity of the encoders that made it (:func:`encoder_identity`: their
files' names, sizes and contents); when the model's encoders differ (a manifest pointing at other
text encoders), the file is ignored with a log line rather than serving embeddings of other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .components import TextEmbedding, TextEncoder

log = logging.getLogger(__name__)

TEXT_EMBEDDINGS = "text_embeddings.safetensors"
# the parts of a HunyuanVideo-layout folder that make the text embedding (not the VAE beside them)
ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
_SAMPLE = 1 << 20  # bytes hashed at each end of a large file


def _file_digest(path: Path) -> str:
    """The whole file's sha256 when small; else of its size, first and last MiB (a 16 GB LLaMA
    shard is not read whole for this: a different checkpoint differs in its header or its ends)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= 2 * _SAMPLE:
            digest.update(f.read())
        else:
            digest.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def encoder_identity(root: Path, crop_start: int | None) -> str:
    """A digest of the text encoders under ``root`` (a HunyuanVideo-layout folder) and the template crop."""
    digest = hashlib.sha256(json.dumps({"crop_start": crop_start}).encode())
    for folder in ENCODER_FOLDERS:
        for path in sorted((root / folder).rglob("*")) if (root / folder).is_dir() else []:
            if path.is_file():
                digest.update(f"{path.relative_to(root).as_posix()}:{_file_digest(path)}".encode())
    return digest.hexdigest()


def save_text_embeddings(path: Path, identity: str, embeddings: Mapping[str, TextEmbedding]) -> None:
    """Write ``embeddings`` (prompt -> embedding, batch of one each) to ``path``, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for i, e in enumerate(embeddings.values()):
        tensors |= {f"{i}.states": e.states.contiguous(), f"{i}.mask": e.mask.contiguous(),
                    f"{i}.pooled": e.pooled.contiguous()}
    metadata = {"identity": identity, "prompts": json.dumps(list(embeddings))}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.chmod(0o644)  # shipped in the package: readable by all, as its other files
    partial.replace(path)


def load_text_embeddings(path: Path, identity: str) -> dict[str, TextEmbedding]:
    """The embeddings stored in ``path`` if they were made by encoders of ``identity``; else none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("identity") != identity:
            log.info("%s was made by other text encoders than this model's: not used", path)
            return {}
        prompts = json.loads(metadata["prompts"])
        return {p: TextEmbedding(f.get_tensor(f"{i}.states"), f.get_tensor(f"{i}.mask"), f.get_tensor(f"{i}.pooled"))
                for i, p in enumerate(prompts)}


class StoredTextEncoder:
    """A TextEncoder that serves stored prompts and builds the real encoder (``load``) on the first other one."""

    def __init__(self, stored: Mapping[str, TextEmbedding], load: Callable[[], TextEncoder]) -> None:
        self._stored = dict(stored)
        self._load = load
        self.encoder: TextEncoder | None = None  # the real one, once a prompt needed it

    def encode(self, prompt: str) -> TextEmbedding:
        if prompt in self._stored:
            e = self._stored[prompt]
            return TextEmbedding(e.states.clone(), e.mask.clone(), e.pooled.clone())
        if self.encoder is None:
            log.info("prompt not among the stored embeddings: loading the text encoders")
            self.encoder = self._load()
        return self.encoder.encode(prompt)
