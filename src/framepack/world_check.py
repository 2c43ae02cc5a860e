"""Is a job inside the world its model knows? Warnings for prompts and start images (issue 18.5).

A model trained on a closed world (the demo model: one bright shape on a dark plain, gradient or
striped background, captions in a few dozen words) ships a description of that world in its
manifest (``framepack.json``, key ``"world"``; see :func:`framepack.train.package.world_description`).
Asked for something outside it, such a model does not fail: it quietly turns the start image into
its own stripes and shapes and reads an unknown word as noise. These checks say so beforehand, one
line per problem. A model without a world description (the 13B ones) never gets a note.

- Words: the prompt is split by the model's own LLaMA-side tokenizer (its normaliser and
  pre-tokeniser, from the tokenizer file it ships), and a piece is unknown iff its token id is not
  the id of a word the world's captions use: the ``<unk>`` id (the word-level tokenizer cannot
  spell it) or a word the tokenizer has but no caption ever had (its embedding was never trained).
  The CLIP-side tokenizer spells any word from bytes, so it cannot tell.
- Start image: the shares of its pixels, at the model's resolution, that are one of the world's
  background shades and that are no colour of the world at all. Thresholds below were chosen from
  the world's own frames (docs/demo-model.md gives the measurement).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COLOUR_TOLERANCE = 30.0  # RGB distance at which a pixel counts as a world colour (JPEG and resizing stay within it)
# Measured on the 200 held-out start frames of tests/test_world_check.py (150 of the second world's
# validation and test splits, 50 of the first's): background share >= 0.919 and share of no world
# colour <= 0.0081 (0.917 and 0.0089 after a 512 px JPEG round trip); random, photo-like and
# drawn-on-white images: background share <= 0.185.
MIN_BACKGROUND_SHARE = 0.6  # an object of the largest size the world draws (radius 0.3) covers < 0.3
MAX_FOREIGN_SHARE = 0.05  # anti-aliased edges are ~1% of a world frame


@dataclass(frozen=True)
class World:
    """What a model knows: its captions' words and its colours (RGB, 0-255)."""

    vocabulary: tuple[str, ...]
    backgrounds: tuple[tuple[float, float, float], ...]  # base colours; drawn at shades in shade_range
    shade_range: tuple[float, float]
    objects: tuple[tuple[float, float, float], ...]

    @classmethod
    def from_manifest(cls, data: Any, where: str = "the model's manifest") -> World:
        """The ``"world"`` entry of a manifest; a malformed one is a one-line ValueError."""
        try:
            world = cls(vocabulary=tuple(str(w) for w in data["vocabulary"]),
                        backgrounds=tuple(_rgb(c) for c in data["backgrounds"]),
                        shade_range=(float(data["shade_range"][0]), float(data["shade_range"][1])),
                        objects=tuple(_rgb(c) for c in data["objects"]))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{where}: its \"world\" entry is malformed ({type(exc).__name__}: {exc})") from None
        if not world.vocabulary or not world.backgrounds:
            raise ValueError(f"{where}: its \"world\" entry names no words or no background colours")
        return world


def _rgb(value: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in value)
    return r, g, b


# ---- words -----------------------------------------------------------------------------------------------------


