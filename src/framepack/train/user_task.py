"""Training tasks "lora" and "finetune": the packed transformer on a user's prepared dataset.

Input: a folder made by ``framepack dataset prepare`` (:class:`framepack.train.dataset.PreparedDataset`),
whose cached latents and text / image embeddings were made with the components of one model (its
``.model``: the demo model "tiny" or a model directory in the 13B layout). Sections are drawn as
the demo task draws them (:mod:`framepack.train.framepack_task`): a layout ("inverted", "forward"
or "vanilla", drawn by the ``layouts`` weights), a section of the clip planned by
:func:`framepack.planning.plan_sections`, its packed context built by ``context_latents`` (zeros
where the planner has nothing yet, so a clip of one section trains with mostly blank context) and
FramePack's objective, flow matching on the section's window (Zhang & Agrawala 2025, sec. 3, after
Lipman et al. 2023): ``x = (1 - s) x0 + s noise``, target velocity ``noise - x0``, ``s`` drawn
from the shifted schedule's distribution; with the start frame's SigLIP embedding when the model
has an image encoder.

``lora`` adds PEFT LoRA layers (rank, alpha, dropout) to FramePack's blocks
(:data:`LORA_TARGETS`) over frozen base weights, optionally stored in fp8 (``fp8_base``), and
exports ``final/lora.safetensors`` for ``framepack generate --lora``; ``finetune`` trains every
weight and exports ``final/`` as a model directory (its transformer beside a manifest naming the
base model's other components) for ``framepack generate --model``.

Config (``task_args`` of a ``framepack train`` config; all but ``dataset`` optional)::

    {"dataset": "data/prepared", "layouts": {"inverted": 2, "forward": 1}, "window": 9,
     "vary_sections": false, "shift": 3.0, "text_dropout": 0.1, "gradient_checkpointing": true,
     "autocast": "bf16", "validate_seconds": 1.2, "validate_steps": 10, "validate_seed": 0,
     "rank": 16, "alpha": 16, "dropout": 0.0, "target_modules": [...], "fp8_base": false,
     "lora_format": "framepack"}

Every batch draws from one bucket of the dataset (its samples' latents share a shape) and one
layout (so the packed context levels share theirs). Batch ``j`` of a stream is drawn from the seed
``seed + j`` alone, so a stream the trainer starts again at step ``k`` with seed ``base + k`` (a
resumed run) continues the uninterrupted one exactly; sigmas and noise come from torch's global
generator, which the trainer seeds and checkpoints.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..components import MANIFEST, ModelSource, TextEmbedding, resolve_model, stack_embeddings
from ..lora import FORMATS, LoraLayer, LoraWeights, save_lora
from ..model import FramePackTransformer, HistoryInput
from ..planning import DEFAULT_WINDOW, MODES, SectionPlan, plan_sections, video_seconds
from ..sampling import TIMESTEP_SCALE
from ..trainer import register
from .framepack_task import Batch, context_latents, noised, stack_history, weighted_mse

log = logging.getLogger(__name__)

# FramePack's block Linears a LoRA trains: attention q/k/v/out of both streams and the feed-forward
# layers of the dual-stream blocks; q/k/v, the MLP input and the fused output of the single-stream
# blocks. Not the AdaLN modulation linears (norm*.linear): they map the timestep embedding, which
# a user's clips do not change, and the text refiner's layers are left alone (the captions' encoder
# is frozen too). The names are the released checkpoints' (and so framepack.lora's module paths).
DUAL_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
SINGLE_TARGETS: tuple[str, ...] = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
LORA_TARGETS: str = (
    r"(transformer_blocks\.\d+\.(" + "|".join(map(re.escape, DUAL_TARGETS)) + r"))"
    r"|(single_transformer_blocks\.\d+\.(" + "|".join(map(re.escape, SINGLE_TARGETS)) + r"))"
)  # a regex PEFT matches against whole module paths
ADAPTER = "default"  # PEFT's adapter name
DEFAULT_SHIFT = 3.0  # the demo model's training shift; a model's manifest may name its own
DEFAULT_DISTILLED_GUIDANCE = 10.0  # what generation feeds a distilled-guidance model (GenerationSettings)
AUTOCAST = ("no", "bf16")
LORA_ONLY = ("rank", "alpha", "dropout", "target_modules", "fp8_base", "lora_format")
LORA_FILE = "lora.safetensors"
TRANSFORMER_DIR = "transformer"


# ---- configuration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserTaskConfig:
    dataset: str
    layouts: Mapping[str, float] | None = None  # None: the model's own mode only
    window: int = DEFAULT_WINDOW  # latents per section; a shorter clip trains one section of its own length
    vary_sections: bool = False  # plan each sample as a video of 1..N sections (a prefix of its clip)
    shift: float | None = None  # None: the model's manifest's, else DEFAULT_SHIFT
    text_dropout: float = 0.0  # captions replaced by the empty prompt this often (what real CFG guides against)
    distilled_guidance: float = DEFAULT_DISTILLED_GUIDANCE  # for models with a guidance embedder (the 13B)
    gradient_checkpointing: bool = False
    autocast: str = "no"  # "bf16": the transformer's forward under bf16 autocast (weights stay fp32)
    validate_seconds: float | None = None  # None: one section
    validate_steps: int = 10
    validate_seed: int = 0
    # lora only
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = LORA_TARGETS  # a regex on module paths, or PEFT's list of name suffixes
    fp8_base: bool = False  # base weights stored in fp8 (framepack.runtime.placement), LoRA layers in fp32
    lora_format: str = "framepack"  # any of framepack.lora.FORMATS

    def __post_init__(self) -> None:
        problem = next(self._problems(), None)
        if problem is not None:
            raise ValueError(problem)

    def _problems(self) -> Iterator[str]:
        if self.layouts is not None:
            unknown = sorted(set(self.layouts) - set(MODES))
            if unknown:
                yield f"layouts names unknown layouts {unknown}; choose from {', '.join(MODES)}"
            elif not all(_finite(w) and w >= 0 for w in self.layouts.values()) or not sum(self.layouts.values()) > 0:
                yield f"layouts must be weights >= 0 with a positive sum, got {dict(self.layouts)}"
        if self.window < 1:
            yield f"window must be >= 1, got {self.window}"
        if self.shift is not None and not (_finite(self.shift) and self.shift > 0):
            yield f"shift must be a positive number, got {self.shift}"
        if not (_finite(self.text_dropout) and 0.0 <= self.text_dropout < 1.0):
            yield f"text_dropout must be in [0, 1), got {self.text_dropout}"
        if self.autocast not in AUTOCAST:
            yield f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}"
        if self.validate_steps < 1:
            yield f"validate_steps must be >= 1, got {self.validate_steps}"
        if self.validate_seconds is not None and not (_finite(self.validate_seconds) and self.validate_seconds > 0):
            yield f"validate_seconds must be a positive number of seconds, got {self.validate_seconds}"
        if not _finite(self.distilled_guidance):
            yield f"distilled_guidance must be a number, got {self.distilled_guidance!r}"
        if self.rank < 1 or not (_finite(self.alpha) and self.alpha > 0):
            yield f"rank must be >= 1 and alpha > 0, got rank {self.rank}, alpha {self.alpha}"
        if not (_finite(self.dropout) and 0.0 <= self.dropout < 1.0):
            yield f"dropout must be in [0, 1), got {self.dropout}"
        if self.lora_format not in FORMATS:
            yield f"lora_format must be one of {', '.join(FORMATS)}, got {self.lora_format!r}"

    @classmethod
    def from_args(cls, args: Mapping[str, Any], kind: str) -> UserTaskConfig:
        """The config of task ``kind`` ("lora" or "finetune"); one line naming an unknown or misplaced key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"task {kind!r}: unknown task_args {unknown}; known: {', '.join(sorted(known))}")
        if "dataset" not in args:
            raise ValueError(f"task {kind!r}: task_args must name the prepared dataset (\"dataset\": DIR)")
        if kind == "finetune":
            misplaced = sorted(set(args) & set(LORA_ONLY))
            if misplaced:
                raise ValueError(f"task 'finetune' trains every weight: {misplaced} are options of task 'lora'")
        return cls(**dict(args))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def layout_probabilities(layouts: Mapping[str, float]) -> tuple[tuple[str, ...], np.ndarray]:
    """(layouts with weight > 0, their draw probabilities)."""
    modes = tuple(m for m in MODES if layouts.get(m, 0) > 0)
    weights = np.array([float(layouts[m]) for m in modes])
    return modes, weights / weights.sum()


