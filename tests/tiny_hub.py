"""Tiny random models written to disk in the Hugging Face layouts of the real FramePack components.

The real loading code (``transformers`` / ``diffusers`` ``from_pretrained`` on subfolders, our own
``FramePackTransformer.from_pretrained``) can then be tested end to end without any hub access:

- :func:`write_hunyuan_video`: ``hunyuanvideo-community/HunyuanVideo`` (``tokenizer``, ``text_encoder``,
  ``tokenizer_2``, ``text_encoder_2``, ``vae``, ``scheduler``, ``model_index.json``);
- :func:`write_flux_redux`: ``lllyasviel/flux_redux_bfl`` (``image_encoder``, ``feature_extractor``);
- :func:`write_framepack`: ``lllyasviel/FramePackI2V_HY`` (the transformer);
- :func:`write_all`: the three side by side.

Every model is a few thousand to a few hundred thousand parameters with random weights; the
output of each writer is a deterministic function of ``seed``. Building everything takes a few
seconds on a CPU. Tokenizers and text encoders come from ``framepack.train.text_encoder`` (built
locally with the ``tokenizers`` library; see its docstring).
"""

from __future__ import annotations

import json
from pathlib import Path
from framepack.components import PROMPT_TEMPLATE
from framepack.train.text_encoder import (  # noqa: F401  (re-exported for the tests)
    BOS,
    CLIP_BOS,
    CLIP_EOS,
    CLIP_MAX_LENGTH,
    END_HEADER,
    EOT,
    LLAMA_SPECIALS,
    PAD,
    START_HEADER,
    UNK,
    _seeded,
    _set_json,
    build_clip_tokenizer,
    build_llama_tokenizer,
    crop_start,
    write_text_encoders,
)

VAE_SCALING_FACTOR = 0.476986
LATENT_CHANNELS = 16

# Common words of video prompts, on top of every word of the template.
# ---- writers ------------------------------------------------------------------------------------


def write_hunyuan_video(root: Path, seed: int = 0, text_dim: int = 64, pooled_dim: int = 32) -> Path:
    """Write a tiny ``hunyuanvideo-community/HunyuanVideo`` under ``root`` and return ``root``.

    Subfolders: ``tokenizer`` + ``text_encoder`` (LlamaModel, hidden ``text_dim``, 3 layers),
    ``tokenizer_2`` + ``text_encoder_2`` (CLIPTextModel, hidden ``pooled_dim``, 77 positions),
    ``vae`` (AutoencoderKLHunyuanVideo: 16 latent channels, 8x spatial, 4x causal temporal
    compression, 8 channels wide), ``scheduler`` (FlowMatchEulerDiscreteScheduler, shift 7 as on
    the hub) and ``model_index.json`` (see :func:`_write_model_index`).
    """
    from diffusers import AutoencoderKLHunyuanVideo
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    write_text_encoders(root, seed, text_dim, pooled_dim)

    with _seeded(seed + 2):
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=LATENT_CHANNELS,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=VAE_SCALING_FACTOR,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    vae.eval().save_pretrained(root / "vae")

    _write_model_index(root)
    return root


def _write_model_index(root: Path) -> None:
    """model_index.json as the hub repo has it, less the components this tiny copy lacks.

    The transformer is not written here (FramePack brings its own; pass ``transformer=``), so it is
    recorded as ``[null, null]``. The LLaMA tokenizer is recorded under the class that rebuilds it
    from ``tokenizer.json`` unchanged (``PreTrainedTokenizerFast``, as its ``tokenizer_config.json``
    says); the hub repo names ``LlamaTokenizerFast``, which in transformers >= 5 rebuilds a
    SentencePiece-style LLaMA 1/2 tokenizer from the vocabulary and does not fit a word-level model.
    """
    import diffusers

    index = {
        "_class_name": "HunyuanVideoPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LlamaModel"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": [None, None],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    scheduler_dir = root / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(shift=7.0).save_pretrained(scheduler_dir)


def write_flux_redux(root: Path, seed: int = 0, image_dim: int = 32) -> Path:
    """Write a tiny ``lllyasviel/flux_redux_bfl`` under ``root`` and return ``root``.

    ``image_encoder``: SiglipVisionModel (hidden ``image_dim``, 32x32 input, 8x8 patches -> 16
    tokens, 2 layers, 2 heads); ``feature_extractor``: SiglipImageProcessor resizing to 32x32 and
    normalizing with mean = std = 0.5.
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.image_utils import PILImageResampling
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = SiglipVisionConfig(
        hidden_size=image_dim,
        intermediate_size=2 * image_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    with _seeded(seed + 3):
        SiglipVisionModel(config).eval().save_pretrained(root / "image_encoder")
    processor = SiglipImageProcessorPil(
        do_resize=True,
        size={"height": 32, "width": 32},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor.save_pretrained(root / "feature_extractor")
    # the hub's class name, which every transformers version maps to its SigLIP image processor
    _set_json(
        root / "feature_extractor" / "preprocessor_config.json", image_processor_type="SiglipImageProcessor"
    )
    return root


def write_framepack(root: Path, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a random ``framepack.FramePackTransformer(preset)`` in the ``lllyasviel/FramePackI2V_HY``
    layout (config.json + safetensors) under ``root`` and return ``root``."""
    from framepack import FramePackTransformer

    root = Path(root)
    with _seeded(seed + 4):
        model = FramePackTransformer(preset)
    model.eval().save_pretrained(root)
    return root


def write_all(root: Path, seed: int = 0) -> dict[str, Path]:
    """All three tiny repos under ``root``: ``{"hunyuan": ..., "redux": ..., "framepack": ...}``."""
    from framepack import preset as framepack_preset

    cfg = framepack_preset("tiny")
    root = Path(root)
    return {
        "hunyuan": write_hunyuan_video(
            root / "HunyuanVideo", seed, text_dim=cfg.text_embed_dim, pooled_dim=cfg.pooled_projection_dim
        ),
        "redux": write_flux_redux(root / "flux_redux_bfl", seed, image_dim=cfg.image_proj_dim),
        "framepack": write_framepack(root / "FramePackI2V_HY", seed, preset="tiny"),
    }


__all__ = [
    "PROMPT_TEMPLATE",
    "build_clip_tokenizer",
    "build_llama_tokenizer",
    "crop_start",
    "write_all",
    "write_flux_redux",
    "write_framepack",
    "write_hunyuan_video",
]


def write_model_dir(root: Path, seed: int = 0, **manifest: object) -> tuple[Path, dict[str, Path]]:
    """The three tiny repos under ``root`` behind one ``framepack.json`` (a model directory that
    ``--model`` takes); ``manifest`` adds entries such as ``mode`` or ``resolution``."""
    import json

    paths = write_all(root, seed)
    entries = {"transformer": paths["framepack"].name, "hunyuan": paths["hunyuan"].name,
               "redux": paths["redux"].name, **manifest}
    (Path(root) / "framepack.json").write_text(json.dumps(entries))
    return Path(root), paths
