"""Training task "distill": a few-step student of a FramePack model, with CFG folded in (issue 18.4).

The method is one round of *reflow* on the teacher's guided samples: Rectified Flow's reflow
(Liu et al. 2022, "Flow Straight and Fast", sec. 2.3: train a flow on the coupling (noise, the
teacher's sample from that noise) so that its paths become straight), used as InstaFlow (Liu et
al. 2023) uses it, with the teacher's classifier-free guidance baked into the samples.

1. **Pairs.** Section contexts are drawn exactly as the "framepack" task draws them (its clip
   cache, the planner's layouts, modes and section counts: a :class:`FramePackTask` does it, with
   the teacher's VAE, text encoders and architecture). For each, the teacher samples the section's
   window from Gaussian noise with its own defaults: ``teacher_steps`` UniPC steps, real CFG at
   its manifest's scale against the empty prompt, no step cache (what ``framepack eval`` measures
   it with). ``(noise, sample, context)`` is a pair. Pairs are made once, in chunks of
   ``pair_batch`` that share a layout, each file written atomically: a stopped run keeps its
   finished chunks, and the chunks are a deterministic stream, so a resumed run makes only the
   missing ones.
2. **Student.** It starts from the teacher's weights and sees the caption only (it runs at cfg 1:
   one forward per step instead of two). It is trained on the straight line between the noise
   ``n`` and the teacher's sample ``x*``: ``x_s = (1 - s) x* + s n``, target velocity ``n - x*``,
   at the sigmas the sampler evaluates at ``student_steps`` steps (UniPC and Euler both call the
   denoiser at sigma_0 .. sigma_{n-1} of the same shifted schedule, and nowhere else). On that line
   a student that predicts ``x*`` exactly makes either sampler return the teacher's guided sample
   from the same noise in ``student_steps`` forwards (tests/test_distill.py checks both).

``"objective": "guidance"`` folds CFG in without step distillation: the student's velocity is
trained to equal the teacher's guided velocity on the data task's noised clips (the forward process
at the same sigmas), made online, no pairs. It is the cheap half of the method, kept to tell the
two effects apart.

Run it with ``python -m framepack.train.distill_task CONFIG`` (configs/demo_student.json: the
shipped demo model as teacher); ``--package DIR`` then writes the student as a model directory,
to be sampled with ``--steps`` one of ``student_steps`` (docs/training-gen2.md, "The student").
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..components import TextEmbedding, resolve_model
from ..model import HistoryInput
from ..sampling import TIMESTEP_SCALE, guided_velocity, sample_unipc, sigma_schedule, velocity_denoiser
from ..trainer import TrainConfig, register, train
from . import package
from .framepack_task import Batch, FramePackTask, weighted_mse

log = logging.getLogger(__name__)

# task_args this task reads itself; the others describe the data and go to the "framepack" task
DISTILL_ARGS = ("objective", "teacher", "teacher_steps", "teacher_cfg", "student_steps", "pairs", "pair_batch",
                "pairs_dir")
# "reflow": step distillation and CFG folded in, on cached teacher samples; "guidance": CFG folded in
# only (the student's velocity = the teacher's guided one, online, on the data task's noised clips)
OBJECTIVES = ("reflow", "guidance")
# task_args that come from the teacher and must not be given (they would describe another model)
FROM_TEACHER = ("vae", "text", "init", "preset", "config", "shift", "text_dropout", "object_weight")


@dataclass
class PairBatch:
    """Pairs of one context layout, batched. Shapes as in :class:`Batch`."""

    noise: torch.Tensor  # (B, C, window, h, w) the Gaussian noise the teacher started from
    sample: torch.Tensor  # (B, C, window, h, w) the teacher's guided sample from that noise
    window: torch.Tensor  # (B, window)
    history: list[HistoryInput]  # per level: (B, C, T, h, w) latents, (B, T) indices
    text: torch.Tensor  # (B, L, text_dim)
    mask: torch.Tensor  # (B, L) bool
    pooled: torch.Tensor  # (B, pooled_dim)


def student_sigmas(steps: tuple[int, ...], shift: float) -> torch.Tensor:
    """Every sigma a sampler evaluates the denoiser at, for any of ``steps`` steps (sorted, unique):
    sigma_0 .. sigma_{n-1} of :func:`sigma_schedule` (sigma_n = 0 is never evaluated)."""
    grids = [sigma_schedule(n, shift=shift)[:-1] for n in steps]
    return torch.unique(torch.cat(grids))


def reflow_input(noise: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point at ``sigma`` (B,) on the straight line from ``sample`` (sigma 0) to ``noise``
    (sigma 1), and the velocity that moves along it: ``(x_sigma, noise - sample)``."""
    s = sigma.view(-1, *([1] * (noise.ndim - 1)))
    return (1 - s) * sample + s * noise, noise - sample


