"""One trainer for every stage: ``framepack train CONFIG.json``.

A *task* knows its model, its data and its loss; the trainer knows everything else: accelerate
(the same command on one CPU or many GPUs), AdamW with warm-up, gradient clipping, a progress bar
with the loss, a checkpoint every N steps (written atomically) and resumption from the latest
one, so a run can stop at any moment and continue in a later session; optionally an exponential
moving average of the weights (``ema``), checkpointed with the rest and exported instead of the
last step's weights.

A checkpoint holds what training changes and nothing else: the trainable weights (``requires_grad``),
their average, the optimiser, scheduler and RNG states. A model trained whole is saved whole, as
accelerate saves it; a model with frozen parameters (a LoRA's base, a stage that trains one part)
has only its trainable parameters written to ``model.safetensors``, and a resumed run builds the
frozen ones as the task always does (from its config) and loads the checkpoint's over them.

Config (JSON)::

    {"task": "vae", "output_dir": "runs/demo-vae", "steps": 3000, "batch_size": 8, "lr": 3e-4,
     "warmup": 100, "checkpoint_every": 200, "seed": 0, "ema": 0.999, "task_args": {...}}

Several processes (``accelerate launch --num_processes P framepack train CONFIG``): ``batch_size``
is the global batch of one optimiser step, whatever P and ``gradient_accumulation`` (A) are. Every
process draws the same global batch and takes its part: n = P * A micro-batches of
``batch_size / n`` samples, part ``rank * A + a`` at accumulation step ``a``. The loss of each
micro-batch is a mean over its samples, and accelerate averages them (1/A per backward, the mean
over processes in DDP's all-reduce), so one step's gradient is that of the mean over the global
batch. Every random draw of a micro-batch's loss (noise, timesteps, dropout) is seeded by
(seed, step, part) and the data stream restarts, seeded by (seed, step), at every checkpoint
step: a run with the same n gives the same weights whether its parts run on P processes or
in A accumulation steps, and whether or not it was interrupted and resumed with another P.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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

    # Optional: ``validate(self, model, step: int, directory: Path) -> None``, called on the main
    # process every ``validate_every`` steps with the unwrapped model (the average if ``ema``), in
    # eval mode and without gradients; ``directory`` is OUTPUT_DIR/validation. Not declared here,
    # so that a task without it still satisfies the protocol.


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
    # micro-batches each process runs per optimiser step; batch_size stays the global batch, so each
    # micro-batch holds batch_size / (processes * gradient_accumulation) samples
    gradient_accumulation: int = 1
    validate_every: int = 0  # steps between calls of the task's ``validate`` hook; 0: never
    task_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.gradient_accumulation < 1:
            raise ValueError("steps, batch_size, checkpoint_every and gradient_accumulation must be >= 1")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0 (0: never), got {self.validate_every}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1), got {self.ema}")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
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


def micro_batch_size(batch_size: int, processes: int, accumulation: int) -> int:
    """Samples per micro-batch when ``processes`` x ``accumulation`` micro-batches make one global batch."""
    parts = processes * accumulation
    if batch_size % parts:
        raise ValueError(f"batch_size {batch_size} (the global batch) does not split into {processes} process(es) x "
                         f"{accumulation} gradient_accumulation step(s): it must be a multiple of {parts}")
    return batch_size // parts


def batch_slice(batch: Any, size: int, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch of ``size`` samples, in the batch's own structure: every
    tensor whose first dimension is ``size`` is cut along it; dataclasses, lists, tuples and dicts
    are rebuilt around their cut contents; anything else (kernels, flags) is shared."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.ndim and batch.shape[0] == size else batch
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(batch, **{f.name: batch_slice(getattr(batch, f.name), size, start, stop)
                                             for f in dataclasses.fields(batch) if f.init})
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):  # a namedtuple is shared whole
        return type(batch)(batch_slice(item, size, start, stop) for item in batch)
    if isinstance(batch, dict):
        return {key: batch_slice(value, size, start, stop) for key, value in batch.items()}
    return batch


def rng_seed(seed: int, step: int, part: int) -> int:
    """The torch seed for micro-batch ``part`` of optimiser ``step`` (``part`` -1: drawing the
    batch). It depends on where the micro-batch sits in the global batch, not on which process
    or accumulation step runs it, so P processes and A accumulation steps draw the same noise."""
    return int(np.random.SeedSequence([seed, step, part + 1]).generate_state(1, np.uint64)[0])


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    done = [p for p in done if (p / "DONE").exists()]
    return done[-1] if done else None


def train(config: TrainConfig, max_steps_this_run: int | None = None) -> Path:
    """Train (resuming from the latest checkpoint); returns the output directory.

    ``max_steps_this_run`` stops early after that many steps (a checkpoint is written first), for
    runs that must fit in a time slot. Under ``accelerate launch`` every process runs this; the
    main one alone writes the run's files (checkpoint weights, loss.log, validation, export).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    if config.task not in TASKS:
        raise ValueError(f"unknown training task {config.task!r}; known: {', '.join(sorted(TASKS))}")
    # the scheduler is stepped once per optimiser step here; linked to the optimiser, accelerate
    # would step it once per process (it assumes each process adds a batch)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation,
                              step_scheduler_with_optimizer=False, cpu=_launched_without_accelerator())
    accelerator.register_save_state_pre_hook(_keep_trainable)
    accelerator.register_load_state_pre_hook(_load_trainable)
    _check_parallelism(accelerator, config)
    micro = micro_batch_size(config.batch_size, accelerator.num_processes, config.gradient_accumulation)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config.__dict__, indent=2, sort_keys=True) + "\n")
    set_seed(config.seed)  # the same initial weights on every process
    # what a task prepares on disk (text encoders, latent caches) the main process writes first and
    # the others then read, instead of all writing the same files at once
    with accelerator.main_process_first():
        task = TASKS[config.task](config.task_args)
    model = task.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.warmup, config.steps))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step = 0
    # the weights are the same on every process, so the main one alone keeps their average
    keeps_average = config.ema and accelerator.is_main_process
    average = WeightAverage(accelerator.unwrap_model(model), config.ema) if keeps_average else None
    resume = latest_checkpoint(out)
    if resume is not None:
        accelerator.load_state(str(resume))
        # checkpoints fall between optimiser steps: the micro-step count accelerate saved is the
        # saving run's (another gradient_accumulation would leave it mid-step), so start afresh
        accelerator.step = 0
        step = int(resume.name.split("-")[1])
        if average is not None:
            if (resume / WeightAverage.FILE).exists():
                average.load(resume)
            else:  # the config gained ``ema`` mid-run: start the average at the resumed weights
                average = WeightAverage(accelerator.unwrap_model(model), config.ema)
        log.info("resumed from %s", resume)
    stop_at = config.steps if max_steps_this_run is None else min(config.steps, step + max_steps_this_run)
    bar = tqdm(total=config.steps, initial=step, desc=config.task, dynamic_ncols=True, disable=not accelerator.is_main_process)
    losses: list[float] = []
    clock = _WallClock(_logged_seconds(out / "loss.log") if resume is not None else 0.0)
    batches: Iterator[Any] | None = None
    model.train()
    while step < stop_at:
        if batches is None or step % config.checkpoint_every == 0:
            # restarted at every checkpoint step, so a resumed run sees what an uninterrupted one does
            batches = task.batches(config.batch_size, seed=config.seed * 1_000_003 + step)
        torch.manual_seed(rng_seed(config.seed, step, -1))
        with accelerator.main_process_first() if not losses else nullcontext():  # a lazily built cache too
            batch = next(batches)  # the global batch, the same on every process
        loss = _optimiser_step(accelerator, task, model, optimizer, batch, config, step, micro)
        scheduler.step()
        if average is not None:
            average.update(accelerator.unwrap_model(model), step)
        step += 1
        losses.append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if config.validate_every and step % config.validate_every == 0:
            _validate(accelerator, task, model, average, step, out / "validation")
        if step % config.checkpoint_every == 0 or step == stop_at:
            _checkpoint(accelerator, out, step, config.keep_checkpoints, losses, clock.seconds(), average)
    bar.close()
    if step >= config.steps:
        trained = _whole_model(accelerator, model, config)
        if accelerator.is_main_process:
            task.export(average.averaged(trained) if average is not None else trained, out / "final")
    accelerator.wait_for_everyone()  # every process returns once the run's files are complete
    return out


