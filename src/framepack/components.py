"""The encoders and the VAE around the transformer, loaded through transformers and diffusers.

Three Hugging Face layouts (hub ids or local directories in the same shape):

- ``hunyuanvideo-community/HunyuanVideo``: ``text_encoder`` + ``tokenizer`` (LLaMA),
  ``text_encoder_2`` + ``tokenizer_2`` (CLIP-L), ``vae`` (AutoencoderKLHunyuanVideo);
- ``lllyasviel/flux_redux_bfl``: ``image_encoder`` + ``feature_extractor`` (SigLIP);
- ``lllyasviel/FramePackI2V_HY`` / ``lllyasviel/FramePack_F1_I2V_HY_20250503``: the transformer.

Nothing is loaded at import time; heavy libraries are imported when a component is built.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from .model import FramePackTransformer
from .model.io import CheckpointError, read_headers, resolve_source
from .planning import Mode

if TYPE_CHECKING:
    from .tile_reuse import RepeatedTiles

log = logging.getLogger(__name__)

# HunyuanVideo's LLaMA prompt template; the user prompt goes where "{}" is.
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and "
    "spatial relations of the objects.3. Actions, events, behaviors temporal relationships, physical movement "
    "changes of the objects.4. background environment, light, style and atmosphere.5. camera angles, "
    "movements, and transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
LLAMA_MAX_TOKENS = 256  # valid prompt tokens after the template
LLAMA_LAYER = -3  # hidden_states[-3]: two layers before the last
CLIP_MAX_TOKENS = 77
VAE_SCALING = 0.476986


# ---- loading: one place that turns every failure into a one-line error ---------------------------------


class ComponentError(ValueError):
    """A component (transformer, text encoder, tokenizer, image encoder, VAE) that cannot be loaded."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MESSAGE_LIMIT = 240  # characters of a library's own message kept in ours


def one_line(exc: BaseException, limit: int = MESSAGE_LIMIT) -> str:
    """The gist of an exception in one line: its first line (and the next one where the first only
    introduces a list, as torch's "Error(s) in loading state_dict for X:" does)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    if len(text) <= limit:
        return text
    # too long: whole sentences up to the limit (libraries append advice for their API's callers)
    kept = ""
    for sentence in re.split(r"(?<=\.) ", text):
        if kept and len(kept) + 1 + len(sentence) > limit:
            break
        kept = f"{kept} {sentence}".strip()
    return kept if len(kept) <= limit else kept[: limit - 3].rstrip() + "..."


@contextmanager
def _quiet(library: str | None) -> Iterator[None]:
    """transformers' / diffusers' own progress bars and load reports off while a component loads
    (the caller shows its own progress; problems come back as errors), restored afterwards."""
    if library is None:
        yield
        return
    logs = __import__(f"{library}.utils.logging", fromlist=["logging"])
    bars, level = logs.is_progress_bar_enabled(), logs.get_verbosity()
    logs.disable_progress_bar()
    logs.set_verbosity_error()
    try:
        yield
    finally:
        logs.set_verbosity(level)
        if bars:
            logs.enable_progress_bar()


@contextmanager
def loading(component: str, where: str | Path, library: str | None = None) -> Iterator[None]:
    """Every failure inside turns into one :class:`ComponentError` naming the component and the problem.

    Loading goes through transformers, diffusers, safetensors, tokenizers and our own readers,
    which fail with their own types (OSError, RuntimeError on a size mismatch, SafetensorError,
    JSON errors, TypeError from a malformed config, ...); the user needs which component, where,
    and what is wrong, in one line. The full traceback is logged at DEBUG level.
    """
    try:
        with _quiet(library):
            yield
    except ComponentError:
        raise
    except Exception as exc:  # noqa: BLE001  (any failure of a third-party loader, see above)
        # a signal's exception can break a library's cleanup on its way out (torch's mode stack):
        # the failure is then the interruption, not the component
        cause = exc.__context__
        while cause is not None:
            if not isinstance(cause, Exception):
                raise cause from None
            cause = cause.__context__
        log.debug("loading the %s from %s failed", component, where, exc_info=True)
        problem = one_line(exc).replace(f"{where}/", "")  # paths inside it, relative to the one we name
        raise ComponentError(f"cannot load the {component} from {where}: {problem}") from None


def check_weights(folder: Path) -> None:
    """Refuse what from_pretrained must not see: no weights, pickle weights (loading a pickle can
    run code), a pickle renamed .safetensors, a truncated file. Reads the safetensors headers only."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"only pickle weights there ({', '.join(pickles)}); framepack loads .safetensors "
                                  "only, since loading a pickle can run code: convert them to safetensors")
        raise CheckpointError("no .safetensors weights there")
    read_headers(weights)