def _pad_text(states: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate text states (b, L_i, D) and masks (b, L_i) along the batch, padded to the longest."""
    length = max(s.shape[1] for s in states)
    return (torch.cat([F.pad(s, (0, 0, 0, length - s.shape[1])) for s in states]),
            torch.cat([F.pad(m, (0, length - m.shape[1])) for m in masks]))


def guided_teacher(teacher: nn.Module, batch: Batch, negative: TextEmbedding, cfg: float
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The teacher's guided velocity ``v(x, sigma)`` for the batch's contexts: ``neg + cfg (pos -
    neg)`` as the pipeline computes it, both branches in one forward of batch 2B (the plain
    conditional velocity when cfg == 1)."""
    b = batch.window.shape[0]
    copies = 1 if cfg == 1.0 else 2
    if copies == 1:
        states, mask, pooled = batch.text, batch.mask, batch.pooled
    else:
        states, mask = _pad_text([batch.text, negative.states.expand(b, -1, -1)],
                                 [batch.mask, negative.mask.expand(b, -1)])
        pooled = torch.cat([batch.pooled, negative.pooled.expand(b, -1)])
    window = batch.window.repeat(copies, 1)
    history = [HistoryInput(h.kernel, h.latents.repeat(copies, 1, 1, 1, 1), h.indices.repeat(copies, 1))
               for h in batch.history]
    memo: dict = {}  # the history's tokens and RoPE tables, made once for all of the sample's steps

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigma * TIMESTEP_SCALE).repeat(copies)
        with torch.no_grad():
            v = teacher(x.repeat(copies, 1, 1, 1, 1), t, states, mask, pooled, None, window, history,
                        memo=memo).float()
        return guided_velocity(v[:b], v[b:] if copies == 2 else None, cfg)

    return velocity