def unknown_words(tokenizer_file: Path, vocabulary: Sequence[str], texts: Iterable[str]) -> list[str]:
    """The pieces of ``texts`` (as written, first occurrence order, once each) whose token is not a
    vocabulary word's token under the tokenizer in ``tokenizer_file`` (a ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    known = {i for word in vocabulary for i in tokenizer.encode(word, add_special_tokens=False).ids}
    found: dict[str, None] = {}
    for text in texts:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id not in known:
                found.setdefault(text[start:end], None)
    return list(found)


# ---- colours ---------------------------------------------------------------------------------------------------


def colour_shares(image: np.ndarray, world: World, tolerance: float = COLOUR_TOLERANCE) -> tuple[float, float]:
    """(background share, foreign share) of an (H, W, 3) uint8 image: the fraction of pixels within
    ``tolerance`` of a background shade, and the fraction within it of no world colour at all."""
    pixels = image.reshape(-1, 3).astype(np.float32)  # (N, 3)
    norms = (pixels * pixels).sum(1, keepdims=True)  # (N, 1)
    limit = tolerance * tolerance
    # squared distances through dot products (no (N, B, 3) tensor: this runs on every submission)
    bases = np.asarray(world.backgrounds, dtype=np.float32)  # (B, 3)
    low, high = world.shade_range
    dots = pixels @ bases.T  # (N, B)
    lengths = (bases * bases).sum(1)  # (B,)
    shade = np.clip(dots / lengths, low, high)  # the nearest shade s * base: a clamped projection on that segment
    background = (norms - 2 * shade * dots + shade * shade * lengths).min(1) <= limit
    objects = np.asarray(world.objects, dtype=np.float32).reshape(-1, 3)  # (O, 3)
    obj = (norms - 2 * pixels @ objects.T + (objects * objects).sum(1)).min(1, initial=np.inf) <= limit
    return float(background.mean()), float((~background & ~obj).mean())


def image_problem(image: np.ndarray, world: World) -> str | None:
    """Why a start image (as the model will see it) is far from the world, or None."""
    background, foreign = colour_shares(image, world)
    if background >= MIN_BACKGROUND_SHARE and foreign <= MAX_FOREIGN_SHARE:
        return None
    return (f"only {background:.0%} of it is the world's dark background colours and {foreign:.0%} is colours "
            "the world never shows (its frames are one bright shape on a dark plain, gradient or striped "
            "background): expect the model to turn it into its own stripes and shapes within a second")


# ---- a job -----------------------------------------------------------------------------------------------------


def model_world(source: Any) -> World | None:
    """The world a resolved model (``components.ModelSource``) describes, or None (no description)."""
    data = source.extra.get("world")
    return None if data is None else World.from_manifest(data)


def prompt_texts(settings: Any) -> list[str]:
    """The texts a job's text encoder reads: the timeline's segments, or its section prompts."""
    from .planning import parse_timeline

    if settings.section_prompts:
        return list(settings.section_prompts)
    return [segment.text for segment in parse_timeline(settings.prompt)]


def world_notes(jobs: Sequence[Any]) -> list[str]:
    """One line per way the jobs (``GenerationSettings``) leave their model's world, each said once
    for a whole batch; [] for models without a world description."""
    from .components import resolve_model

    notes: list[str] = []
    for model in dict.fromkeys(settings.model for settings in jobs):
        source = resolve_model(model)
        world = model_world(source)
        if world is not None:
            notes += _notes(world, source, [settings for settings in jobs if settings.model == model])
    return notes


def _notes(world: World, source: Any, jobs: Sequence[Any]) -> list[str]:
    from .images import load_image, prepare_image

    notes = []
    tokenizer = Path(source.hunyuan) / "tokenizer" / "tokenizer.json"
    if not tokenizer.is_file():
        raise ValueError(f"the model describes its world's words but ships no LLaMA tokenizer ({tokenizer.name})")
    words = unknown_words(tokenizer, world.vocabulary, [text for settings in jobs for text in prompt_texts(settings)])
    if words:
        shown = ", ".join(repr(w) for w in words)
        notes.append(f"the prompt has words the model never learned: {shown}; it knows only the "
                     f"{len(world.vocabulary)} words of its world's captions (docs/demo-model.md) and reads others "
                     "as noise, not as what they mean")
    images = dict.fromkeys((label, path, source.resolution(settings.resolution)) for settings in jobs
                           for label, path in (("start image", settings.image), ("end image", settings.end_image),
                                               *(("keyframe image", k.image) for k in settings.keyframes))
                           if path)
    for label, path, resolution in images:
        problem = image_problem(prepare_image(load_image(path), resolution), world)
        if problem:
            notes.append(f"the {label} is far from the model's world: {problem}")
    return list(dict.fromkeys(notes))
