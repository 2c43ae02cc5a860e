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
seconds on a CPU. Tokenizers are built locally with the ``tokenizers`` library:

- ``tokenizer`` (LLaMA 3 style): a word-level vocabulary over letters runs, single digits,
  punctuation runs and newline runs, lowercased, covering the HunyuanVideo prompt template and
  common prompt words; ``<|begin_of_text|>`` is added in front of every sequence by a
  ``TemplateProcessing`` post-processor, the chat-header tokens are single special tokens. Saved
  as a plain ``PreTrainedTokenizerFast`` (``tokenizer_class`` of the real LLaMA 3 tokenizers).
- ``tokenizer_2`` (CLIP): a real CLIP byte-level BPE (``</w>`` word suffix, the 256 byte symbols
  with and without the suffix, merges that spell the vocabulary words), saved through
  ``transformers.CLIPTokenizer`` so that ``CLIPTokenizer(Fast)`` and ``AutoTokenizer`` rebuild it
  the way they rebuild ``openai/clip-vit-large-patch14``. ``<|endoftext|>`` is the eos, the pad
  and the last id (as in CLIP), which ``CLIPTextModel`` pools at.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# HunyuanVideo's LLaMA prompt template (the text of framepack.components.PROMPT_TEMPLATE).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)

# LLaMA 3 special tokens (in their LLaMA 3 order) and the pad/unknown tokens of the tiny tokenizer.
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<pad>"
UNK = "<unk>"
LLAMA_SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT, PAD, UNK)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

VAE_SCALING_FACTOR = 0.476986
LATENT_CHANNELS = 16

# Common words of video prompts, on top of every word of the template.
COMMON_WORDS = """
a an the this that these those it its is are was be been being has have had do does did not no yes
and or but with without of in on at to from into onto over under above below behind between near far
by for as up down left right top bottom front back center middle side around through across along
then while when where after before slowly quickly fast slow gently suddenly smoothly very small large
big tiny huge little long short tall wide narrow high low bright dark light heavy soft hard smooth rough
red green blue yellow orange purple pink white black gray grey brown golden silver colorful
circle square triangle rectangle ball cube box line dot star shape shapes object objects
background foreground scene sky cloud clouds sun moon rain snow water sea ocean river lake beach sand
tree trees forest grass flower flowers field mountain mountains hill road street city building house room
window door wall floor table chair car bus train boat plane bird birds fish dog dogs cat cats horse cow
man woman boy girl child children person people he she they his her their him them girl's
face hand hands hair eyes head body arm arms leg legs smile smiles smiling
moves move moving moved sits sit sitting jumps jump jumping runs run running walks walk walking
flies fly flying swims swim swimming dances dance dancing turns turn turning spins spin spinning
rotates rotate rotating falls fall falling rises rise rising grows grow growing shrinks shrink
looks look looking waves wave waving opens open closes close holds hold holding plays play playing
eats eat drinks sleeps sleep stands stand standing talks talk sings sing laughs laugh cries
bounces bounce bouncing rolls roll rolling slides slide sliding floats float floating shakes shake
zoom zooms pan pans tilt tracking shot close-up view camera static handheld aerial wide-angle
cinematic realistic anime cartoon style animation video image frame frames photo painting
one two three four five six seven eight nine ten first second third last next
day night morning evening sunset sunrise summer winter spring autumn indoor outdoor
happy sad calm quiet loud warm cold wet dry new old young beautiful cute
time times once twice again together each other all some many few more most only just still also
there here what which who how can will would should may out off away toward towards inside outside
against about like same different full empty around slightly gradually continuously repeatedly
""".split()


# ---- helpers ------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _llama_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # letters runs | one digit | punctuation runs | newline runs; other whitespace is dropped.
    return pre_tokenizers.Split(
        Regex(r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\n+"), behavior="removed", invert=True
    )


def _template_words() -> list[str]:
    """Every pre-token of the template (both the spelling above and diffusers' default)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import DEFAULT_PROMPT_TEMPLATE

    pre = _llama_pre_tokenizer()
    words: list[str] = []
    for template in (PROMPT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE["template"]):
        text = template
        for special in LLAMA_SPECIALS:
            text = text.replace(special, " ")
        words += [piece.lower() for piece, _ in pre.pre_tokenize_str(text)]
    return words


def _llama_vocab() -> list[str]:
    words = _template_words() + COMMON_WORDS + list(string.digits) + list(string.punctuation)
    words += ["{}", "\n", "\n\n", "'s", "-", ".,", "...", ":", ")."]
    pre = _llama_pre_tokenizer()
    pieces: list[str] = []
    for word in words:  # hyphenated/contracted words are split the way the pre-tokenizer splits them
        pieces += [p for p, _ in pre.pre_tokenize_str(word)] if "\n" not in word else [word]
    return list(dict.fromkeys(p.lower() for p in pieces))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map, in byte order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(sorted(zip(bs, (chr(c) for c in cs))))


def _learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` (each once) until every word is one symbol, ties broken by the pair.

    Done here rather than with ``tokenizers.trainers.BpeTrainer``, whose merge order among equally
    frequent pairs changes from run to run.
    """
    active = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while active:
        counts = Counter(pair for seq in active for pair in zip(seq, seq[1:]))
        (a, b), _ = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        merged = []
        for seq in active:
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            if len(out) > 1:
                merged.append(tuple(out))
        active = merged
    return merges


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: 256 byte symbols, the same with ``</w>``, merged symbols in merge order, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the last id)."""
    byte_chars = list(_bytes_to_unicode().values())
    words = dict.fromkeys(w.lower() for w in COMMON_WORDS + _template_words())
    words = [w for w in words if w.isascii() and w.isalpha()]
    merges = _learn_bpe(words)
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


# ---- tokenizers ---------------------------------------------------------------------------------


def build_llama_tokenizer() -> "PreTrainedTokenizerFast":
    """The LLaMA-3-style fast tokenizer of the tiny HunyuanVideo (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_llama_vocab() + list(LLAMA_SPECIALS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = _llama_pre_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )


def build_clip_tokenizer() -> "CLIPTokenizer":
    """The CLIP byte-level BPE tokenizer of the tiny HunyuanVideo (a ``CLIPTokenizer``)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def crop_start(tokenizer: "PreTrainedTokenizerBase", template: str = PROMPT_TEMPLATE) -> int:
    """Tokens before the user prompt in ``template``: ``<|begin_of_text|>`` + the template up to ``{}``.

    diffusers' HunyuanVideo pipelines cut this many leading positions off the LLaMA states; the
    count includes the BOS token because the tokenizer adds it in front of the full text too.
    """
    return len(tokenizer(template.split("{}")[0])["input_ids"])


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
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    tokenizer = build_llama_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    _set_json(root / "tokenizer" / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast")
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _seeded(seed):
        LlamaModel(llama_config).eval().save_pretrained(root / "text_encoder")

    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.save_pretrained(root / "tokenizer_2")
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer_2),
        hidden_size=pooled_dim,
        intermediate_size=2 * pooled_dim,
        projection_dim=pooled_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        # eos != 2 makes CLIPTextModel pool at the first eos (not at the argmax id, the legacy rule)
        bos_token_id=tokenizer_2.bos_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id,
    )
    with _seeded(seed + 1):
        CLIPTextModel(clip_config).eval().save_pretrained(root / "text_encoder_2")

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


def _set_json(path: Path, **changes: object) -> None:
    """Rewrite keys of a JSON file that ``save_pretrained`` wrote."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
