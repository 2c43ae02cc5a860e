"""Training on several processes (issue 19.3): the same global batch gives the same weights whether
it is split over processes or over gradient-accumulation steps, a run resumes with another process
count, and the accelerate configs in configs/accelerate/ parse into what the docs say they do.

The multi-process runs are real ``accelerate launch`` runs of ``framepack train`` with 2 CPU
processes (gloo), on the tiny framepack task of tests/test_train.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file
from test_train import _LineFit
from ui_slow_server import free_port

from framepack import trainer

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ACCELERATE = REPO / "configs" / "accelerate"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # the exported transformer (averaged: ema > 0)
TOLERANCE = 1e-5


def _write_config(root: Path, name: str, task_args: dict, **changes) -> Path:
    """A 4-step run of the tiny framepack task: global batch 4, a checkpoint every 2 steps, ema."""
    config = {"task": "framepack", "output_dir": str(root / name), "steps": 4, "batch_size": 4, "lr": 1e-3,
              "warmup": 1, "checkpoint_every": 2, "ema": 0.9, "task_args": task_args, **changes}
    path = root / f"{name}-{changes.get('gradient_accumulation', 1)}.json"
    path.write_text(json.dumps(config))
    return path


def _train(config: Path, processes: int, *options: str) -> subprocess.CompletedProcess:
    """``framepack train CONFIG`` as one process, or under ``accelerate launch`` as several."""
    command = [str(BIN / "framepack"), "train", str(config), *options]
    if processes > 1:
        command = [str(BIN / "accelerate"), "launch", "--config_file", str(ACCELERATE / "ddp.yaml"),
                   "--num_processes", str(processes), "--main_process_port", str(free_port()),
                   "-m", "framepack", *command[1:]]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=run_env, cwd=REPO, check=False)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def _max_difference(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert set(x) == set(y)
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "loss.log").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict, Path]:
    """(root, task_args, run): the uninterrupted run on 2 processes, no accumulation."""
    from test_train import _tiny_framepack_args

    root = tmp_path_factory.mktemp("scale")
    # from a latent cache (cheaper than rendering every batch), built by the 2-process run (the
    # trainer has the main process draw the first batch first; a race is not provoked here)
    args = {**_tiny_framepack_args(root), "clips": 6, "cache": str(root / "clips.safetensors")}
    _ok(_train(_write_config(root, "two", args), 2))
    return root, args, root / "two"


def test_two_processes_equal_one_process_accumulating(reference):
    root, args, two = reference
    # the main process alone wrote the run's files; each process its own RNG state
    assert sorted(p.name for p in (two / "checkpoint-4").glob("random_states_*.pkl")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert [e["step"] for e in _log(two)] == [2, 4]

    _ok(_train(_write_config(root, "one", args, gradient_accumulation=2), 1))
    one = root / "one"
    for name in ("checkpoint-4/model.safetensors", f"final/{WEIGHTS}"):  # the last weights and the exported average
        assert _max_difference(one / name, two / name) <= TOLERANCE, name
    # the loss logged is the global batch's, the same on both
    assert all(abs(a["loss"] - b["loss"]) <= TOLERANCE for a, b in zip(_log(one), _log(two)))
    # and the tolerance is meaningful: two steps move the weights far more than it
    moved = _max_difference(two / "checkpoint-2/model.safetensors", two / "checkpoint-4/model.safetensors")
    assert moved > 100 * TOLERANCE


def test_resume_after_the_process_count_changed(reference):
    """The 2-process run's checkpoint at step 2, finished by 1 process accumulating 2 micro-batches:
    the weights equal the uninterrupted 2-process run's (the second process's RNG state file is
    not needed, since every draw is seeded by (seed, step, part)). A run stopped at step 2 writes
    the same checkpoint (test_train covers stopping); copying it saves a launch."""
    root, args, two = reference
    switch = root / "switch"
    shutil.copytree(two / "checkpoint-2", switch / "checkpoint-2")
    assert (switch / "checkpoint-2" / "random_states_1.pkl").exists()
    _ok(_train(_write_config(root, "switch", args, gradient_accumulation=2), 1))
    assert [p.name for p in (switch / "checkpoint-4").glob("random_states_*.pkl")] == ["random_states_0.pkl"]
    assert [e["step"] for e in _log(switch)] == [4]
    for name in ("checkpoint-4/model.safetensors", "checkpoint-4/ema.safetensors", f"final/{WEIGHTS}"):
        assert _max_difference(switch / name, two / name) <= TOLERANCE, name


def test_a_batch_that_does_not_split_is_one_line(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"task": "framepack", "output_dir": str(tmp_path / "run"), "steps": 2,
                                  "batch_size": 3, "gradient_accumulation": 2, "task_args": {}}))
    result = _train(config, 1)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch_size 3" in lines[0] and "multiple of 2" in lines[0], result.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_launches_that_cannot_run_as_asked_are_refused(monkeypatch):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    config = trainer.TrainConfig(task="framepack", output_dir="x", steps=1, ema=0.9)
    single = SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO)
    trainer._check_parallelism(single, config)  # a plain single process is fine
    monkeypatch.setenv("WORLD_SIZE", "2")  # launched as 2, but accelerate did not join them
    with pytest.raises(ValueError, match="launched as 2 processes but accelerate joined 1"):
        trainer._check_parallelism(single, config)
    monkeypatch.setenv("WORLD_SIZE", "1")
    # FSDP asked for (what `accelerate launch` with fsdp_13b.yaml sets) where accelerate quietly runs
    # without it (no GPU: MULTI_CPU is plain DDP): refused rather than trained as something else
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for kind in (DistributedType.NO, DistributedType.MULTI_CPU):
        with pytest.raises(ValueError, match="asks for FSDP"):
            trainer._check_parallelism(SimpleNamespace(num_processes=1, distributed_type=kind), config)
    sharded = SimpleNamespace(num_processes=1, distributed_type=DistributedType.FSDP)
    with pytest.raises(ValueError, match="ema and validate_every"):
        trainer._check_parallelism(sharded, config)
    trainer._check_parallelism(sharded, trainer.TrainConfig(task="framepack", output_dir="x", steps=1))


class _Line(_LineFit):
    """test_train's line fit, recording its validation calls."""

    calls: ClassVar[list[tuple[int, bool, bool, dict, Path]]] = []

    def validate(self, model, step, directory):
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        self.calls.append((step, model.training, torch.is_grad_enabled(), weights, directory))