def clip_sections(latent_frames: int, window: int) -> tuple[int, int]:
    """(sections, window) a clip of ``latent_frames`` latents trains: whole windows after the start
    latent; a clip shorter than one window + 1 trains one section as long as it has latents."""
    if latent_frames < 2:
        raise ValueError(f"a clip of {latent_frames} latent frame(s) has no frame after its start to train on")
    if latent_frames - 1 < window:
        return 1, latent_frames - 1
    return (latent_frames - 1) // window, window


# ---- batches ------------------------------------------------------------------------------------------------------


@dataclass
class UserBatch(Batch):
    image: torch.Tensor | None = None  # (B, N, image_dim) SigLIP embeddings of the start frames, or None


def bucket_draws(buckets: Mapping[str, Sequence[int]]) -> tuple[list[str], np.ndarray]:
    """(bucket names, probability of each): proportional to its sample count, so every sample is
    drawn equally often whatever its bucket."""
    names = sorted(name for name, members in buckets.items() if members)
    sizes = np.array([len(buckets[n]) for n in names], dtype=np.float64)
    return names, sizes / sizes.sum()


# ---- LoRA ------------------------------------------------------------------------------------------------------------


def add_lora(model: FramePackTransformer, config: UserTaskConfig) -> FramePackTransformer:
    """Freeze ``model`` and add PEFT LoRA layers (in place); returns it (the same class, the same forward)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer as PeftLoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ..runtime.placement import QuantizedLinear

    model.requires_grad_(False)
    targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    lora_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets)
    # PEFT's Linear LoRA layer only needs in_features / out_features and a forward from its base
    # layer, which the fp8 QuantizedLinear has (merging is never asked of it: we export A and B)
    lora_config._register_custom_module({QuantizedLinear: LoraLinear})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        try:
            inject_adapter_in_model(lora_config, model, adapter_name=ADAPTER)
        except ValueError as exc:  # PEFT: no module matched
            raise ValueError(f"target_modules {config.target_modules!r} names no layer of this transformer ({exc})") from None
    for module in model.modules():
        if isinstance(module, PeftLoraLayer):
            # PEFT makes them in the base weight's dtype, float8 for an fp8 base (no arithmetic on a
            # CPU); the trained weights are kept in fp32 whatever the base is stored as
            module.lora_A.to(torch.float32)
            module.lora_B.to(torch.float32)
    return model


def lora_weights(model: nn.Module) -> LoraWeights:
    """The trained LoRA layers of ``model`` as framepack.lora's LoraWeights, by base-layer path."""
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, PeftLoraLayer) and ADAPTER in module.lora_A:
            down = module.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            up = module.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            layers[path] = LoraLayer(down, up, float(module.lora_alpha[ADAPTER]))
    if not layers:
        raise ValueError("the model holds no LoRA layers to export")
    return LoraWeights(layers, "framepack")