def check_loading_info(info: dict[str, Any]) -> None:
    """transformers / diffusers ``output_loading_info``: missing or mis-shaped tensors are errors
    (those libraries would leave them randomly initialized with a warning)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        first = mismatched[0]  # transformers: (name, shape in the file, shape the config gives)
        example = f"{first[0]} {tuple(first[1])} (the config expects {tuple(first[2])})" if isinstance(first, tuple) else first
        raise CheckpointError(f"{len(mismatched)} tensors with the wrong shape, e.g. {example}")
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{len(missing)} tensors missing from the weights: {', '.join(missing[:3])}{more}")
    if info.get("unexpected_keys"):
        log.debug("unused tensors in the weights: %s", sorted(info["unexpected_keys"])[:5])


def _hf_model(cls, folder: Path, dtype: torch.dtype, device: str | torch.device, **kwargs: Any):
    """A transformers / diffusers model from a local folder: safetensors only, strict about tensors."""
    check_weights(folder)
    model, info = cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, output_loading_info=True,
                                      **kwargs)
    check_loading_info(info)
    return model.to(device)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not folder.is_dir():  # else transformers takes the path for a hub id and says so
        raise CheckpointError(f"{folder} does not exist")
    return AutoTokenizer.from_pretrained(folder)


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against this machine (before
    anything loads, so a typo or a missing GPU is one line, not a failure deep in a library)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    usage = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {name!r}; {usage}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available here (no NVIDIA GPU, or a CPU-only PyTorch); "
                             "use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                             f"(cuda:0 .. cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: Apple's MPS is not available here; use --device cpu")
        return device
    raise ValueError(f"device {name!r} is not supported; {usage}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` (bf16 on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def native_bf16_or_fp32(device: torch.device) -> torch.dtype:
    """bf16 where ``device`` multiplies it natively (a CPU with AMX or AVX512-BF16, a CUDA GPU that
    supports it), else fp32: elsewhere bf16 is emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return torch.bfloat16 if caps.get("amx_bf16") or caps.get("avx512_bf16") else torch.float32
    return torch.float32


