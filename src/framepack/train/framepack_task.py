"""Training task "framepack": the packed transformer on the synthetic world, FramePack's objective.

Each sample: a world clip of ``sections`` sections, encoded by the (frozen) small VAE; a mode and
a section drawn at random; the section's packed context built from the clip's own latents in
exactly the layout the planner gives at inference (zeros where the planner has nothing yet, the
start latent as anchor); flow matching on the section's window: ``x = (1 - s) x0 + s noise``,
target velocity ``noise - x0``, sigma drawn from the shifted schedule's distribution. All samples
of a batch share a mode (so the context shapes match) but not their frame indices or captions:
the transformer's per-sample indices and text masks make that one batched forward.

Options that the demo fine-tune uses: ``vary_sections`` plans each sample as a video of 1..N
sections (so short videos' layouts are trained too), ``text_dropout`` trains the empty prompt that
real CFG guides against, ``text_train_steps`` trains freshly built text encoders on the captions
first, ``init`` starts from exported transformer weights, ``object_weight`` weights the loss where
the object is (see :func:`object_cells`; ``object_region`` says which frames' object),
``motion_weights`` draws clips of some motions more often (see :func:`motion_probabilities`), and
``mirror`` adds every clip's left-right reflection (see :func:`framepack.train.world.mirror`), and
``world_start`` picks the world's start-position sampler (:data:`framepack.train.world.STARTS`):
"by-motion", the first world and the default (the shipped model's configs draw the same clips as
before), "independent", the world whose start frame does not give the motion away, or
"determined", its start frames with every motion at one speed and heading, so that the start frame
and the caption determine the clip (no ``mirror``: its bounces head one way only). Training
only ever sees that world's ``train`` split (:func:`framepack.train.world.split_of`), mirrors
included.

With ``clips`` set, a fixed set of clips is encoded once into a latent cache file (``cache``; a
larger ``clips`` later encodes only the new ones, as the set is a prefix of one stream) and
batches draw from it: on a CPU, encoding a clip costs as much as a training step, and each clip
serves every (mode, section, noise) combination.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..components import HunyuanTextEncoder, TextEmbedding, stack_embeddings
from ..config import resolve_config
from ..model import FramePackTransformer, HistoryInput
from ..planning import MODES, START, SectionPlan, frame_count, latent_count, plan_sections
from ..sampling import TIMESTEP_SCALE, shift_sigmas
from ..small_vae import SmallVideoAutoencoder
from ..trainer import register
from ..video import to_pixels
from . import world

log = logging.getLogger(__name__)

@dataclass
class Batch:
    target: torch.Tensor  # (B, C, window, h, w) clean latents of the section
    window: torch.Tensor  # (B, window) RoPE indices
    history: list[HistoryInput]  # per level: (B, C, T, h, w) latents and (B, T) indices
    text: torch.Tensor  # (B, L, text_dim)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, pooled_dim)
    weight: torch.Tensor | None = None  # (B, 1, window, h, w) loss weight per latent cell; None: uniform


def object_cells(coverage: np.ndarray, spatial: int = 8, temporal: int = 4, grow: int = 1) -> torch.Tensor:
    """The latent cells the object touches: (T_latent, h, w) bool from pixel coverage (1 + 4n, H, W).

    Latent 0 holds frame 0 alone and latent k frames 4k-3..4k (the causal VAE's grouping); a cell
    counts if the object covers any of its pixels in any of its frames, and the set is grown by
    ``grow`` cells so that the background an object is about to cover, or just uncovered, counts."""
    x = torch.from_numpy(np.ascontiguousarray(coverage, dtype=np.float32) > 0).float()[None, None]
    x = torch.cat([x[:, :, :1].expand(-1, -1, temporal - 1, -1, -1), x], dim=2)  # frame 0 fills its own group
    cells = F.max_pool3d(x, (temporal, spatial, spatial))
    if grow:
        cells = F.max_pool3d(cells, (1, 2 * grow + 1, 2 * grow + 1), stride=1, padding=(0, grow, grow))
    return cells[0, 0] > 0


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error with a per-cell weight broadcast over channels, normalised by the weight's
    mean so that the loss keeps the scale of the plain mean (which it equals for a uniform weight)."""
    error = (prediction.float() - target.float()).pow(2)
    if weight is None:
        return error.mean()
    weight = weight.expand_as(error)
    return (error * weight).sum() / weight.sum()


def noised(x0: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flow-matching training triple for clean latents ``x0`` (B, C, T, h, w): the noisy latents
    at a sigma drawn from the shifted schedule's distribution, the sigmas (B,), and the velocity target.

    Drawn on the CPU from torch's global generator (which the trainer seeds per micro-batch), so the
    draws are the same on any device; the results are on ``x0``'s device.
    """
    b = x0.shape[0]
    sigma = shift_sigmas(torch.rand(b), math.log(shift)).to(x0.device)
    noise = torch.randn(x0.shape, dtype=x0.dtype).to(x0.device)
    s = sigma.view(b, 1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, sigma, noise - x0


def stack_history(plan: SectionPlan, contexts: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> list[HistoryInput]:
    """One batched HistoryInput per context level from each sample's :func:`context_latents` (one layout)."""
    return [HistoryInput(level.kernel, torch.cat([c[i][0] for c in contexts]), torch.stack([c[i][1] for c in contexts]))
            for i, level in enumerate(plan.levels)]


def motion_probabilities(motions: list[str], weights: dict[str, float]) -> np.ndarray:
    """Draw probability of each clip, proportional to its motion's weight (1 for motions not named)."""
    unknown = sorted(set(weights) - set(world.MOTIONS))
    if unknown:
        raise ValueError(f"motion_weights names unknown motions {unknown}; expected some of {world.MOTIONS}")
    if not all(w >= 0 and math.isfinite(w) for w in weights.values()):
        raise ValueError(f"motion_weights must be finite numbers >= 0, got {weights}")
    w = np.array([float(weights.get(m, 1.0)) for m in motions])
    if not w.sum() > 0:
        raise ValueError("motion_weights leave no clip to draw")
    return w / w.sum()


def training_mirror(p: world.WorldParams, start: str = "by-motion") -> world.WorldParams | None:
    """``p``'s mirror if it is a training scene of the world of sampler ``start``: None for
    rotations (no mirror) and for a mirror in a held-out split (validation or test), which training
    must never see. (For "by-motion", not ``train`` is exactly :func:`world.is_held_out`.)"""
    m = world.mirror(p)
    return None if m is None or world.split_of(m, start) != "train" else m


def context_latents(plan: SectionPlan, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(latents, indices) per level for one clip's latents (1, C, L, h, w), as the planner lays it out."""

    def get(source) -> torch.Tensor:
        if source is None:
            return torch.zeros_like(latents[:, :, :1])
        position = 0 if source == START else source
        return latents[:, :, position : position + 1]

    return [(torch.cat([get(s) for s in level.sources], dim=2), torch.tensor(level.indices)) for level in plan.levels]


def world_vocabulary(samples: int = 5000) -> list[str]:
    """Every word the world's captions use (deterministic)."""
    rng = np.random.default_rng(0)
    return sorted({w for _ in range(samples) for w in world.caption(world.sample_params(rng)).split()})


class FramePackTask:
    def __init__(self, args: dict) -> None:
        self.vae = SmallVideoAutoencoder.from_pretrained(args["vae"]).requires_grad_(False)
        text_dir = Path(args["text"])
        if not (text_dir / "text_encoder").exists():
            # the demo's frozen text encoders are built once, over the world's vocabulary
            from .text_encoder import train_text_encoders, write_text_encoders

            std = args.get("text_embedding_std", 1.0)
            write_text_encoders(text_dir, seed=0, text_dim=int(args.get("text_dim", 64)),
                                pooled_dim=int(args.get("pooled_dim", 32)), extra_words=world_vocabulary(),
                                embedding_std=None if std is None else float(std))
            if int(args.get("text_train_steps", 0)):  # then trained on the captions, before the transformer
                accuracy = train_text_encoders(text_dir, steps=int(args["text_train_steps"]))
                log.info("text encoders trained on captions: held-out accuracy %s", accuracy)
        self.text = HunyuanTextEncoder.from_pretrained(text_dir)
        self.sections = int(args.get("sections", 4))
        # each sample plans a video of 1..sections sections (a prefix of its clip), so training sees
        # every layout that inference of up to ``sections`` sections uses: a 2-section video's first
        # step (one blank window, nothing made yet) never occurs inside a 4-section plan
        self.vary_sections = bool(args.get("vary_sections", False))
        # captions replaced by the empty prompt this often: the model also learns the unconditional
        # velocity, which real CFG (cfg > 1, negative prompt "") pushes away from
        self.text_dropout = float(args.get("text_dropout", 0.0))
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}")
        # the object is a few percent of the latent cells, and what the caption is about: its cells
        # (and their neighbours) weigh 1 + object_weight in the loss, the plain background 1. With a
        # uniform loss the demo model shifts growing, shrinking and rotating objects by a few pixels,
        # an error too small to matter in the mean (what weighting did there: docs/demo-model.md)
        self.object_weight = float(args.get("object_weight", 0.0))
        if not (self.object_weight >= 0 and math.isfinite(self.object_weight)):
            raise ValueError(f"object_weight must be a finite number >= 0, got {self.object_weight}")
        # which cells: "clip", the object's cells in every frame of the target, or "start", its cells
        # in the start frame (a part of every sample's context). A weight that depends on the target
        # tilts what the loss is minimised by: per cell, E[w v] / E[w] instead of E[v], i.e. towards
        # outcomes with the object there. A weight that is a function of the inputs only ("start")
        # reweights the cells without moving the minimiser (what each did: docs/demo-model.md)
        self.object_region = str(args.get("object_region", "clip"))
        if self.object_region not in ("clip", "start"):
            raise ValueError(f"object_region must be 'clip' or 'start', got {self.object_region!r}")
        # in-place motions (stay, grow, shrink, rotate) are 4 of the world's 11 motions but most of
        # the demo model's direction misses (it moves their objects a few pixels): weights > 1 draw
        # such clips more often. Checked here, not at the first batch
        self.motion_weights = {str(k): float(v) for k, v in dict(args.get("motion_weights", {})).items()}
        motion_probabilities(list(world.MOTIONS), self.motion_weights)
        # the world's motions are left-right symmetric in distribution, a finite set of clips is not;
        # with every clip's mirror beside it the data is, so a lean to one side cannot come from an
        # imbalance in the data (the demo model's still misses lean left: docs/demo-model.md).
        # Rotations have no mirror, so they become rarer unless motion_weights compensates
        self.mirror = bool(args.get("mirror", False))
        # the first world (the default, so existing configs draw the same clips) or the one whose
        # start frame is independent of the motion (issue 18.1); the latent cache records it
        self.world_start = str(args.get("world_start", "by-motion"))
        if self.world_start not in world.STARTS:
            raise ValueError(f"world_start must be one of {world.STARTS}, got {self.world_start!r}")
        if self.mirror and self.world_start == "determined":  # a mirrored bounce heads the other way
            raise ValueError('mirror: the "determined" world has no mirrored bounces (they all head one way)')
        # clips start at a random time in [0, start_seconds). Inference always starts at t = 0, and a
        # later start shows translations already stopped at the frame's edge under a caption that
        # says "moves": 22% of such clips did at 10 s, which taught the model that "moves" may not move
        self.start_frames = max(1, round(world.FPS * float(args.get("start_seconds", 0.0))))
        self.window = int(args.get("window", 9))
        self.size = int(args.get("size", world.SIZE))
        self.modes = tuple(args.get("modes", MODES))  # one drawn uniformly per batch: repeat a mode to weight it
        self.shift = float(args.get("shift", 3.0))
        self.cache_clips = int(args.get("clips", 0))
        self.cache_path = args.get("cache", "runs/demo-framepack-clips.safetensors")
        cfg = resolve_config(args.get("preset", "tiny")).replace(
            has_image_proj=False,
            guidance_embeds=False,
            text_embed_dim=self.text.llama.config.hidden_size,
            pooled_projection_dim=self.text.clip.config.hidden_size,
            **args.get("config", {}),
        )
        self.model = FramePackTransformer(cfg)
        if args.get("init"):
            # fine-tuning (e.g. more steps on the shipped demo model): start from exported weights, in
            # fp32 whatever they were stored in (the demo model is stored fp16: AdamW on fp16 weights is NaN)
            self.model = FramePackTransformer.from_pretrained(args["init"], dtype=torch.float32)
            if not self.model.config.same_architecture(cfg):
                raise ValueError(f"init weights {args['init']} do not match this task's transformer config")
            self.model.config = cfg  # the task's gap rule: the exported config.json says which it taught
        self._captions: dict[str, TextEmbedding] = {}

    def _embed(self, caption: str) -> TextEmbedding:
        if caption not in self._captions:
            self._captions[caption] = self.text.encode(caption)
        return self._captions[caption]

    def _clip_frames(self) -> int:
        return frame_count(latent_count(self.sections, self.window))

    def _encode_clip(self, params: world.WorldParams, start: int) -> torch.Tensor:
        pixels = world.render(params, self._clip_frames(), size=self.size, start=start)
        return self.vae.encode(to_pixels(pixels))  # (1, C, 9N + 1, h, w)

    def _cells(self, params: world.WorldParams, start: int) -> torch.Tensor | None:
        """The clip's object cells (1, 1, 9N + 1, h, w), or None when the loss is not weighted."""
        if not self.object_weight:
            return None
        frames = self._clip_frames()
        if self.object_region == "start":  # render the start frame's coverage only, then hold it
            first = world.object_coverage(params, 1, size=self.size, start=start)
            return object_cells(np.broadcast_to(first, (frames, *first.shape[1:])))[None, None]
        return object_cells(world.object_coverage(params, frames, size=self.size, start=start))[None, None]

    def _cache_scenes(self) -> Iterator[tuple[world.WorldParams, int]]:
        """(params, start frame) of the cached clips: the cache's own stream (seed 0), the same for
        every training seed, so the clips can be replayed from it (the cache stores latents only)."""
        rng = np.random.default_rng(0)
        scenes = world.stream(0, self.world_start)
        for _ in range(self.cache_clips):
            yield next(scenes), int(rng.integers(0, self.start_frames))

    def _mirror_scenes(
        self, scenes: list[tuple[world.WorldParams, int]] | None = None
    ) -> list[tuple[world.WorldParams, int]]:
        """The mirrors of ``scenes`` (default: the cached clips) that are training scenes. A prefix
        of the same list for more clips, like the cache."""
        scenes = list(self._cache_scenes()) if scenes is None else scenes
        mirrored = ((training_mirror(p, self.world_start), start) for p, start in scenes)
        return [(m, start) for m, start in mirrored if m is not None]

    def _mirror_cache_path(self) -> Path:
        path = Path(self.cache_path)
        return path.with_name(f"{path.stem}-mirror{path.suffix}")

    def _clips(self, rng: np.random.Generator, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, str]]:
        """(latents, object cells or None, caption) forever: fresh renders, or random draws from the latent cache."""
        if self.cache_clips:
            scenes = list(self._cache_scenes())
            latents, captions = self._load_or_build_cache(scenes=scenes)
            if self.mirror:  # in a cache file of their own, so the plain cache serves other configs
                mirrored = self._mirror_scenes(scenes)
                more, more_captions = self._load_or_build_cache(self._mirror_cache_path(), mirrored)
                latents, captions, scenes = torch.cat([latents, more]), captions + more_captions, scenes + mirrored
            cells = [self._cells(p, start) for p, start in scenes]
            probabilities = motion_probabilities([p.motion for p, _ in scenes], self.motion_weights)
            while True:
                # without weights, the draw of the configs that made the shipped weights (reproducible)
                i = int(rng.choice(len(captions), p=probabilities)) if self.motion_weights else int(rng.integers(len(captions)))
                yield latents[i : i + 1].float(), cells[i], captions[i]
        scenes = world.stream(seed, self.world_start)
        top = max([1.0, *self.motion_weights.values()])
        while True:
            params = next(scenes)
            if self.mirror and rng.random() < 0.5:  # half the time its mirror, where it has one
                params = training_mirror(params, self.world_start) or params
            if self.motion_weights and rng.random() * top >= self.motion_weights.get(params.motion, 1.0):
                continue  # rejection sampling: a motion of weight w is kept w / max(weights) as often
            start = int(rng.integers(0, self.start_frames))
            yield self._encode_clip(params, start), self._cells(params, start), world.caption(params)

    def _read_cache(self, path: Path) -> tuple[torch.Tensor | None, list[str]]:
        """The cache file's (latents, captions) if it was built for this config, else (None, [])."""
        from safetensors.torch import load_file

        if not path.exists():
            return None, []
        latents = load_file(str(path))["latents"]
        captions = json.loads(path.with_suffix(".json").read_text())
        meta_path = path.with_suffix(".meta.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        # a crash between the captions and the latents file (the commit point) leaves them unequal
        # caches written before ``world_start`` existed hold the first world's clips
        if (latents.shape[-1] == self.size // 8 and len(latents) == len(captions)
                and meta.get("start_frames", world.FPS * 10) == self.start_frames
                and meta.get("world_start", "by-motion") == self.world_start):
            return latents, captions
        log.info("latent cache %s does not match this config; rebuilding", path)
        return None, []

    def _load_or_build_cache(
        self, path: Path | None = None, scenes: list[tuple[world.WorldParams, int]] | None = None
    ) -> tuple[torch.Tensor, list[str]]:
        """Latents and captions of ``scenes`` (default: the cached clips) from the cache file at
        ``path`` (default: ``cache``), encoding those it lacks. ``scenes`` must extend the list the
        file was built from, as a longer prefix of one stream does."""
        from safetensors.torch import save_file
        from tqdm import tqdm

        path = Path(self.cache_path if path is None else path)
        scenes = list(self._cache_scenes()) if scenes is None else scenes
        have, captions = self._read_cache(path)
        if len(captions) >= len(scenes):
            return have[: len(scenes)], captions[: len(scenes)]
        if captions:  # fewer clips than asked: a prefix of one seeded stream, so encode only the rest
            log.info("latent cache %s holds %d of %d clips; encoding the rest", path, len(captions), len(scenes))
        latents = [have] if captions else []
        for params, start in tqdm(scenes[len(captions):], total=len(scenes), initial=len(captions),
                                  desc=f"encoding training clips ({path.name})", dynamic_ncols=True):
            latents.append(self._encode_clip(params, start).half())
            captions.append(world.caption(params))
        stacked = torch.cat(latents)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"latents": stacked}, str(tmp))
        path.with_suffix(".json").write_text(json.dumps(captions))
        path.with_suffix(".meta.json").write_text(json.dumps({"start_frames": self.start_frames, "world_start": self.world_start}))
        tmp.replace(path)  # the latents file is the commit point
        return stacked, captions

    def batches(self, batch_size: int, seed: int) -> Iterator[Batch]:
        rng = np.random.default_rng(seed)
        clips = self._clips(rng, seed)
        counts = range(1, self.sections + 1) if self.vary_sections else (self.sections,)
        config = self.model.config
        plans_for = {(n, m): plan_sections(n, m, config.schedule, self.window, max_padding=config.max_inverted_padding)
                     for m in set(self.modes) for n in counts}  # pure: planned once, not per sample
        while True:
            mode = self.modes[int(rng.integers(len(self.modes)))]
            targets, windows, levels, texts, weights = [], [], [], [], []
            for _ in range(batch_size):
                latents, cells, caption = next(clips)
                count = int(rng.integers(1, self.sections + 1)) if self.vary_sections else self.sections
                plans = plans_for[count, mode]
                plan = plans[int(rng.integers(len(plans)))]
                targets.append(latents[:, :, list(plan.positions)])
                if cells is not None:
                    weights.append(1.0 + self.object_weight * cells[:, :, list(plan.positions)].float())
                windows.append(torch.tensor(plan.window_indices))
                levels.append(context_latents(plan, latents))
                texts.append(self._embed("" if self.text_dropout and rng.random() < self.text_dropout else caption))
            text, mask, pooled = stack_embeddings(texts)
            yield Batch(torch.cat(targets), torch.stack(windows), stack_history(plan, levels), text, mask, pooled,
                        torch.cat(weights) if weights else None)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, sigma, velocity = noised(batch.target, self.shift)
        v = model(x, sigma * TIMESTEP_SCALE, batch.text, batch.mask, batch.pooled, None, batch.window, batch.history)
        return weighted_mse(v, velocity, batch.weight)

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)


register("framepack")(FramePackTask)