def _launched_without_accelerator() -> bool:
    """True for several processes on a machine without GPUs: accelerate joins them (gloo) only when
    told to run on the CPU, and ``accelerate launch --cpu`` starts a single process, so a multi-GPU
    launch (torchrun) on such a machine would otherwise leave every process training alone."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def _sharded(accelerator) -> bool:
    """Whether the weights are split over the processes (FSDP, DeepSpeed ZeRO-3): none holds a whole model."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.deepspeed_config["zero_optimization"]["stage"] == 3
    return accelerator.distributed_type == DistributedType.FSDP


def _check_parallelism(accelerator, config: TrainConfig) -> None:
    """Refuse what this launch cannot do as asked, before any weights are built."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # each would train alone and overwrite the others' files
        raise ValueError(f"launched as {launched} processes but accelerate joined {accelerator.num_processes}; "
                         "launch with `accelerate launch` (see docs/multi-gpu.md)")
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate applies FSDP on GPUs (and the like) only: on the CPU it would run plain DDP
        runs = "one process" if accelerator.distributed_type == DistributedType.NO else accelerator.distributed_type.value
        raise ValueError(f"the launch asks for FSDP but accelerate runs {runs} here "
                         "(it applies FSDP on GPUs only); use configs/accelerate/ddp.yaml")
    if _sharded(accelerator) and (config.ema or config.validate_every):
        # both need the whole weights on the main process at every step (or every N steps)
        raise ValueError("ema and validate_every are not supported with sharded weights (FSDP, ZeRO-3) yet; set them to 0")


def _whole_model(accelerator, model: nn.Module, config: TrainConfig) -> nn.Module | None:
    """The trained model with its whole weights on the main process (None on the others). Sharded
    weights are gathered (a collective: every process calls this) into a fresh copy of the task's model."""
    if not _sharded(accelerator):
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # the whole weights, on the main process's CPU
    if not accelerator.is_main_process:
        return None
    whole = TASKS[config.task](config.task_args).model
    whole.load_state_dict(state)
    return whole


