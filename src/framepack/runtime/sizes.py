"""Component sizes from configs alone: every model is built on the meta device (no weights, no
download) and its parameters are counted exactly.

What the planner needs of a component is plain data (:class:`ComponentSize`): its parameters
outside the repeated blocks, and each block (the unit of block offload), with how many of those
parameters are ``nn.Linear`` weights (the ones stored in 8 bits under fp8/int8 storage) and how
many rows those weights have (one scale per row). Building the data needs torch, transformers and
diffusers; everything downstream of it (``framepack.runtime.plan``) is pure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["text", "image", "vae", "transformer"]
"""The step a component runs in: text and image encoders (encode phase), the transformer
(sample phase), the VAE (encode the start image, decode every section)."""

# HunyuanVideo's LLaMA text encoder (hunyuanvideo-community/HunyuanVideo, text_encoder/config.json)
HUNYUAN_LLAMA = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, vocab_size=128320,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
# CLIP-L text tower (openai/clip-vit-large-patch14; HunyuanVideo's text_encoder_2). Not transformers'
# CLIPTextConfig defaults: those are the ViT-B/32 text tower (width 512).
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, vocab_size=49408, max_position_embeddings=77)
# SigLIP so400m patch14-384 (lllyasviel/flux_redux_bfl, image_encoder/config.json)
SIGLIP_SO400M = dict(hidden_size=1152, num_hidden_layers=27, intermediate_size=4304, num_attention_heads=16,
                     image_size=384, patch_size=14)
PROMPT_PREFIX_TOKENS = 95  # HunyuanVideo's template before the prompt (its crop_start)


@dataclass(frozen=True)
class ParamGroup:
    """A set of parameters: all of them, and the ``nn.Linear`` weights among them that fp8 / int8
    storage keeps in 8 bits (count, rows: one scale per tensor for fp8, per row for int8)."""

    params: int
    linear_params: int = 0
    linear_rows: int = 0
    linear_tensors: int = 0

    def __add__(self, other: "ParamGroup") -> "ParamGroup":
        return ParamGroup(self.params + other.params, self.linear_params + other.linear_params,
                          self.linear_rows + other.linear_rows, self.linear_tensors + other.linear_tensors)


@dataclass(frozen=True)
class ComponentSize:
    """One component: parameters outside the repeated blocks (``rest``) and each block.

    ``work_bytes``: activation memory of one run, for components whose run does not depend on the
    resolution (the encoders; the transformer's and VAE's come from :mod:`framepack.runtime.plan`).
    """

    name: str
    role: Role
    rest: ParamGroup
    blocks: tuple[ParamGroup, ...] = ()
    quantizable: bool = False  # offered fp8 / int8 storage (the large linear-heavy models)
    work_bytes: int = 0

    @property
    def params(self) -> int:
        return self.rest.params + sum(b.params for b in self.blocks)


@dataclass(frozen=True)
class TransformerGeometry:
    inner_dim: int
    head_dim: int
    mlp_ratio: float
    context_schedule: str  # e.g. "f1k1f2k2f16k4"
    patch: tuple[int, int, int]
    image_tokens: int  # SigLIP tokens prepended to the text (0 without image conditioning)
    text_tokens: int  # LLaMA tokens at most (after the template crop)


@dataclass(frozen=True)
class VaeGeometry:
    top_channels: int  # width of the decoder's full-resolution stage (the largest activations)
    spatial: int = 8
    temporal: int = 4
    causal_attention: bool = False  # mid-block attention over every latent token of a call
    frames_per_call: int | None = None  # framewise decoding: latents per call (None: all at once)
    tiles: tuple[int, ...] = ()  # tile sizes in pixels it can decode in; () = no tiling


@dataclass(frozen=True)
class ModelSizes:
    model: str
    transformer: ComponentSize
    encoders: tuple[ComponentSize, ...]  # run in the encode phase, in order
    vae: ComponentSize
    transformer_geometry: TransformerGeometry
    vae_geometry: VaeGeometry
    resolution: int  # the model's default bucket
    cfg: float  # the model's default real-CFG scale (1 = off: batch 1)

    @property
    def components(self) -> tuple[ComponentSize, ...]:
        return (self.transformer, *self.encoders, self.vae)


# ---- counting -------------------------------------------------------------------------------------


def quantized_linears(module) -> dict[str, object]:
    """The Linear layers fp8 / int8 storage puts in 8 bits, by qualified name: the rule
    ``framepack.runtime.placement.store_weights`` applies (``quantized_linear_names``)."""
    from .placement import quantized_linear_names

    return {name: module.get_submodule(name) for name in quantized_linear_names(module)}


def measure(name: str, role: Role, module, block_lists: tuple[str, ...] = (), quantizable: bool = False,
            work_bytes: int = 0) -> ComponentSize:
    """Count ``module``'s parameters (shared ones once); the modules in each named ``ModuleList``
    are its blocks, everything else is its rest."""
    prefixes = [f"{path}.{i}." for path in block_lists for i in range(len(module.get_submodule(path)))]
    groups = {prefix: ParamGroup(0) for prefix in [*prefixes, ""]}

    def owner(qualified: str) -> str:
        return next((p for p in prefixes if qualified.startswith(p)), "")

    for pname, p in module.named_parameters():
        groups[owner(pname)] += ParamGroup(p.numel())
    for lname, linear in quantized_linears(module).items():
        groups[owner(lname + ".")] += ParamGroup(0, linear.weight.numel(), linear.out_features, 1)
    return ComponentSize(name, role, groups[""], tuple(groups[p] for p in prefixes), quantizable, work_bytes)


def encoder_work_bytes(tokens: int, hidden: int, intermediate: int, layers: int, heads: int,
                       act_bytes: int = 2) -> int:
    """Activations of one encoder run (batch 1): every layer's hidden states are kept
    (``output_hidden_states``; FramePack reads LLaMA's third from last), plus one layer's MLP
    (gate, up, product, 3 x intermediate) and an attention score matrix, had SDPA fallen back to
    the math kernel (heads x tokens^2 in fp32: a few MB at these lengths, so we simply allow it)."""
    states = (layers + 1) * tokens * hidden * act_bytes
    mlp = 3 * tokens * intermediate * act_bytes
    scores = heads * tokens * tokens * 4
    return states + mlp + scores


# ---- building on the meta device -------------------------------------------------------------------


def _empty():
    from accelerate import init_empty_weights

    return init_empty_weights()


def transformer_size(config) -> tuple[ComponentSize, TransformerGeometry]:
    import torch

    from ..components import LLAMA_MAX_TOKENS
    from ..model import FramePackTransformer

    with torch.device("meta"):
        model = FramePackTransformer(config)
    cfg = model.config
    size = measure("transformer", "transformer", model, ("transformer_blocks", "single_transformer_blocks"),
                   quantizable=True)
    siglip_tokens = (SIGLIP_SO400M["image_size"] // SIGLIP_SO400M["patch_size"]) ** 2
    geometry = TransformerGeometry(cfg.inner_dim, cfg.attention_head_dim, cfg.mlp_ratio, cfg.context_schedule,
                                   cfg.patch, siglip_tokens if cfg.has_image_proj else 0, LLAMA_MAX_TOKENS)
    return size, geometry


def llama_size(config) -> ComponentSize:
    from transformers import LlamaModel

    from ..components import LLAMA_MAX_TOKENS

    with _empty():
        model = LlamaModel(config)
    tokens = PROMPT_PREFIX_TOKENS + LLAMA_MAX_TOKENS
    work = encoder_work_bytes(tokens, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                              config.num_attention_heads)
    return measure("text encoder (LLaMA)", "text", model, ("layers",), quantizable=True, work_bytes=work)


def clip_size(config) -> ComponentSize:
    from transformers import CLIPTextModel

    from ..components import CLIP_MAX_TOKENS

    with _empty():
        model = CLIPTextModel(config)
    work = encoder_work_bytes(CLIP_MAX_TOKENS, config.hidden_size, config.intermediate_size,
                              config.num_hidden_layers, config.num_attention_heads)
    return measure("text encoder 2 (CLIP)", "text", model, work_bytes=work)


def siglip_size(config) -> ComponentSize:
    from transformers import SiglipVisionModel

    with _empty():
        model = SiglipVisionModel(config)
    tokens = (config.image_size // config.patch_size) ** 2
    work = encoder_work_bytes(tokens, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                              config.num_attention_heads)
    return measure("image encoder (SigLIP)", "image", model, work_bytes=work)


def hunyuan_vae_size(config: dict | None = None) -> tuple[ComponentSize, VaeGeometry]:
    from diffusers import AutoencoderKLHunyuanVideo

    with _empty():
        vae = AutoencoderKLHunyuanVideo.from_config(config) if config else AutoencoderKLHunyuanVideo()
    c = vae.config
    # diffusers decodes HunyuanVideo latents framewise (use_framewise_decoding is on by default):
    # tile_sample_min_num_frames / 4 latents, plus the one it overlaps, per call
    per_call = vae.tile_sample_min_num_frames // c.temporal_compression_ratio + 1
    geometry = VaeGeometry(top_channels=c.block_out_channels[0], spatial=c.spatial_compression_ratio,
                           temporal=c.temporal_compression_ratio, causal_attention=c.mid_block_add_attention,
                           frames_per_call=per_call, tiles=(vae.tile_sample_min_height, vae.tile_sample_min_height // 2))
    return measure("VAE", "vae", vae), geometry


def small_vae_size(directory: Path) -> tuple[ComponentSize, VaeGeometry]:
    import torch

    from ..small_vae import SmallVAEConfig, SmallVideoAutoencoder

    cfg = SmallVAEConfig.from_json(json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        vae = SmallVideoAutoencoder(cfg)
    return measure("VAE", "vae", vae), VaeGeometry(top_channels=cfg.channels[0])


# ---- per model --------------------------------------------------------------------------------------


def model_sizes(model: str) -> ModelSizes:
    """Sizes of every component of a named model (offline, from the configs we know) or of a model
    directory whose parts are local (the embedded ``tiny``, or a directory with a framepack.json)."""
    from ..components import HUNYUAN, NAMED_MODELS, REDUX, resolve_model
    from ..config import preset

    source = resolve_model(model)  # one line for an unknown name
    released = {named.transformer for named in NAMED_MODELS.values()}
    if source.transformer in released and source.hunyuan == HUNYUAN and source.vae is None:
        return hunyuan_sizes(model, preset("hunyuan-13b"), with_image=source.redux == REDUX,
                             resolution=source.resolution(None), cfg=source.cfg(None))
    return local_sizes(model, source)


def hunyuan_sizes(model: str, config, with_image: bool = True, resolution: int = 640, cfg: float = 1.0) -> ModelSizes:
    """The released layout: our transformer config plus HunyuanVideo's encoders and VAE."""
    from transformers import CLIPTextConfig, LlamaConfig, SiglipVisionConfig

    transformer, geometry = transformer_size(config)
    encoders = [llama_size(LlamaConfig(**HUNYUAN_LLAMA)), clip_size(CLIPTextConfig(**CLIP_L_TEXT))]
    if with_image:
        encoders.append(siglip_size(SiglipVisionConfig(**SIGLIP_SO400M)))
    vae, vae_geometry = hunyuan_vae_size()
    return ModelSizes(model, transformer, tuple(encoders), vae, geometry, vae_geometry, resolution, cfg)


def _local(path: str | None, what: str) -> Path:
    if path is None or not Path(path).is_dir():
        raise ValueError(f"cannot size the {what} offline: {path} is not a local directory "
                         "(download the model first, or plan with framepack-i2v / framepack-f1)")
    return Path(path)


def local_sizes(model: str, source) -> ModelSizes:
    """A model whose components are local directories (configs read from them; no weights)."""
    from transformers import CLIPTextConfig, LlamaConfig, SiglipVisionConfig

    from ..config import resolve_config

    transformer, geometry = transformer_size(resolve_config(_local(source.transformer, "transformer")))
    text = _local(source.hunyuan, "text encoders")
    encoders = [llama_size(LlamaConfig.from_pretrained(text / "text_encoder")),
                clip_size(CLIPTextConfig.from_pretrained(text / "text_encoder_2"))]
    if source.redux:
        redux = _local(source.redux, "image encoder")
        encoders.append(siglip_size(SiglipVisionConfig.from_pretrained(redux / "image_encoder")))
    vae_dir = Path(source.vae) if source.vae else text / "vae"
    vae_config = json.loads((_local(str(vae_dir), "VAE") / "config.json").read_text())
    if vae_config.get("_class_name") == "SmallVideoAutoencoder":
        vae, vae_geometry = small_vae_size(vae_dir)
    else:
        vae, vae_geometry = hunyuan_vae_size(vae_config)
    return ModelSizes(model, transformer, tuple(encoders), vae, geometry, vae_geometry,
                      source.resolution(None), source.cfg(None))
