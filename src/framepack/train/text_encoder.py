"""Small text encoders in the HunyuanVideo layout, built locally (no hub): tokenizers + random models.

Used for the CPU demo model (frozen, randomly initialised encoders over the world's vocabulary:
the FramePack transformer learns to read their features) and by the tests' tiny Hugging Face
layouts. Written so that the real loading code (``transformers`` ``from_pretrained`` on the
``tokenizer``, ``text_encoder``, ``tokenizer_2`` and ``text_encoder_2`` subfolders) reads them:

- ``tokenizer`` (LLaMA 3 style): a word-level vocabulary over letter runs, single digits,
  punctuation runs and newline runs, lowercased, covering the HunyuanVideo prompt template, common
  prompt words and any extra words; ``<|begin_of_text|>`` is added in front of every sequence, the
  chat-header tokens are single special tokens. Saved as a plain ``PreTrainedTokenizerFast``.
- ``tokenizer_2`` (CLIP): a real CLIP byte-level BPE (``</w>`` word suffix, the 256 byte symbols
  with and without the suffix, merges that spell the vocabulary words), saved through
  ``transformers.CLIPTokenizer``. ``<|endoftext|>`` is the eos, the pad and the last id (as in
  CLIP), where ``CLIPTextModel`` pools.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..components import PROMPT_TEMPLATE

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# LLaMA 3 special tokens (in their LLaMA 3 order) and the pad/unknown tokens.
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

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77

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
    """Every pre-token of HunyuanVideo's prompt template."""
    text = PROMPT_TEMPLATE
    for special in LLAMA_SPECIALS:
        text = text.replace(special, " ")
    return [piece.lower() for piece, _ in _llama_pre_tokenizer().pre_tokenize_str(text)]


def _llama_vocab(extra_words: Sequence[str] = ()) -> list[str]:
    words = _template_words() + COMMON_WORDS + list(extra_words) + list(string.digits) + list(string.punctuation)
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