def _optimiser_step(accelerator, task: Task, model: nn.Module, optimizer, batch: Any, config: TrainConfig,
                    step: int, micro: int) -> float:
    """This process's micro-batches of the global ``batch``, one optimiser step; returns the loss
    of the whole global batch (the mean over every process's micro-batches)."""
    total = torch.zeros((), device=accelerator.device)
    for a in range(config.gradient_accumulation):
        part = accelerator.process_index * config.gradient_accumulation + a
        with accelerator.accumulate(model):
            torch.manual_seed(rng_seed(config.seed, step, part))
            loss = task.loss(model, batch_slice(batch, config.batch_size, part * micro, (part + 1) * micro))
            accelerator.backward(loss)  # divided by gradient_accumulation; DDP averages over processes
            if accelerator.sync_gradients and config.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()  # skipped by accelerate until the last micro-batch
            optimizer.zero_grad()
        total += loss.detach().float() / config.gradient_accumulation
    return float(accelerator.reduce(total, "mean"))


def _validate(accelerator, task: Task, model: nn.Module, average: WeightAverage | None, step: int,
              directory: Path) -> None:
    """The task's ``validate`` hook on the main process; the others wait for it."""
    if hasattr(task, "validate") and accelerator.is_main_process:
        trained = accelerator.unwrap_model(model)
        evaluated = average.averaged(trained) if average is not None else trained
        directory.mkdir(parents=True, exist_ok=True)
        evaluated.eval()
        with torch.no_grad():
            task.validate(evaluated, step, directory)
        model.train()
    accelerator.wait_for_everyone()