def teacher_samples(teacher: nn.Module, batch: Batch, negative: TextEmbedding, cfg: float, sigmas: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """The teacher's guided UniPC samples (B, C, window, h, w) from ``noise`` over ``sigmas``."""
    return sample_unipc(velocity_denoiser(guided_teacher(teacher, batch, negative, cfg)), noise, sigmas).float()


def _layout_key(history: list[HistoryInput]) -> str:
    """Pairs can share a batch when their context levels have the same kernels and lengths."""
    return json.dumps([[list(h.kernel), int(h.latents.shape[2])] for h in history])


class PairStore:
    """The pairs on disk: ``DIR/chunk-NNNNN.safetensors`` (one teacher batch each, written via a
    temporary file, so a chunk that exists is whole) and ``DIR/pairs.json``, what made them."""

    def __init__(self, directory: Path, recipe: dict) -> None:
        self.directory, self.recipe = Path(directory), recipe

    def check(self) -> None:
        """Refuse a directory whose pairs another teacher or recipe made (mixing them would train
        the student towards two targets)."""
        meta = self.directory / "pairs.json"
        if meta.exists() and json.loads(meta.read_text()) != self.recipe:
            raise ValueError(f"{self.directory} holds pairs made by another teacher or recipe ({meta}); "
                             "give another pairs_dir or delete that one")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps(self.recipe, indent=2, sort_keys=True) + "\n")

    def path(self, index: int) -> Path:
        return self.directory / f"chunk-{index:05d}.safetensors"

    def save(self, index: int, batch: Batch, noise: torch.Tensor, sample: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tensors = {"noise": noise, "sample": sample, "window": batch.window, "text": batch.text,
                   "mask": batch.mask, "pooled": batch.pooled}
        for i, h in enumerate(batch.history):
            tensors[f"history{i}.latents"], tensors[f"history{i}.indices"] = h.latents, h.indices
        kernels = json.dumps([list(h.kernel) for h in batch.history])
        tmp = self.path(index).with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"kernels": kernels})
        tmp.replace(self.path(index))

    def load(self, index: int) -> PairBatch:
        from safetensors import safe_open

        with safe_open(str(self.path(index)), framework="pt") as f:
            kernels = json.loads(f.metadata()["kernels"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safe_open, not a dict)
        history = [HistoryInput(tuple(k), t[f"history{i}.latents"], t[f"history{i}.indices"])
                   for i, k in enumerate(kernels)]
        return PairBatch(t["noise"], t["sample"], t["window"], history, t["text"], t["mask"], t["pooled"])


def concat_pairs(parts: list[PairBatch]) -> PairBatch:
    """One batch of pairs of the same layout (texts padded to the longest)."""
    text, mask = _pad_text([p.text for p in parts], [p.mask for p in parts])
    history = [HistoryInput(level.kernel, torch.cat([p.history[i].latents for p in parts]),
                            torch.cat([p.history[i].indices for p in parts]))
               for i, level in enumerate(parts[0].history)]
    return PairBatch(torch.cat([p.noise for p in parts]), torch.cat([p.sample for p in parts]),
                     torch.cat([p.window for p in parts]), history, text, mask, torch.cat([p.pooled for p in parts]))


def take(pairs: PairBatch, i: int) -> PairBatch:
    """Pair ``i`` of a batch, as a batch of one."""
    one = slice(i, i + 1)
    return PairBatch(pairs.noise[one], pairs.sample[one], pairs.window[one],
                     [HistoryInput(h.kernel, h.latents[one], h.indices[one]) for h in pairs.history],
                     pairs.text[one], pairs.mask[one], pairs.pooled[one])


class DistillTask:
    def __init__(self, args: dict) -> None:
        given = sorted(set(FROM_TEACHER) & set(args))
        if given:
            raise ValueError(f"distill: {', '.join(given)} come from the teacher; remove them from task_args")
        if "teacher" not in args:
            raise ValueError("distill: task_args needs 'teacher', a model name or directory (e.g. \"tiny\")")
        source = resolve_model(str(args["teacher"]))
        if source.vae is None or not Path(source.transformer).is_dir():
            raise ValueError(f"distill: teacher {args['teacher']!r} is not a local model with its own VAE")
        self.teacher_steps = int(args.get("teacher_steps", 25))
        self.teacher_cfg = float(args.get("teacher_cfg", source.cfg(None)))
        steps = args.get("student_steps", 4)
        self.student_steps = tuple(int(n) for n in (steps if isinstance(steps, list) else [steps]))
        self.pairs = int(args.get("pairs", 256))
        self.pair_batch = int(args.get("pair_batch", 8))
        self.objective = str(args.get("objective", "reflow"))
        if self.objective not in OBJECTIVES:
            raise ValueError(f"distill: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.teacher_steps < 2 or min(self.student_steps) < 1 or self.pairs < 1 or self.pair_batch < 1:
            raise ValueError("distill: teacher_steps must be >= 2, student_steps, pairs and pair_batch >= 1")
        self.shift = float(source.shift(None) or 3.0)  # the schedule the teacher samples with
        # the data task: the teacher's VAE, text encoders and architecture; its weights start the student
        data = {k: v for k, v in args.items() if k not in DISTILL_ARGS}
        self.data = FramePackTask({**data, "vae": source.vae, "text": source.hunyuan, "init": source.transformer,
                                   "preset": str(Path(source.transformer) / "config.json"), "shift": self.shift})
        self.model = self.data.model  # the student, from the teacher's weights
        self.teacher = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.sigmas = student_sigmas(self.student_steps, self.shift)
        weights = Path(source.transformer) / "diffusion_pytorch_model.safetensors"
        recipe = {"teacher_weights": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else None,
                  # the dtype the teacher computes in: fp16 pairs once passed for fp32 ones unseen
                  "teacher_dtype": str(next(self.teacher.parameters()).dtype),
                  "teacher_steps": self.teacher_steps, "teacher_cfg": self.teacher_cfg, "shift": self.shift,
                  "pair_batch": self.pair_batch, "data": {k: v for k, v in data.items() if k != "cache"}}
        self.store = PairStore(Path(args.get("pairs_dir", "runs/distill-pairs")), recipe)
        self._pairs: dict[str, list[PairBatch]] | None = None

    def chunks(self) -> int:
        return -(-self.pairs // self.pair_batch)

    def make_pairs(self) -> None:
        """Make the chunks not yet on disk. Chunk i is the i-th batch of the data task's stream of
        seed 0 and noise from generator seed i, whatever was made before (so a resume fills gaps)."""
        from tqdm import tqdm

        self.store.check()
        todo = [i for i in range(self.chunks()) if not self.store.path(i).exists()]
        if not todo:
            return
        negative = self.data._embed("")
        sigmas = sigma_schedule(self.teacher_steps, shift=self.shift)
        stream = self.data.batches(self.pair_batch, seed=0)
        for i in tqdm(range(self.chunks()), desc="teacher pairs", dynamic_ncols=True, initial=0):
            batch = next(stream)  # drawn for every chunk, so chunk i's context does not depend on gaps
            if i not in todo:
                continue
            generator = torch.Generator().manual_seed(i)
            noise = torch.randn(batch.target.shape, generator=generator)
            sample = teacher_samples(self.teacher, batch, negative, self.teacher_cfg, sigmas, noise)
            self.store.save(i, batch, noise, sample)
        log.info("%d teacher pairs in %s", self.chunks() * self.pair_batch, self.store.directory)

    def _by_layout(self) -> dict[str, list[PairBatch]]:
        """Every pair, as a batch of one, by context layout (made if missing, read once)."""
        if self._pairs is None:
            self.make_pairs()
            self._pairs = {}
            for i in range(self.chunks()):
                chunk = self.store.load(i)
                self._pairs.setdefault(_layout_key(chunk.history), []).extend(take(chunk, j) for j in range(len(chunk.noise)))
        return self._pairs

    def batches(self, batch_size: int, seed: int) -> Iterator[PairBatch | Batch]:
        if self.objective == "guidance":  # no pairs: the data task's noised clips, targets made online
            yield from self.data.batches(batch_size, seed)
            return
        by_layout = self._by_layout()
        layouts = sorted(by_layout)
        weights = np.array([len(by_layout[k]) for k in layouts], dtype=float)
        rng = np.random.default_rng(seed)
        while True:  # a layout in proportion to its pairs, then pairs of it without repeats
            pool = by_layout[layouts[int(rng.choice(len(layouts), p=weights / weights.sum()))]]
            picked = rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)
            yield concat_pairs([pool[int(j)] for j in picked])

    def guidance_target(self, batch: Batch, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The teacher's guided velocity at ``x``, ``sigma`` (B,): what a student run at cfg 1 must say."""
        return guided_teacher(self.teacher, batch, self.data._embed(""), self.teacher_cfg)(x, sigma)

    def loss(self, model: nn.Module, batch: PairBatch | Batch) -> torch.Tensor:
        b = batch.window.shape[0]
        sigma = self.sigmas[torch.randint(len(self.sigmas), (b,))]
        if isinstance(batch, Batch):  # guidance: the forward process on a clip, as the teacher was trained
            x, _ = reflow_input(torch.randn_like(batch.target), batch.target, sigma)
            target = self.guidance_target(batch, x, sigma)
        else:
            x, target = reflow_input(batch.noise, batch.sample, sigma)
        v = model(x, sigma * TIMESTEP_SCALE, batch.text, batch.mask, batch.pooled, None, batch.window, batch.history)
        return weighted_mse(v, target, None)

    def export(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)
        # how the student is meant to be run (steps, cfg 1), beside its weights
        (directory / "distill.json").write_text(json.dumps(
            {"steps": min(self.student_steps), "trained_steps": list(self.student_steps), "cfg": 1.0,
             "teacher_cfg": self.teacher_cfg, "teacher_steps": self.teacher_steps}, indent=2) + "\n")


register("distill")(DistillTask)


def package_student(run: Path, out: Path, half: bool = False, share: Path | None = None,
                    card: Path | None = None, forward_up_to: float | None = None,
                    max_inverted_padding: int | None | str = package.KEEP) -> Path:
    """The model directory ``out`` of a finished distill run: the student's transformer with its
    teacher's VAE, text encoders and defaults (resolution, shift, mode), cfg 1 and the student's
    steps, no step cache. ``half`` stores the weights in fp16; ``share`` points the manifest at that
    model's encoders instead of copying them (they must be identical: the teacher's, shipped
    beside it); ``card`` is a markdown file written as its MODEL_CARD.md; ``forward_up_to`` (seconds)
    makes plain clips up to that length sample forward by default (ModelSource.sampling_mode);
    ``max_inverted_padding`` the gap rule of its inverted sections (:func:`package.assemble`; by default
    the teacher's, which the student's config copies)."""
    final = Path(run) / "final"
    if not (final / "distill.json").exists():
        raise ValueError(f"{run} has no finished student ({final / 'distill.json'} is missing): train it to the end first")
    config = json.loads((Path(run) / "train_config.json").read_text())
    source = resolve_model(str(config["task_args"]["teacher"]))
    out = package.assemble(Path(out), final, Path(source.vae), Path(source.hunyuan),
                           resolution=int(source.extra.get("resolution", 128)), shift=float(source.shift(None) or 3.0),
                           mode=source.mode, cfg=1.0, half=half, forward_up_to=forward_up_to,
                           max_inverted_padding=max_inverted_padding)
    distill = json.loads((final / "distill.json").read_text())
    package.update_manifest(out, {"steps": int(distill["steps"]), "cache": "none", "distilled_from": {
        "teacher": str(config["task_args"]["teacher"]), "teacher_steps": distill["teacher_steps"],
        "teacher_cfg": distill["teacher_cfg"], "trained_steps": distill["trained_steps"], "training_steps": config["steps"]}})
    if share is not None:
        package.share_encoders(out, Path(share))
    if card is not None:
        shutil.copyfile(card, out / "MODEL_CARD.md")
    return out


def main(argv: list[str] | None = None) -> int:
    """``framepack train`` for this task (the CLI registers the "framepack" and "vae" tasks)."""
    parser = argparse.ArgumentParser(prog="python -m framepack.train.distill_task", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="training config (JSON), e.g. configs/demo_student.json")
    parser.add_argument("--max-steps", type=int, help="stop after this many steps in this run (a checkpoint is written)")
    parser.add_argument("--package", metavar="DIR", help="then write the finished student as a model directory "
                        "(its teacher's VAE and text encoders, cfg 1)")
    parser.add_argument("--half", action="store_true", help="with --package: store the weights in fp16 (loaded at fp32)")
    parser.add_argument("--share-encoders", metavar="MODEL_DIR", help="with --package: use that model directory's VAE "
                        "and text encoders (identical to the teacher's) instead of copies, by relative paths")
    parser.add_argument("--card", metavar="FILE", help="with --package: a markdown file to write as its MODEL_CARD.md")
    parser.add_argument("--forward-up-to", type=float, metavar="SECONDS", help="with --package: sample clips up to "
                        "this long forward by default, longer ones inverted (chosen on validation: docs/demo-model.md)")
    parser.add_argument("--max-inverted-padding", type=package.gap_cap, default=package.KEEP, metavar="WINDOWS",
                        help="with --package: inverted sections are told their true gap from the start, up to this "
                             "many windows; 'none': the released layout (default: the teacher's rule)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = TrainConfig.load(args.config)
        if config.task != "distill":
            raise ValueError(f"{args.config}: task {config.task!r} is not 'distill'; run it with framepack train")
        run = train(config, max_steps_this_run=args.max_steps)
        print(run)
        if args.package:
            print(package_student(run, Path(args.package), half=args.half, share=args.share_encoders,
                                  card=Path(args.card) if args.card else None, forward_up_to=args.forward_up_to,
                                  max_inverted_padding=args.max_inverted_padding))
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