# ---- the tasks ---------------------------------------------------------------------------------------------------------


def _open_dataset(directory: str):
    from .dataset import PreparedDataset

    return PreparedDataset(Path(directory))


class UserTask:
    """Sections of a prepared dataset's clips, FramePack's objective; "lora" or "finetune"."""

    def __init__(self, args: Mapping[str, Any], kind: str, dataset: Any = None) -> None:
        self.kind = kind
        self.options = UserTaskConfig.from_args(args, kind)
        if kind == "finetune" and self.options.fp8_base:
            raise ValueError("fp8 base weights are for task 'lora': a full fine-tune updates every weight")
        self.dataset = _open_dataset(self.options.dataset) if dataset is None else dataset
        self.source: ModelSource = resolve_model(str(self.dataset.model))
        self.buckets = {name: list(members) for name, members in self.dataset.buckets().items() if members}
        layouts = self.options.layouts if self.options.layouts is not None else {self.source.mode: 1.0}
        self.modes, self.mode_p = layout_probabilities(layouts)
        self.shift = float(self.options.shift or self.source.shift(None) or DEFAULT_SHIFT)
        fp8 = self.options.fp8_base
        # with fp8_base the blocks' weights are read straight into fp8 (for the 13B: no fp32 copy of
        # the whole model on the way); everything computes in fp32, the trained weights included
        self.model = FramePackTransformer.from_pretrained(self.source.transformer, dtype=torch.float32,
                                                          storage_dtype=torch.float8_e4m3fn if fp8 else None)
        self.buckets = self._trainable_buckets()
        if self.options.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        if kind == "lora":
            if fp8:
                from ..runtime.placement import store_weights

                # the float8 block weights become QuantizedLinear layers as they are (not rounded again)
                store_weights(self.model, "fp8", compute_dtype=torch.float32)
            add_lora(self.model, self.options)
        self._empty: TextEmbedding | None = None
        self._side: dict[str, Any] = {}  # text / image encoders and VAE, loaded when first needed

    # ---- checks, once ----

    def _trainable_buckets(self) -> dict[str, list[int]]:
        """The buckets of clips (not of images: a single latent has no section to train), each
        checked by its first sample against the model: channels, patch, text widths, image embedding."""
        cfg = self.model.config
        trainable = {}
        for name, members in self.buckets.items():
            sample = self.dataset.sample(members[0])
            channels, frames, height, width = sample.latents.shape
            where = f"bucket {name} ({sample.source})"
            if channels != cfg.in_channels:
                raise ValueError(f"{where}: latents have {channels} channels, the transformer takes {cfg.in_channels} "
                                 f"(prepared with another model than {self.dataset.model}?)")
            if height % cfg.patch_size or width % cfg.patch_size:
                raise ValueError(f"{where}: latents of {height}x{width} are not multiples of the patch {cfg.patch_size}")
            if frames < 2:
                log.warning("bucket %s: %d images left out (sections need frames after the start)", name, len(members))
                continue
            if cfg.has_image_proj and sample.image is None:
                raise ValueError(f"{where}: no image embedding, and {self.dataset.model} conditions on one "
                                 "(prepare the dataset again with the model's image encoder)")
            if sample.text.shape[-1] != cfg.text_embed_dim or sample.pooled.shape[-1] != cfg.pooled_projection_dim:
                raise ValueError(f"{where}: text embeddings of width {sample.text.shape[-1]}/{sample.pooled.shape[-1]}, "
                                 f"the transformer takes {cfg.text_embed_dim}/{cfg.pooled_projection_dim}")
            trainable[name] = members
        if not trainable:
            raise ValueError(f"the prepared dataset {self.options.dataset} holds no video clips to train on")
        return trainable

    # ---- data ----

    def batches(self, batch_size: int, seed: int) -> Iterator[UserBatch]:
        """Batch j is drawn from seed ``seed + j`` alone (the trainer passes ``base + step`` on a
        resume, so the resumed stream continues the uninterrupted one exactly)."""
        names, bucket_p = bucket_draws(self.buckets)
        plans: dict[tuple[int, str, int], list[SectionPlan]] = {}
        schedule, max_padding = self.model.config.schedule, self.model.config.max_inverted_padding
        for j in itertools.count():
            rng = np.random.default_rng(seed + j)
            members = self.buckets[names[int(rng.choice(len(names), p=bucket_p))]]
            mode = self.modes[int(rng.choice(len(self.modes), p=self.mode_p))]
            targets, windows, contexts, texts, images = [], [], [], [], []
            for _ in range(batch_size):
                sample = self.dataset.sample(members[int(rng.integers(len(members)))])
                latents = sample.latents[None].float()  # (1, C, T, h, w)
                count, window = clip_sections(latents.shape[2], self.options.window)
                if self.options.vary_sections:
                    count = int(rng.integers(1, count + 1))
                key = (count, mode, window)
                if key not in plans:  # pure: planned once per (sections, layout, window)
                    plans[key] = plan_sections(count, mode, schedule, window,  # type: ignore[arg-type]
                                                max_padding=max_padding)
                plan = plans[key][int(rng.integers(count))]
                targets.append(latents[:, :, list(plan.positions)])
                windows.append(torch.tensor(plan.window_indices))
                contexts.append(context_latents(plan, latents))
                dropped = self.options.text_dropout and rng.random() < self.options.text_dropout
                texts.append(self._empty_prompt() if dropped else _embedding(sample))
                if sample.image is not None:
                    images.append(sample.image[None].float())
            text, mask, pooled = stack_embeddings(texts)
            yield UserBatch(torch.cat(targets), torch.stack(windows), stack_history(plan, contexts), text, mask, pooled,
                            image=torch.cat(images) if self.model.config.has_image_proj else None)

    def _empty_prompt(self) -> TextEmbedding:
        if self._empty is None:
            e = self._components()["text"].encode("")  # on the encoders' device: batches live on the CPU
            self._empty = TextEmbedding(e.states.float().cpu(), e.mask.cpu(), e.pooled.float().cpu())
        return self._empty

    # ---- objective ----

    def loss(self, model: nn.Module, batch: UserBatch) -> torch.Tensor:
        device = next(model.parameters()).device
        x, sigma, velocity = noised(batch.target.to(device), self.shift)
        b = x.shape[0]
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((b,), self.options.distilled_guidance * TIMESTEP_SCALE, device=device)
        history = [HistoryInput(h.kernel, h.latents.to(device), h.indices.to(device)) for h in batch.history]
        image = None if batch.image is None else batch.image.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=self.options.autocast == "bf16"):
            v = model(x, sigma * TIMESTEP_SCALE, batch.text.to(device), batch.mask.to(device), batch.pooled.to(device),
                      image, batch.window.to(device), history, guidance)
        return weighted_mse(v, velocity, None)

    # ---- export ----

    def export(self, model: nn.Module, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "lora":
            save_lora(lora_weights(model), directory / LORA_FILE, self.options.lora_format)
            return
        model.save_pretrained(directory / TRANSFORMER_DIR)
        (directory / MANIFEST).write_text(json.dumps(finetuned_manifest(self.source, TRANSFORMER_DIR), indent=2) + "\n")

    # ---- validation ----

    def validate(self, model: nn.Module, step: int, directory: Path) -> None:
        """A short video from the dataset's first clip's start frame and caption through the
        generation pipeline, written to ``directory/validation-STEP.mp4``."""
        from PIL import Image

        from ..jobs import JobDir
        from ..pipeline import FramePackPipeline
        from ..settings import GenerationSettings

        side = self._components()
        first = self.dataset.sample(min(i for members in self.buckets.values() for i in members))
        with torch.no_grad():
            pixels = side["vae"].decode(first.latents[None, :, :1].float())  # (1, 3, 1, H, W)
        frame = ((pixels[0, :, 0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()
        height, width = frame.shape[:2]
        seconds = self.options.validate_seconds or video_seconds(1, self.options.window)
        was_training = model.training
        model.eval()
        try:
            with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
                image = Path(scratch) / "start.png"
                Image.fromarray(frame).save(image)
                settings = GenerationSettings(image=str(image), prompt=first.caption, model=str(self.dataset.model),
                                              seconds=seconds, steps=self.options.validate_steps,
                                              seed=self.options.validate_seed, window=self.options.window,
                                              resolution=_resolution(height, width))
                components = side["components"](model)
                job = JobDir.create(Path(scratch) / "job", settings, Path(directory) / f"validation-{step}.mp4")
                FramePackPipeline(components, next(model.parameters()).device).run(job)
        finally:
            model.train(was_training)

    def _components(self) -> dict[str, Any]:
        """The base model's text / image encoders and VAE (loaded once), and a Components maker."""
        if not self._side:
            from ..components import Components, resolve_dtype
            from .dataset import load_encoders

            # where the transformer trains (accelerate has placed it by the first batch): for the 13B,
            # an 8B text encoder and a video VAE are too slow (and large) for the CPU in fp32
            device = next(self.model.parameters()).device
            e = load_encoders(str(self.dataset.model), device, resolve_dtype("auto", device))
            self._side = {"text": e.text, "image": e.image, "vae": e.vae,
                          "components": lambda model: Components(model, e.text, e.image, e.vae, self.source)}
        return self._side


def _embedding(sample: Any) -> TextEmbedding:
    """A prepared sample's caption embedding: text (L, D), mask (L,), pooled (P,) -> batch of one."""
    return TextEmbedding(sample.text[None].float(), sample.mask[None].bool(), sample.pooled[None].float())


def _resolution(height: int, width: int) -> int:
    """The resolution whose buckets hold a frame's size (they keep about resolution**2 pixels), so
    the validation video has the training clips' size."""
    return max(16, round(math.sqrt(height * width) / 16) * 16)


def finetuned_manifest(source: ModelSource, transformer: str) -> dict[str, Any]:
    """A model directory's manifest: the fine-tuned transformer beside it, the base model's other
    components where they are (absolute paths, or hub ids), and the base model's defaults."""
    # not the base's "world" (framepack.world_check): it describes the demo's world, not the user's videos
    extra = {k: v for k, v in source.extra.items() if k != "world"}
    manifest = {"transformer": transformer, "hunyuan": source.hunyuan, "redux": source.redux, "vae": source.vae,
                "mode": source.mode, "text_embeddings": source.text_embeddings, **extra}
    if source.crop_start is not None:
        manifest["crop_start"] = source.crop_start
    return {k: v for k, v in manifest.items() if v is not None or k == "redux"}


@register("lora")
def lora_task(args: dict) -> UserTask:
    return UserTask(args, "lora")


@register("finetune")
def finetune_task(args: dict) -> UserTask:
    return UserTask(args, "finetune")