# ---- what a checkpoint holds of the model ---------------------------------------------------------------


def _partly_frozen(model: nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _keep_trainable(models: list[nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save-state pre-hook: a model with frozen parameters has its trainable ones alone
    written (for a LoRA on the 13B transformer, its adapter instead of the whole base again at every
    checkpoint); a model trained whole is written whole, buffers included, as accelerate writes it."""
    if len(weights) != len(models):  # FSDP and DeepSpeed write their own (sharded) files: left as they are
        return
    for i, model in enumerate(models):
        if _partly_frozen(model):
            weights[i] = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(models: list[nn.Module], input_dir: str) -> None:
    """accelerate's load-state pre-hook, the counterpart of :func:`_keep_trainable`. A checkpoint
    holding the whole model (a model trained whole, or a partly frozen one checkpointed before
    checkpoints held the trainable weights alone) is left to accelerate, which loads it whole as it
    always did. One holding a partly frozen model's trainable weights has them read over the frozen
    ones the task built, and the model is taken off accelerate's list (which would ask for every
    weight). Weights that do not fit are one line. The trainer prepares one model: ``model.safetensors``."""
    from safetensors import safe_open

    file = Path(input_dir) / "model.safetensors"
    for model in list(models):
        frozen = _partly_frozen(model)
        if not file.is_file():
            if frozen:
                raise ValueError(f"checkpoint {file.parent} has no {file.name} to resume from")
            continue  # accelerate names the file it looked for
        with safe_open(str(file), framework="pt", device="cpu") as f:
            saved, state = set(f.keys()), set(model.state_dict())
            if saved == state:  # the whole model: accelerate loads it, as it always has
                if frozen:
                    log.info("%s holds the whole model (written before checkpoints held the trainable weights "
                             "alone): loaded whole", file)
            elif not frozen:
                unknown = sorted(saved - state)
                if unknown:  # (a checkpoint short of weights: accelerate names the missing ones)
                    raise _misfit(file, f"it holds {len(unknown)} weights this model does not have, e.g. {unknown[0]!r}")
            else:
                _read_trainable(model, f, file)
                models.remove(model)


def _read_trainable(model: nn.Module, f: Any, file: Path) -> None:
    """Copy the tensors of ``f`` (``file`` open with safetensors) into the trainable parameters of
    ``model``; one line if they are not exactly those parameters, by name and shape."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = set(f.keys())
    missing, unknown = sorted(set(trainable) - saved), sorted(saved - set(trainable))
    if missing:
        raise _misfit(file, f"{len(missing)} of this model's trainable weights are missing, e.g. {missing[0]!r}")
    if unknown:
        raise _misfit(file, f"it holds {len(unknown)} weights this model does not train, e.g. {unknown[0]!r}")
    for name, parameter in trainable.items():
        shape = tuple(f.get_slice(name).get_shape())
        if shape != tuple(parameter.shape):
            raise _misfit(file, f"{name!r} has shape {shape}, this model's {tuple(parameter.shape)}")
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.copy_(f.get_tensor(name))


def _misfit(file: Path, problem: str) -> ValueError:
    return ValueError(f"{file} does not fit the model being trained ({problem}): resume with the task and "
                      "task_args the checkpoint was written with, or train in another output_dir")


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
    if path.exists() and accelerator.is_main_process:  # an unfinished one (no DONE) of a stopped run
        shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(path))  # every process writes its part (its RNG state at least)
    accelerator.wait_for_everyone()  # all parts written before DONE marks the checkpoint complete
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
