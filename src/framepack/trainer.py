"""One trainer for every stage: ``framepack train CONFIG.json``.

A *task* knows its model, its data and its loss; the trainer knows everything else: accelerate
(the same command on one CPU or many GPUs), AdamW with warm-up, gradient clipping, a progress bar
with the loss, a checkpoint every N steps (written atomically) and resumption from the latest
one, so a run can stop at any moment and continue in a later session; optionally an exponential
moving average of the weights (``ema``), checkpointed with the rest and exported instead of the
last step's weights.

Config (JSON)::

    {"task": "vae", "output_dir": "runs/demo-vae", "steps": 3000, "batch_size": 8, "lr": 3e-4,
     "warmup": 100, "checkpoint_every": 200, "seed": 0, "ema": 0.999, "task_args": {...}}
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training stage provides."""

    model: nn.Module

    def batches(self, batch_size: int, seed: int) -> Iterator[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def export(self, model: nn.Module, directory: Path) -> None:
        """Write the trained weights in their inference layout."""
        ...


TASKS: dict[str, Callable[[dict], Task]] = {}


def register(name: str):
    def wrap(factory: Callable[[dict], Task]) -> Callable[[dict], Task]:
        TASKS[name] = factory
        return factory

    return wrap


@dataclass(frozen=True)
class TrainConfig:
    task: str
    output_dir: str
    steps: int
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    ema: float = 0.0  # decay of an exponential moving average of the weights; > 0: the average is exported
    task_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1), got {self.ema}")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"training config not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc})") from None
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay(step: int, decay: float) -> float:
    """The average's decay at ``step``: ramped up from 0, so early weights (at a from-scratch start,
    noise) are forgotten within a few steps instead of ``1 / (1 - decay)``."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """Exponential moving average of a model's trainable weights.

    Sampling from the average of the last ~``1 / (1 - decay)`` steps' weights rather than from the
    last step's removes the optimiser's step-to-step noise, which a diffusion model shows as
    wandering positions and textures. Kept in float32 beside the model; saved as safetensors in
    each checkpoint."""

    FILE = "ema.safetensors"

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        params = dict(model.named_parameters())
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_([self.shadow[n] for n in self.names], current, 1.0 - ema_decay(step, self.decay))

    def averaged(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` carrying the averaged weights."""
        import copy

        out = copy.deepcopy(model)
        own = dict(out.named_parameters())
        with torch.no_grad():
            for n in self.names:
                own[n].copy_(self.shadow[n])
        return out

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(directory / self.FILE))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(directory / self.FILE))
        if set(saved) != set(self.shadow):
            raise ValueError(f"{directory / self.FILE} does not hold this model's weights")
        self.shadow = saved


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    done = [p for p in done if (p / "DONE").exists()]
    return done[-1] if done else None


def train(config: TrainConfig, max_steps_this_run: int | None = None) -> Path:
    """Train (resuming from the latest checkpoint); returns the output directory.

    ``max_steps_this_run`` stops early after that many steps (a checkpoint is written first), for
    runs that must fit in a time slot.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    if config.task not in TASKS:
        raise ValueError(f"unknown training task {config.task!r}; known: {', '.join(sorted(TASKS))}")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(config.__dict__, indent=2, sort_keys=True) + "\n")
    accelerator = Accelerator()
    set_seed(config.seed)
    task = TASKS[config.task](config.task_args)
    model = task.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup, config.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    average = WeightAverage(accelerator.unwrap_model(model), config.ema) if config.ema else None
    resume = latest_checkpoint(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        step = int(resume.name.split("-")[1])
        if average is not None:
            if (resume / WeightAverage.FILE).exists():
                average.load(resume)
            else:  # the config gained ``ema`` mid-run: start the average at the resumed weights
                average = WeightAverage(accelerator.unwrap_model(model), config.ema)
        log.info("resumed from %s", resume)
    # the data stream is deterministic per (seed, step): a resumed run sees fresh batches
    batches = task.batches(config.batch_size, seed=config.seed * 1_000_003 + step)
    stop_at = config.steps if max_steps_this_run is None else min(config.steps, step + max_steps_this_run)
    bar = tqdm(total=config.steps, initial=step, desc=config.task, dynamic_ncols=True, disable=not accelerator.is_main_process)
    losses: list[float] = []
    clock = _WallClock(_logged_seconds(out / "loss.log") if resume is not None else 0.0)
    model.train()
    while step < stop_at:
        with accelerator.accumulate(model):
            loss = task.loss(model, next(batches))
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if average is not None:
            average.update(accelerator.unwrap_model(model), step)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % config.checkpoint_every == 0 or step == stop_at:
            _checkpoint(accelerator, out, step, config.keep_checkpoints, losses, clock.seconds(), average)
    bar.close()
    if step >= config.steps and accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        task.export(average.averaged(trained) if average is not None else trained, out / "final")
    return out


class _WallClock:
    """Training wall time, carried across resumed runs (the model card reports it)."""

    def __init__(self, offset: float) -> None:
        self.offset, self.began = offset, time.monotonic()

    def seconds(self) -> float:
        return self.offset + time.monotonic() - self.began


def _logged_seconds(log_path: Path) -> float:
    """Wall seconds recorded by the last checkpoint of earlier runs (0 if none)."""
    try:
        return float(json.loads(log_path.read_text().splitlines()[-1]).get("wall_seconds", 0.0))
    except (OSError, IndexError, ValueError):
        return 0.0


def _checkpoint(accelerator, out: Path, step: int, keep: int, losses: list[float], wall_seconds: float,
                average: WeightAverage | None) -> None:
    """Write checkpoint-STEP atomically (a DONE marker last) and prune old ones."""
    path = out / f"checkpoint-{step}"
    if path.exists():
        shutil.rmtree(path)
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        if average is not None:
            average.save(path)
        with (out / "loss.log").open("a") as f:
            loss = sum(losses[-50:]) / max(1, len(losses[-50:]))
            f.write(json.dumps({"step": step, "loss": loss, "wall_seconds": round(wall_seconds, 1)}) + "\n")
        (path / "DONE").write_text("")
        finished = sorted((p for p in out.glob("checkpoint-*") if (p / "DONE").exists()),
                          key=lambda p: int(p.name.split("-")[1]))
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