def test_validate_hook_gets_the_average_every_n_steps(tmp_path, monkeypatch):
    monkeypatch.setitem(trainer.TASKS, "line", _Line)
    monkeypatch.setattr(_Line, "calls", [])
    config = trainer.TrainConfig(task="line", output_dir=str(tmp_path / "run"), steps=6, batch_size=16, lr=0.1,
                                 warmup=1, checkpoint_every=2, keep_checkpoints=3, ema=0.9, validate_every=2)
    trainer.train(config)
    assert [c[0] for c in _Line.calls] == [2, 4, 6]
    for step, training, grad, weights, directory in _Line.calls:
        assert not training and not grad and directory == tmp_path / "run" / "validation" and directory.is_dir()
        average = load_file(str(tmp_path / "run" / f"checkpoint-{step}" / trainer.WeightAverage.FILE))
        last = load_file(str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
        assert all(torch.equal(weights[k], average[k]) for k in weights)  # the average, not the last step
        assert not torch.equal(weights["weight"], last["weight"])
    with pytest.raises(ValueError, match="validate_every"):
        trainer.TrainConfig(task="line", output_dir="x", steps=1, validate_every=-1)


def test_batch_slice_cuts_every_per_sample_tensor():
    from framepack.model.inputs import HistoryInput
    from framepack.train.framepack_task import Batch

    b = 4
    history = [HistoryInput((1, 2, 2), torch.arange(b * 2.0).view(b, 2), torch.arange(b * 3).view(b, 3))]
    batch = Batch(torch.arange(b * 5.0).view(b, 5), torch.arange(b * 2).view(b, 2), history,
                  torch.zeros(b, 7, 3), torch.ones(b, 7, dtype=torch.bool), torch.zeros(b, 6))
    parts = [trainer.batch_slice(batch, b, i, i + 2) for i in (0, 2)]
    for field in ("target", "window", "text", "mask", "pooled"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field))
    assert all(p.history[0].kernel == (1, 2, 2) and p.history[0].latents.shape == (2, 2) for p in parts)
    assert torch.equal(parts[1].history[0].indices, batch.history[0].indices[2:])
    assert parts[0].weight is None
    with pytest.raises(ValueError, match="multiple of 6"):
        trainer.micro_batch_size(8, 3, 2)
    assert trainer.micro_batch_size(8, 2, 2) == 2


def test_accelerate_configs_parse_into_the_documented_plugins(monkeypatch):
    """Each YAML goes through accelerate's own launcher parsing into the environment it hands the
    processes; the FSDP plugin built from that environment wraps block classes the model has."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name
    from accelerate.utils.launch import prepare_multi_gpu_env

    from framepack import FramePackTransformer
    from framepack.config import resolve_config

    def launch_env(name: str) -> dict[str, str]:
        args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE / name), "train.py"])
        args, _, _ = _validate_launch_command(args)
        return prepare_multi_gpu_env(args)

    ddp = launch_env("ddp.yaml")
    assert ddp.get("ACCELERATE_USE_FSDP", "false") == "false" and ddp["ACCELERATE_MIXED_PRECISION"] == "no"

    fsdp = launch_env("fsdp_13b.yaml")
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in fsdp.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.activation_checkpointing and plugin.reshard_after_forward
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    model = FramePackTransformer(resolve_config("tiny"))
    for name in plugin.transformer_cls_names_to_wrap:
        assert get_module_class_from_name(model, name) is not None, name

    from accelerate.commands.config.config_args import load_config_from_file

    zero3 = load_config_from_file(str(ACCELERATE / "deepspeed_zero3.yaml"))
    assert zero3.distributed_type.value == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