@dataclass
class TextEmbedding:
    """One prompt, encoded. states: (1, L, text_dim); mask: (1, L) bool; pooled: (1, pooled_dim)."""

    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def stack_embeddings(embeddings: list[TextEmbedding]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths: states and masks padded at the end, pooled stacked."""
    length = max(e.states.shape[1] for e in embeddings)
    states = torch.cat([torch.nn.functional.pad(e.states, (0, 0, 0, length - e.states.shape[1])) for e in embeddings])
    mask = torch.cat([torch.nn.functional.pad(e.mask, (0, length - e.mask.shape[1])) for e in embeddings])
    return states, mask, torch.cat([e.pooled for e in embeddings])


class TextEncoder(Protocol):
    def encode(self, prompt: str) -> TextEmbedding: ...


class ImageEncoder(Protocol):
    def encode(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (1, N, image_dim)."""
        ...


class VideoAutoencoder(Protocol):
    """Latent geometry of HunyuanVideo: 16 channels, 8x spatial, 4x causal temporal."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> scaled latents (B, 16, (T-1)/4+1, H/8, W/8)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """scaled latents -> (B, 3, T, H, W) in [-1, 1]."""
        ...


def _crop_start(tokenizer, template: str) -> int:
    """Tokens before the prompt: the template prefix tokenized the way the full text is."""
    prefix = template.split("{}")[0]
    return len(tokenizer(prefix)["input_ids"])


class HunyuanTextEncoder:
    """LLaMA states (template, crop, hidden_states[-3]) + CLIP-L pooled output."""

    def __init__(self, llama, llama_tokenizer, clip, clip_tokenizer, template: str = PROMPT_TEMPLATE,
                 crop_start: int | None = None) -> None:
        self.llama, self.llama_tokenizer = llama.eval(), llama_tokenizer
        self.clip, self.clip_tokenizer = clip.eval(), clip_tokenizer
        self.template = template
        self.crop_start = _crop_start(llama_tokenizer, template) if crop_start is None else crop_start

    @classmethod
    def from_pretrained(cls, root: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        crop_start: int | None = None) -> "HunyuanTextEncoder":
        with loading("text encoders", root, "transformers"):
            from transformers import CLIPTextModel, LlamaModel
        parts = {}
        for key, component, folder in [("llama", "text encoder (LLaMA)", "text_encoder"),
                                       ("llama_tokenizer", "tokenizer (LLaMA)", "tokenizer"),
                                       ("clip", "text encoder 2 (CLIP)", "text_encoder_2"),
                                       ("clip_tokenizer", "tokenizer 2 (CLIP)", "tokenizer_2")]:
            with loading(component, root / folder, "transformers"):
                if key.endswith("tokenizer"):
                    parts[key] = _tokenizer(root / folder)
                else:
                    model_class = LlamaModel if key == "llama" else CLIPTextModel
                    # mismatched sizes are reported (check_loading_info), not raised as a RuntimeError
                    # that points at a report we keep quiet
                    parts[key] = _hf_model(model_class, root / folder, dtype, device, ignore_mismatched_sizes=True)
        with loading("tokenizer (LLaMA)", root / "tokenizer", "transformers"):
            return cls(**parts, crop_start=crop_start)

    def forward(self, prompts: list[str], pad_to_max: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable batch: LLaMA states (B, 256, D) after the template crop, their mask (B, 256)
        and CLIP pooled (B, P). :meth:`encode` is this without gradients, for one prompt; training
        the demo's encoders on captions (``framepack.train.text_encoder``) goes through it too.
        ``pad_to_max=False`` pads the LLaMA tokens only to the longest prompt: the states of valid
        tokens are the same (causal attention, padding at the end), at a fraction of the cost."""
        device = self.llama.device
        tokens = self.llama_tokenizer(
            [self.template.format(p) for p in prompts],
            max_length=self.crop_start + LLAMA_MAX_TOKENS,
            padding="max_length" if pad_to_max else "longest",
            truncation=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.llama(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        states = hidden.hidden_states[LLAMA_LAYER][:, self.crop_start :]
        clip_tokens = self.clip_tokenizer(
            prompts, max_length=CLIP_MAX_TOKENS, padding="max_length", truncation=True, return_tensors="pt"
        )
        pooled = self.clip(clip_tokens.input_ids.to(self.clip.device), output_hidden_states=False).pooler_output
        return states, mask[:, self.crop_start :].bool(), pooled

    @torch.no_grad()
    def encode(self, prompt: str) -> TextEmbedding:
        for encoder, dropped, kept in self.dropped_tokens(prompt):
            log.warning("the prompt is too long for the %s: its last %d tokens are dropped (it reads %d): %.60r",
                        encoder, dropped, kept, prompt)
        states, mask, pooled = self.forward([prompt])
        return TextEmbedding(states.float().cpu(), mask.cpu(), pooled.float().cpu())

    def dropped_tokens(self, prompt: str) -> list[tuple[str, int, int]]:
        """(encoder, tokens cut off, tokens it reads) for each encoder that truncates ``prompt``."""
        llama = len(self.llama_tokenizer(self.template.format(prompt))["input_ids"]) - self.crop_start
        clip = len(self.clip_tokenizer(prompt)["input_ids"])
        over = [("LLaMA text encoder", llama - LLAMA_MAX_TOKENS, LLAMA_MAX_TOKENS),
                ("CLIP text encoder", clip - CLIP_MAX_TOKENS, CLIP_MAX_TOKENS)]
        return [entry for entry in over if entry[1] > 0]


class SiglipImageEncoder:
    def __init__(self, model, processor) -> None:
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, root: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        with loading("image encoder (SigLIP)", root / "image_encoder", "transformers"):
            from transformers import SiglipImageProcessor, SiglipVisionModel  # (it warns at import)

            model = _hf_model(SiglipVisionModel, root / "image_encoder", dtype, device, ignore_mismatched_sizes=True)
        with loading("image processor (SigLIP)", root / "feature_extractor", "transformers"):
            if not (root / "feature_extractor").is_dir():
                raise CheckpointError(f"{root / 'feature_extractor'} does not exist")
            processor = SiglipImageProcessor.from_pretrained(root / "feature_extractor")
        return cls(model, processor)

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> torch.Tensor:
        inputs = self.processor(images=image, return_tensors="pt").to(device=self.model.device, dtype=self.model.dtype)
        return self.model(**inputs).last_hidden_state.float().cpu()


class HunyuanVAE:
    """diffusers' AutoencoderKLHunyuanVideo; the posterior mean is used so encoding is deterministic.

    Decoding reuses the decoder's output for temporal tiles the previous decode already made
    (:class:`framepack.tile_reuse.RepeatedTiles`), unless ``reuse_tiles`` is off.
    """

    def __init__(self, vae, tiling: bool = False, reuse_tiles: bool = True) -> None:
        self.vae = vae.eval()
        if tiling:
            vae.enable_tiling()
        self.scaling = float(getattr(vae.config, "scaling_factor", VAE_SCALING))
        self.tiles: RepeatedTiles | None = None
        if reuse_tiles:
            from .tile_reuse import RepeatedTiles

            self.tiles = RepeatedTiles.attach(vae.decoder)

    @classmethod
    def from_pretrained(cls, directory: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                        tiling: bool = False) -> "HunyuanVAE":
        """From the ``vae`` folder itself."""
        with loading("VAE", directory, "diffusers"):
            from diffusers import AutoencoderKLHunyuanVideo

            return cls(_hf_model(AutoencoderKLHunyuanVideo, Path(directory), dtype, device), tiling)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        p = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        return (self.vae.encode(p).latent_dist.mode() * self.scaling).float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scaling).to(device=self.vae.device, dtype=self.vae.dtype)
        with self.tiles.call() if self.tiles is not None else nullcontext():
            return self.vae.decode(z).sample.float().clamp(-1, 1).cpu()


# ---- model sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where each component comes from: hub ids or local directories in the layouts above."""

    transformer: str
    hunyuan: str  # text encoders (and the VAE unless ``vae`` names another)
    redux: str | None  # SigLIP; None for models without image conditioning
    mode: Mode
    crop_start: int | None = None
    vae: str | None = None  # a VAE directory of its own (e.g. the demo model's small autoencoder)
    text_embeddings: str | None = None  # stored prompt embeddings (framepack.text_store), a file path
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "resolution", "shift": the model's defaults

    def resolution(self, requested: int | None) -> int:
        """The resolution bucket to use: the request, else the model's own, else the 13B's 640."""
        return requested if requested is not None else int(self.extra.get("resolution", 640))

    def cfg(self, requested: float | None) -> float:
        """The real-CFG scale: the request, else the model's recommended one, else 1 (off)."""
        return requested if requested is not None else float(self.extra.get("cfg", 1.0))

    def steps(self, requested: int | None) -> int:
        """Sampling steps per section: the request, else the model's own (a few-step student's), else 25."""
        return requested if requested is not None else int(self.extra.get("steps", 25))

    def shift(self, requested: float | None) -> float | None:
        """The sigma shift: the request, else the one the model was trained with (None: from tokens)."""
        return requested if requested is not None else self.extra.get("shift")

    def sampling_mode(self, requested: Mode | None, seconds: float, plain: bool) -> Mode:
        """The section order of a job: the request, else the model's own, except that a manifest's
        ``forward_up_to`` (seconds) makes an inverted model sample plain clips that short forward,
        where that was measured to hold better (docs/demo-model.md, "A default that depends on the
        length"). Not plain: an end image or keyframes (inverted only) and an extended video (whose
        direction is the mode's) keep the model's own."""
        if requested is not None:
            return requested
        limit = self.forward_up_to
        if plain and limit is not None and seconds <= limit:
            return "forward"
        return self.mode

    @property
    def forward_up_to(self) -> float | None:
        """The length (seconds) up to which plain clips sample forward by default: the manifest's
        ``forward_up_to`` (checked by :func:`resolve_model`) on an inverted model; None otherwise
        (without one, or for a model that is not inverted, whose order never changes by length)."""
        limit = self.extra.get("forward_up_to")
        return None if limit is None or self.mode != "inverted" else float(limit)


HUNYUAN = "hunyuanvideo-community/HunyuanVideo"
REDUX = "lllyasviel/flux_redux_bfl"
NAMED_MODELS: dict[str, ModelSource] = {
    "framepack-i2v": ModelSource("lllyasviel/FramePackI2V_HY", HUNYUAN, REDUX, "inverted"),
    "framepack-f1": ModelSource("lllyasviel/FramePack_F1_I2V_HY_20250503", HUNYUAN, REDUX, "forward"),
}
MANIFEST = "framepack.json"
# models shipped inside the package (framepack/assets/NAME), each with its MODEL_CARD.md: the demo
# model (25 steps, real CFG) and its few-step student (4 steps, CFG folded in; what framepack demo runs)
EMBEDDED_MODELS: tuple[str, ...] = ("tiny", "tiny-fast")


def rewrite_manifest(path: Path, change: Callable[[dict], dict]) -> None:
    """``change`` applied to a model's ``framepack.json`` at ``path``, written atomically, its key
    order kept (calibrate-cache and the packager edit shipped manifests, diffed in review)."""
    from .jobs import atomic_write

    text = json.dumps(change(json.loads(Path(path).read_text())), indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def asset(*parts: str) -> Path:
    """A file shipped inside the package (``framepack/assets/...``), e.g. the demo model."""
    return Path(str(resources.files("framepack").joinpath("assets", *parts)))


def resolve_model(name_or_path: str) -> ModelSource:
    """A named model, or a directory holding a ``framepack.json`` manifest with relative paths."""
    if name_or_path in NAMED_MODELS:
        return NAMED_MODELS[name_or_path]
    if name_or_path in EMBEDDED_MODELS:
        path = asset(name_or_path)  # an embedded demo model (see its MODEL_CARD.md)
        if not (path / MANIFEST).is_file():
            raise ValueError(f"the embedded model {name_or_path!r} is missing from this installation ({path})")
    else:
        path = Path(name_or_path).expanduser()
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        known = ", ".join(sorted(NAMED_MODELS) + sorted(EMBEDDED_MODELS))
        if path.exists():
            raise ValueError(f"{path} has no {MANIFEST}: not a framepack model directory")
        raise ValueError(f"unknown model {name_or_path!r}: not one of {known}, and no such directory")
    try:
        data = json.loads(manifest.read_text())
        base = manifest.parent

        def local(key: str) -> str | None:
            # a path relative to the manifest if it exists there, else a hub id
            value = data.get(key)
            if value is None:
                return None
            return str((base / value).resolve()) if (base / value).exists() else str(value)

        known = {"transformer", "hunyuan", "redux", "vae", "mode", "crop_start", "text_embeddings"}
        limit = data.get("forward_up_to")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
            raise ValueError(f"{manifest}: forward_up_to must be a number of seconds > 0, got {limit!r}")
        return ModelSource(
            transformer=local("transformer"), hunyuan=local("hunyuan"), redux=local("redux"),
            mode=data.get("mode", "inverted"), crop_start=data.get("crop_start"), vae=local("vae"),
            # stored embeddings are a speed-up, never a hub id: a manifest copied without them loads the encoders
            text_embeddings=local("text_embeddings") if (base / (data.get("text_embeddings") or "")).is_file() else None,
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise ValueError(f"{manifest} is not a valid model manifest ({exc})") from None


@dataclass
class Encoders:
    """The parts of a model that encode its inputs (no transformer: preparing a dataset needs none)."""

    text: TextEncoder
    image: ImageEncoder | None
    vae: VideoAutoencoder


@dataclass
class Components:
    transformer: FramePackTransformer
    text: TextEncoder
    image: ImageEncoder | None
    vae: VideoAutoencoder
    source: ModelSource


def _files_of(*subfolders: str) -> list[str]:
    """Download patterns for the parts of a repository we use (never its other large files)."""
    kinds = ("*.json", "*.safetensors", "*.txt", "*.model")
    return ["model_index.json"] + [f"{sub}/{kind}" for sub in subfolders for kind in kinds]


HUNYUAN_FILES = _files_of("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae")
REDUX_FILES = _files_of("image_encoder", "feature_extractor")


LOAD_STEPS = ("text encoders", "image encoder", "VAE", "transformer")  # what on_step names, in order


def load_components(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_tiling: bool = False,
    local_files_only: bool = False,
    cache_dir: str | Path | None = None,
    on_step: Callable[[str], None] = lambda step: None,
    storage_dtype: torch.dtype | None = None,
    mapped: bool = False,
    stored_text: bool = False,
) -> Components:
    """Fetch (cached, resumable) or open each component and build it.

    Every failure is a :class:`ComponentError` (a ValueError) naming the component, in one line.
    ``on_step`` is called with each name of :data:`LOAD_STEPS` as that part starts (progress).
    ``storage_dtype=torch.float8_e4m3fn`` reads the transformer's block weights straight into fp8
    (no bf16 copy of the whole model on the way: what a memory plan with fp8 storage needs);
    ``mapped`` leaves those already float8 in the file mapped, unread (a plan streaming the
    transformer from disk: see ``model/io.py``). ``stored_text``: see :func:`load_encoders`.
    """
    hub = dict(local_files_only=local_files_only, cache_dir=cache_dir)
    # the transformer, by far the largest, loads last: the others' loading transients (transformers
    # reads a checkpoint, then casts it: 2-3x the weights for a moment) happen while it is not yet
    # resident (benchmarks/cpu_13b.py: the 13B's peak RSS on CPU)
    encoders = load_encoders(source, dtype, device, vae_tiling, on_step=on_step, stored_text=stored_text, **hub)
    on_step("transformer")
    log.info("loading transformer from %s", source.transformer)
    with loading("transformer", source.transformer):
        transformer = FramePackTransformer.from_pretrained(source.transformer, dtype=dtype, device=device,
                                                           storage_dtype=storage_dtype, mapped=mapped, **hub)
    return Components(transformer, encoders.text, encoders.image, encoders.vae, source)


def load_encoders(
    source: ModelSource,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_tiling: bool = False,
    on_step: Callable[[str], None] = lambda step: None,
    stored_text: bool = False,
    **hub: Any,
) -> Encoders:
    """The parts of a model that encode its inputs: text encoders, image encoder (if any) and VAE.

    What generation loads before the transformer, and all that preparing a dataset needs.
    ``stored_text``: serve the model's stored prompt embeddings (if it ships them) and build the
    text encoders only for another prompt (:mod:`framepack.text_store`); not for a run under a
    memory plan, which places the encoders' modules. ``hub`` is passed to :func:`resolve_source`
    (``local_files_only``, ``cache_dir``).
    """
    on_step("text encoders")
    with loading("text encoders", source.hunyuan):
        hunyuan = resolve_source(source.hunyuan, allow_patterns=HUNYUAN_FILES, **hub)
    log.info("loading text encoders and VAE from %s", hunyuan)

    def text_encoders() -> HunyuanTextEncoder:
        return HunyuanTextEncoder.from_pretrained(hunyuan, dtype, device, crop_start=source.crop_start)

    text: TextEncoder
    if stored_text and source.text_embeddings:
        text = _stored_text_encoder(Path(source.text_embeddings), hunyuan, source.crop_start, text_encoders)
    else:
        text = text_encoders()
    on_step("image encoder")
    image = None
    if source.redux:
        with loading("image encoder", source.redux):
            redux = resolve_source(source.redux, allow_patterns=REDUX_FILES, **hub)
        image = SiglipImageEncoder.from_pretrained(redux, dtype, device)
    on_step("VAE")
    vae = load_vae(Path(source.vae) if source.vae else hunyuan / "vae", dtype, device, vae_tiling)
    return Encoders(text, image, vae)


def _stored_text_encoder(path: Path, hunyuan: Path, crop_start: int | None,
                         load: Callable[[], TextEncoder]) -> TextEncoder:
    from .text_store import StoredTextEncoder, encoder_identity, load_text_embeddings

    with loading("stored text embeddings", path):
        stored = load_text_embeddings(path, encoder_identity(hunyuan, crop_start))
    return StoredTextEncoder(stored, load) if stored else load()


def load_vae(directory: Path, dtype: torch.dtype, device: str | torch.device, tiling: bool) -> VideoAutoencoder:
    """The VAE named by the directory's config.json: HunyuanVideo's, or our small one."""
    with loading("VAE", directory):
        class_name = json.loads((directory / "config.json").read_text()).get("_class_name")
    if class_name == "SmallVideoAutoencoder":
        from .small_vae import SmallVideoAutoencoder

        with loading("VAE", directory):
            check_weights(directory)
            vae = SmallVideoAutoencoder.from_pretrained(directory)  # small: fp32 weights whatever --dtype
            return vae.for_inference(device, decode_dtype=native_bf16_or_fp32(torch.device(device)))
    return HunyuanVAE.from_pretrained(directory, dtype, device, tiling=tiling)