def _clip_vocab_and_merges(extra_words: Sequence[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's layout: 256 byte symbols, the same with ``</w>``, merged symbols in merge order, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (the last id)."""
    byte_chars = list(_bytes_to_unicode().values())
    words = dict.fromkeys(w.lower() for w in COMMON_WORDS + list(extra_words) + _template_words())
    words = [w for w in words if w.isascii() and w.isalpha()]
    merges = _learn_bpe(words)
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + [a + b for a, b in merges]
    vocab_list = list(dict.fromkeys(vocab_list)) + [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


# ---- tokenizers ---------------------------------------------------------------------------------


def build_llama_tokenizer(extra_words: Sequence[str] = ()) -> "PreTrainedTokenizerFast":
    """The LLaMA-3-style fast tokenizer of the tiny HunyuanVideo (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_llama_vocab(extra_words) + list(LLAMA_SPECIALS))}
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


def build_clip_tokenizer(extra_words: Sequence[str] = ()) -> "CLIPTokenizer":
    """The CLIP byte-level BPE tokenizer of the tiny HunyuanVideo (a ``CLIPTokenizer``)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges(extra_words)
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


# ---- writer -------------------------------------------------------------------------------------


def _set_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_text_encoders(root: Path, seed: int = 0, text_dim: int = 64, pooled_dim: int = 32,
                        extra_words: Sequence[str] = (), embedding_std: float | None = 1.0) -> Path:
    """Write ``tokenizer`` + ``text_encoder`` (LlamaModel, hidden ``text_dim``, 3 layers) and
    ``tokenizer_2`` + ``text_encoder_2`` (CLIPTextModel, hidden ``pooled_dim``) under ``root``.
    Deterministic given ``seed``.

    ``embedding_std`` redraws the LLaMA token embeddings at that scale (None keeps transformers'
    initialisation, std 0.02). The states the transformer reads are ``hidden_states[-3]``, which in
    a random 3-layer model are mostly the embeddings: at std 0.02 a caption's states are ~50x
    smaller than a real LLaMA's and two captions that differ in one word ("left" / "right") differ
    by almost nothing, so the demo transformer trained on them learned to ignore the text
    (measured: swapping the direction word did not change its loss). At std 1 each word is a
    distinct unit-scale vector."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llama_tokenizer(extra_words)
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
        llama = LlamaModel(llama_config).eval()
        if embedding_std is not None:
            torch.nn.init.normal_(llama.embed_tokens.weight, std=embedding_std)
        llama.save_pretrained(root / "text_encoder")

    tokenizer_2 = build_clip_tokenizer(extra_words)
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
    return root


# ---- training on the world's captions -------------------------------------------------------------

CAPTION_FIELDS = ("shape", "color", "background", "background_color", "motion")


def _field_values() -> dict[str, tuple[str, ...]]:
    from . import world

    return {"shape": tuple(world.SHAPES), "color": tuple(world.PALETTE), "background": tuple(world.BACKGROUNDS),
            "background_color": tuple(world.BACKGROUND_PALETTE), "motion": tuple(world.MOTIONS)}


def _caption_batch(params: list, values: dict[str, tuple[str, ...]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    from . import world

    labels = {f: torch.tensor([values[f].index(getattr(p, f)) for p in params]) for f in CAPTION_FIELDS}
    return [world.caption(p) for p in params], labels


def _read_fields(encoder, heads: torch.nn.ModuleDict, captions: list[str]) -> dict[str, torch.Tensor]:
    """Logits per (encoder, field): from the mean LLaMA state of the caption and from CLIP's pooled output."""
    states, mask, pooled = encoder.forward(captions, pad_to_max=False)
    m = mask.unsqueeze(-1).to(states.dtype)
    mean = (states * m).sum(1) / m.sum(1).clamp_min(1)
    return {name: head(mean if name.startswith("llama") else pooled) for name, head in heads.items()}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a block on one intra-op thread, restoring the caller's setting. The encoders' matrices are
    tiny: a second OpenMP thread only adds synchronisation, and with any other process busy on the
    machine the threads spin against it (measured: 30x slower per step on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_text_encoders(root: Path, steps: int = 300, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
                        eval_scenes: int = 256) -> dict[str, float]:
    """Train the demo's text encoders under ``root`` (in place) on the world's captions.

    Linear heads on the mean LLaMA state of a caption (the states the transformer reads) and on
    CLIP's pooled output (which modulates every block) learn to name every field the caption
    states: shape, colour, background kind and colour, motion. The encoders learn with them, so
    that what distinguishes two scenes is what stands out in their features. Deterministic given
    ``seed``. Writes ``training.json`` beside the encoders and returns its accuracies on the
    held-out scenes (per encoder and field)."""
    with _one_thread():
        return _train_text_encoders(Path(root), steps, batch_size, lr, seed, eval_scenes)


def _train_text_encoders(root: Path, steps: int, batch_size: int, lr: float, seed: int,
                         eval_scenes: int) -> dict[str, float]:
    from ..components import HunyuanTextEncoder
    from . import world

    values = _field_values()
    encoder = HunyuanTextEncoder.from_pretrained(root)
    with _seeded(seed):
        heads = torch.nn.ModuleDict({
            f"{which}_{f}": torch.nn.Linear(dim, len(values[f]))
            for which, dim in (("llama", encoder.llama.config.hidden_size), ("clip", encoder.clip.config.hidden_size))
            for f in CAPTION_FIELDS
        })
    modules = [encoder.llama, encoder.clip, heads]
    optimizer = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr=lr, weight_decay=0.0)
    scenes = world.stream(seed)
    for m in modules:
        m.train()
    losses = []
    for _ in range(steps):
        captions, labels = _caption_batch([next(scenes) for _ in range(batch_size)], values)
        logits = _read_fields(encoder, heads, captions)
        loss = sum(torch.nn.functional.cross_entropy(z, labels[name.split("_", 1)[1]]) for name, z in logits.items())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    for m in modules:
        m.eval()
    captions, labels = _caption_batch(world.held_out(eval_scenes), values)
    with torch.no_grad():
        logits = _read_fields(encoder, heads, captions)
    accuracy = {name: float((z.argmax(-1) == labels[name.split("_", 1)[1]]).float().mean()) for name, z in logits.items()}
    encoder.llama.save_pretrained(root / "text_encoder")
    encoder.clip.save_pretrained(root / "text_encoder_2")
    report = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None, "held_out_accuracy": accuracy}
    (root / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return accuracy
