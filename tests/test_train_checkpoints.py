"""What a training checkpoint holds: the trainable weights and their average, the optimiser, scheduler
and RNG states, never the frozen parameters (a LoRA's base). A resumed run builds the frozen weights
from its task's config and loads the checkpoint's over them, and ends bit for bit where an
uninterrupted run ends; a model trained whole is checkpointed whole, as before; a checkpoint written
before (the whole model) still resumes; one whose weights do not fit is one line.

A toy task with a frozen base (fast) and the "lora" task on the demo model ("tiny")."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_user_task import SIZE, _clip_folder
from torch import nn

from framepack import trainer
from framepack.train.dataset import prepare
from framepack.train.user_task import UserTask

WEIGHTS = "model.safetensors"  # accelerate's name for the model's file in a checkpoint


def _names(file: Path) -> set[str]:
    with safe_open(str(file), framework="pt") as f:
        return set(f.keys())


def _equal_files(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ---- a toy task: a frozen base under a trainable head ------------------------------------------------------


class _FrozenBase:
    """y = sum(x) fitted by a Linear(8, 64) base, dropout and a Linear(64, out) head. task_args:
    ``train`` ("head": the base frozen, "base": the head frozen, "all"), ``out`` (the head's width).
    Dropout and random inputs make a resume depend on the RNG states and the data stream too."""

    losses: ClassVar[list[float]] = []  # every step's loss, in order, of the runs since the list was cleared

    def __init__(self, args: dict) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.1), nn.Linear(64, args.get("out", 1)))
        train = args.get("train", "head")
        if train != "all":
            self.model[0 if train == "head" else 2].requires_grad_(False)

    def batches(self, batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(batch_size, 8, generator=g)
            yield x, x.sum(1, keepdim=True)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y.expand(-1, model[2].out_features))
        self.losses.append(float(loss.detach()))
        return loss

    def export(self, model: nn.Module, directory: Path) -> None:
        pass


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """A config maker for the toy task (checkpoint every 2 steps, ema)."""
    monkeypatch.setitem(trainer.TASKS, "toy", _FrozenBase)
    _FrozenBase.losses = []

    def config(name: str, steps: int = 4, **task_args) -> trainer.TrainConfig:
        return trainer.TrainConfig(task="toy", output_dir=str(tmp_path / name), steps=steps, batch_size=4, lr=1e-2,
                                   warmup=1, checkpoint_every=2, ema=0.9, task_args=task_args)

    return config


def _whole_and_resumed(config, **task_args) -> tuple[Path, Path, list[float], list[float]]:
    """(output dirs, step losses) of a 4-step run, uninterrupted and stopped at step 2 then resumed."""
    whole = trainer.train(config("whole", **task_args))
    losses, _FrozenBase.losses = _FrozenBase.losses, []
    trainer.train(config("resumed", **task_args), max_steps_this_run=2)
    resumed = trainer.train(config("resumed", **task_args))
    return whole, resumed, losses, _FrozenBase.losses


def test_a_partly_frozen_model_checkpoints_its_trainable_weights_alone(toy):
    whole, resumed, losses, resumed_losses = _whole_and_resumed(toy)
    checkpoint = whole / "checkpoint-4"
    assert _names(checkpoint / WEIGHTS) == {"2.weight", "2.bias"}  # the head; not the base's 0.weight, 0.bias
    assert _names(checkpoint / trainer.WeightAverage.FILE) == {"2.weight", "2.bias"}
    optimiser = torch.load(checkpoint / "optimizer.bin", weights_only=True)
    assert len(optimiser["state"]) == 2  # AdamW's moments of the two trainable tensors
    base_bytes = (8 * 64 + 64) * 4
    assert (checkpoint / WEIGHTS).stat().st_size < base_bytes / 2
    # stopped at step 2 and resumed: the same losses and the same weights, bit for bit
    assert len(losses) == 4 and resumed_losses == losses
    for name in (WEIGHTS, trainer.WeightAverage.FILE):
        assert _equal_files(checkpoint / name, resumed / "checkpoint-4" / name), name
    assert not _equal_files(whole / "checkpoint-2" / WEIGHTS, checkpoint / WEIGHTS)  # the head trained


def test_a_model_trained_whole_is_checkpointed_whole_and_resumes(toy):
    whole, resumed, losses, resumed_losses = _whole_and_resumed(toy, train="all")
    assert _names(whole / "checkpoint-4" / WEIGHTS) == set(_FrozenBase({}).model.state_dict())
    assert len(losses) == 4 and resumed_losses == losses
    for name in (WEIGHTS, trainer.WeightAverage.FILE):
        assert _equal_files(whole / "checkpoint-4" / name, resumed / "checkpoint-4" / name), name


def test_a_checkpoint_of_the_whole_model_written_before_still_resumes(toy, monkeypatch):
    """Checkpoints written before this change held the whole model: it is loaded whole, as it was then."""
    whole = trainer.train(toy("whole"))
    losses, _FrozenBase.losses = _FrozenBase.losses, []
    with monkeypatch.context() as old:
        old.setattr(trainer, "_keep_trainable", lambda models, weights, output_dir: None)  # as accelerate writes it
        trainer.train(toy("old"), max_steps_this_run=2)
    assert _names(whole.parent / "old" / "checkpoint-2" / WEIGHTS) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    resumed = trainer.train(toy("old"))
    assert _FrozenBase.losses == losses
    assert _equal_files(whole / "checkpoint-4" / WEIGHTS, resumed / "checkpoint-4" / WEIGHTS)


@pytest.mark.parametrize("changed, message", [
    ({"train": "base"}, "this model's trainable weights are missing, e.g. '0.bias'"),
    ({"out": 2}, "'2.weight' has shape (1, 64), this model's (2, 64)"),
])
def test_a_checkpoint_whose_trainable_weights_do_not_fit_is_one_line(toy, changed, message):
    trainer.train(toy("run"), max_steps_this_run=2)
    with pytest.raises(ValueError) as error:
        trainer.train(toy("run", **changed))
    text = str(error.value)
    assert "\n" not in text and message in text and "checkpoint-2" in text and "task_args" in text, text


# ---- a LoRA on the demo model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    prepare(_clip_folder(root / "videos", clips=2), root / "prepared", "tiny", resolution=SIZE, progress=False)
    return root / "prepared"


@pytest.mark.parametrize("fp8_base", [False, True])
def test_a_lora_checkpoint_holds_the_adapter_alone_and_resumes_bit_identically(demo_data, tmp_path, monkeypatch, fp8_base):
    args = {"dataset": str(demo_data), "rank": 4, "alpha": 8, "dropout": 0.1, "fp8_base": fp8_base}
    losses: list[float] = []
    plain_loss = UserTask.loss

    def recorded(self, model, batch):
        loss = plain_loss(self, model, batch)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(UserTask, "loss", recorded)

    def config(name: str) -> trainer.TrainConfig:
        return trainer.TrainConfig(task="lora", output_dir=str(tmp_path / name), steps=4, batch_size=2, lr=1e-2,
                                   warmup=1, checkpoint_every=2, seed=3, ema=0.9, task_args=args)

    whole = trainer.train(config("whole"))
    whole_losses = losses[:]
    losses.clear()
    trainer.train(config("resumed"), max_steps_this_run=2)
    resumed = trainer.train(config("resumed"))

    model = UserTask(args, "lora").model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for step in (2, 4):
        checkpoint = whole / f"checkpoint-{step}"
        assert _names(checkpoint / WEIGHTS) == trainable  # no tensor of the frozen base
        assert _names(checkpoint / trainer.WeightAverage.FILE) == trainable
    base_bytes = sum(p.numel() * p.element_size() for p in frozen.values())
    size = (whole / "checkpoint-4" / WEIGHTS).stat().st_size
    assert size * 10 < base_bytes, (size, base_bytes)  # 0.55 MB of adapter for 31 MB of base (fp32)
    # stopped at step 2 and resumed: the same losses, the same LoRA weights and average, bit for bit
    assert len(whole_losses) == 4 and losses == whole_losses
    for name in (WEIGHTS, trainer.WeightAverage.FILE):
        assert _equal_files(whole / "checkpoint-4" / name, resumed / "checkpoint-4" / name), name
    assert any(n.endswith("lora_B.default.weight") and t.abs().sum() > 0
               for n, t in load_file(str(resumed / "checkpoint-4" / WEIGHTS)).items())  # trained: B starts at zero


def test_a_lora_checkpoint_resumed_as_a_fine_tune_is_one_line(demo_data, tmp_path):
    lora = {"dataset": str(demo_data), "rank": 2}
    config = trainer.TrainConfig(task="lora", output_dir=str(tmp_path / "run"), steps=4, batch_size=2, lr=1e-2,
                                 warmup=1, checkpoint_every=2, task_args=lora)
    trainer.train(config, max_steps_this_run=2)
    for task, args, message in (("finetune", {"dataset": str(demo_data)}, "weights this model does not have"),
                                ("lora", {**lora, "rank": 4}, "has shape (2, ")):
        with pytest.raises(ValueError) as error:
            trainer.train(trainer.TrainConfig(**{**config.__dict__, "task": task, "task_args": args}))
        text = str(error.value)
        assert "\n" not in text and message in text and "lora_A.default.weight" in text and "task_args" in text, text
