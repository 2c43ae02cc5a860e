"""The tiny hub of tests/tiny_hub.py: every component loads through the real transformers/diffusers
classes in the real layouts, and diffusers' own HunyuanVideoFramepackPipeline runs on them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoFramepackPipeline,
    HunyuanVideoFramepackTransformer3DModel,
)
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPTextModel,
    CLIPTokenizerFast,
    LlamaModel,
    SiglipImageProcessor,
    SiglipVisionModel,
)

import tiny_hub  # noqa: E402
from framepack import FramePackTransformer, preset  # noqa: E402
from tiny_hub import PROMPT_TEMPLATE, crop_start, write_all  # noqa: E402

TEXT_DIM, POOLED_DIM, IMAGE_DIM = 64, 32, 32
PROMPT = "a red circle moves to the right"


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("tiny_hub"))


@pytest.fixture(scope="module")
def llama_tokenizer(hub):
    return AutoTokenizer.from_pretrained(hub["hunyuan"] / "tokenizer")


@pytest.fixture(scope="module")
def clip_tokenizer(hub):
    return CLIPTokenizerFast.from_pretrained(hub["hunyuan"] / "tokenizer_2")


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---- layouts --------------------------------------------------------------------------------------


def test_layouts(hub):
    h, r, f = hub["hunyuan"], hub["redux"], hub["framepack"]
    assert set(hub) == {"hunyuan", "redux", "framepack"}
    for path in [
        h / "model_index.json",
        h / "scheduler" / "scheduler_config.json",
        h / "tokenizer" / "tokenizer.json",
        h / "tokenizer" / "tokenizer_config.json",
        h / "text_encoder" / "config.json",
        h / "text_encoder" / "model.safetensors",
        h / "tokenizer_2" / "tokenizer.json",
        h / "text_encoder_2" / "model.safetensors",
        h / "vae" / "config.json",
        h / "vae" / "diffusion_pytorch_model.safetensors",
        r / "image_encoder" / "model.safetensors",
        r / "feature_extractor" / "preprocessor_config.json",
        f / "config.json",
        f / "diffusion_pytorch_model.safetensors",
    ]:
        assert path.is_file(), path


def test_deterministic_given_seed(hub, tmp_path):
    again = write_all(tmp_path / "again", seed=0)
    for name in hub:
        assert _digest(again[name]) == _digest(hub[name]), name
    other = tiny_hub.write_framepack(tmp_path / "other", seed=1)
    assert _digest(other)["diffusion_pytorch_model.safetensors"] != _digest(hub["framepack"])[
        "diffusion_pytorch_model.safetensors"
    ]


# ---- LLaMA tokenizer + text encoder -----------------------------------------------------------------


def test_llama_tokenizer_keeps_template_special_tokens(llama_tokenizer):
    tok = llama_tokenizer
    ids = tok(PROMPT_TEMPLATE.format(PROMPT))["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|begin_of_text|>" and ids[0] == tok.bos_token_id  # BOS from the post-processor
    assert tokens[1:4] == ["<|start_header_id|>", "system", "<|end_header_id|>"]
    assert tokens[-1] == "<|eot_id|>"
    assert tokens.count("<|start_header_id|>") == 2 and tokens.count("<|eot_id|>") == 2
    assert tok.unk_token_id not in ids  # the template and the prompt are in the vocabulary
    for text in ("a cat sits on a chair, then jumps 3 times.", "A dog runs to the left; camera pans slowly."):
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_llama_crop_start_is_the_template_prefix(llama_tokenizer):
    tok = llama_tokenizer
    n = crop_start(tok)
    assert n == 94  # with the tokens of the tiny vocabulary; 95 for the real LLaMA 3 tokenizer
    full = tok(PROMPT_TEMPLATE.format(PROMPT))["input_ids"]
    prompt = tok(PROMPT, add_special_tokens=False)["input_ids"]
    # cutting n positions leaves exactly the prompt and the closing <|eot_id|>
    assert full[n:] == prompt + [tok.convert_tokens_to_ids("<|eot_id|>")]


def test_llama_padding_max_length(llama_tokenizer):
    tok = llama_tokenizer
    batch = tok([PROMPT_TEMPLATE.format(PROMPT), PROMPT_TEMPLATE.format("a cat")], max_length=128,
                padding="max_length", truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 128) == batch.attention_mask.shape
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, n:].eq(tok.pad_token_id).all() and batch.attention_mask[0, :n].all()
    assert int(batch.attention_mask[1].sum()) == n - 5  # "red circle moves to the right" vs "cat"


def test_llama_text_encoder(hub, llama_tokenizer):
    model = LlamaModel.from_pretrained(hub["hunyuan"] / "text_encoder").eval()
    assert model.config.hidden_size == TEXT_DIM and model.config.num_hidden_layers == 3
    assert model.config.vocab_size == len(llama_tokenizer)
    batch = llama_tokenizer([PROMPT_TEMPLATE.format(PROMPT)], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    assert out.hidden_states[-3].shape == (1, batch.input_ids.shape[1], TEXT_DIM)


# ---- CLIP tokenizer + text encoder ------------------------------------------------------------------


def test_clip_tokenizer(hub, clip_tokenizer):
    tok = clip_tokenizer
    auto = AutoTokenizer.from_pretrained(hub["hunyuan"] / "tokenizer_2")
    assert type(auto).__name__.startswith("CLIPTokenizer")
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == len(tok) - 1  # the last id, as in CLIP
    batch = tok([PROMPT, "A cat sits."], padding="max_length", max_length=77, truncation=True)
    assert batch.input_ids == auto([PROMPT, "A cat sits."], padding="max_length", max_length=77)["input_ids"]
    ids = batch.input_ids[0]
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(ids[1:8]) == ["a</w>", "red</w>", "circle</w>", "moves</w>", "to</w>",
                                                   "the</w>", "right</w>"]
    assert ids[8:] == [tok.eos_token_id] * (77 - 8)


def test_clip_text_encoder_pools_at_eos(hub, clip_tokenizer):
    model = CLIPTextModel.from_pretrained(hub["hunyuan"] / "text_encoder_2").eval()
    cfg = model.config
    assert cfg.hidden_size == POOLED_DIM and cfg.max_position_embeddings == 77
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id)
    batch = clip_tokenizer([PROMPT, "a cat"], padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(batch.input_ids)
    assert out.pooler_output.shape == (2, POOLED_DIM)
    first_eos = (batch.input_ids == cfg.eos_token_id).int().argmax(-1)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[torch.arange(2), first_eos])


# ---- VAE ---------------------------------------------------------------------------------------------


def test_vae_geometry(hub):
    vae = AutoencoderKLHunyuanVideo.from_pretrained(hub["hunyuan"] / "vae").eval()
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor == pytest.approx(0.476986)
    assert vae.spatial_compression_ratio == 8 and vae.temporal_compression_ratio == 4
    video = torch.rand(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        assert latents.shape == (1, 16, 2, 8, 8)
        decoded = vae.decode(latents).sample
    assert decoded.shape == (1, 3, 5, 64, 64)
    assert torch.isfinite(decoded).all()


# ---- SigLIP (flux redux) ---------------------------------------------------------------------------


def test_siglip_image_encoder(hub):
    processor = SiglipImageProcessor.from_pretrained(hub["redux"] / "feature_extractor")
    model = SiglipVisionModel.from_pretrained(hub["redux"] / "image_encoder").eval()
    assert model.config.hidden_size == IMAGE_DIM
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 32, 32)
    assert inputs.pixel_values.min() >= -1 and inputs.pixel_values.max() <= 1  # mean = std = 0.5
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (1, 16, IMAGE_DIM)


# ---- FramePack transformer ---------------------------------------------------------------------------


def test_framepack_transformer_loads_in_both(hub):
    ours = FramePackTransformer.from_pretrained(hub["framepack"])
    assert ours.config == preset("tiny")
    theirs = HunyuanVideoFramepackTransformer3DModel.from_pretrained(hub["framepack"])
    theirs_sd = theirs.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs_sd[name]), name
    assert ours.config.text_embed_dim == TEXT_DIM
    assert ours.config.pooled_projection_dim == POOLED_DIM
    assert ours.config.image_proj_dim == IMAGE_DIM


# ---- diffusers' FramePack pipeline on the tiny hub ---------------------------------------------------


@pytest.fixture(scope="module")
def pipe(hub, llama_tokenizer, clip_tokenizer):
    h, r = hub["hunyuan"], hub["redux"]
    pipe = HunyuanVideoFramepackPipeline(
        text_encoder=LlamaModel.from_pretrained(h / "text_encoder"),
        tokenizer=llama_tokenizer,
        transformer=HunyuanVideoFramepackTransformer3DModel.from_pretrained(hub["framepack"]),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(h / "vae"),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=CLIPTextModel.from_pretrained(h / "text_encoder_2"),
        tokenizer_2=clip_tokenizer,
        image_encoder=SiglipVisionModel.from_pretrained(r / "image_encoder"),
        feature_extractor=SiglipImageProcessor.from_pretrained(r / "feature_extractor"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, output_type: str):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    # crop_start: the LLaMA states of the template's own tokens are cut off. It counts the tokens the
    # tokenizer produces for the template text before "{}" *including* the <|begin_of_text|> that the
    # post-processor puts in front, since the full "template.format(prompt)" text is tokenized with it too.
    template = {"template": PROMPT_TEMPLATE, "crop_start": crop_start(pipe.tokenizer)}
    return pipe(
        image=image,
        prompt=PROMPT,
        height=64,
        width=64,
        num_frames=33,  # (latent_window_size 9 - 1) * 4 + 1: one section
        num_inference_steps=2,
        guidance_scale=10.0,
        sampling_type="inverted_anti_drifting",
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
        prompt_template=template,
    ).frames


def test_pipeline_latents(pipe):
    frames = _run(pipe, "latent")
    # a list with one entry per section: the history so far, [start image latent | 9 new latents]
    assert isinstance(frames, list) and len(frames) == 1
    assert frames[0].shape == (1, 16, 10, 8, 8)
    assert torch.isfinite(frames[0]).all()


def test_pipeline_video(pipe):
    video = _run(pipe, "np")
    # 10 latent frames decode to (10 - 1) * 4 + 1 = 37 frames
    assert video.shape == (1, 37, 64, 64, 3)
    assert np.isfinite(video).all() and video.min() >= 0 and video.max() <= 1


def test_pipeline_prompt_embeddings(pipe, llama_tokenizer):
    n = crop_start(llama_tokenizer)
    embeds, pooled, mask = pipe.encode_prompt(
        PROMPT, prompt_template={"template": PROMPT_TEMPLATE, "crop_start": n}, max_sequence_length=256
    )
    assert embeds.shape == (1, 256, TEXT_DIM) and mask.shape == (1, 256) and pooled.shape == (1, POOLED_DIM)
    assert int(mask.sum()) == len(llama_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]) + 1  # + eot
    # diffusers' own fallback (template tokens - 2, for "{}" and <|eot_id|>) finds the same crop
    fallback, _, _ = pipe.encode_prompt(PROMPT, prompt_template={"template": PROMPT_TEMPLATE})
    torch.testing.assert_close(fallback, embeds)


def test_pipeline_from_pretrained_model_index(hub, pipe):
    loaded = HunyuanVideoFramepackPipeline.from_pretrained(
        hub["hunyuan"],
        transformer=pipe.transformer,
        image_encoder=pipe.image_encoder,
        feature_extractor=pipe.feature_extractor,
    )
    text = PROMPT_TEMPLATE.format(PROMPT)
    assert loaded.tokenizer(text)["input_ids"] == pipe.tokenizer(text)["input_ids"]
    assert loaded.tokenizer_2(PROMPT)["input_ids"] == pipe.tokenizer_2(PROMPT)["input_ids"]
    assert isinstance(loaded.scheduler, FlowMatchEulerDiscreteScheduler)
    for name in ("text_encoder", "text_encoder_2", "vae"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name
