"""Training tasks "lora" and "finetune" (issue 19.2) on folders made by ``framepack dataset prepare``.

Datasets: a few clips of the demo world rendered to mp4 + .txt at 64 px, prepared with the demo
model ("tiny") and with a tiny random model in the 13B layout (tests/tiny_hub.py: SigLIP image
embeddings, distilled guidance, HunyuanVideo's VAE). Tiny sizes, a few steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack import trainer
from framepack.lora import linear_shapes, read_lora
from framepack.model import FramePackTransformer
from framepack.planning import START, plan_sections
from framepack.train import user_task, world
from framepack.train.dataset import PreparedDataset, prepare
from framepack.train.user_task import LORA_FILE, UserTask, UserTaskConfig
from framepack.video import read_frames, write_segment

SIZE = 64  # pixels: 8x8 latents
CLIP_FRAMES = 37  # 1 + 4 * 9: ten latents, one section of the default window
SHORT_FRAMES = 9  # three latents: shorter than a section
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _clip_folder(root: Path, clips: int = 3) -> Path:
    """``clips`` world clips of CLIP_FRAMES, one of SHORT_FRAMES and a still image, each with its caption."""
    from PIL import Image

    root.mkdir(parents=True)
    scenes = world.stream(7)
    for i in range(clips + 1):
        params = next(scenes)
        frames = world.render(params, CLIP_FRAMES if i < clips else SHORT_FRAMES, size=SIZE)
        write_segment(root / f"clip{i}.mp4", frames, crf=10)
        (root / f"clip{i}.txt").write_text(world.caption(params))
    params = next(scenes)
    Image.fromarray(world.render(params, 1, size=SIZE)[0]).save(root / "still.png")
    (root / "still.txt").write_text(world.caption(params))
    return root


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo-data")
    prepare(_clip_folder(root / "videos"), root / "prepared", "tiny", resolution=SIZE, progress=False)
    return root / "prepared"


@pytest.fixture(scope="module")
def hub_data(tmp_path_factory) -> Path:
    """A dataset prepared with a tiny model in the 13B layout (image encoder, guidance embedder)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_hub import write_model_dir

    root = tmp_path_factory.mktemp("hub-data")
    model, _ = write_model_dir(root / "model", resolution=SIZE)
    prepare(_clip_folder(root / "videos", clips=2), root / "prepared", str(model), resolution=SIZE, progress=False)
    return root / "prepared"


def _config(out: Path, task: str, steps: int, **task_args) -> trainer.TrainConfig:
    return trainer.TrainConfig(task=task, output_dir=str(out), steps=steps, batch_size=2, lr=1e-2, warmup=1,
                               checkpoint_every=2, seed=3, task_args=task_args)


def _lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- sections and layouts ------------------------------------------------------------------------------------


def test_default_targets_are_the_blocks_attention_and_feed_forward():
    model = user_task.add_lora(FramePackTransformer("tiny"), UserTaskConfig(dataset="unused"))
    wrapped = {name for name, m in model.named_modules() if hasattr(m, "lora_A")}
    cfg = model.config
    assert len(wrapped) == cfg.num_layers * len(user_task.DUAL_TARGETS) + cfg.num_single_layers * len(user_task.SINGLE_TARGETS)
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in wrapped)
    assert not any(".norm" in n or "context_embedder" in n for n in wrapped)  # modulation and text refiner untouched
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # base weights frozen


def test_batches_are_planned_sections_of_one_bucket(demo_data):
    task = UserTask({"dataset": str(demo_data), "layouts": {"inverted": 3, "vanilla": 1}}, "lora")
    data = PreparedDataset(demo_data)
    assert all(data.sample(m[0]).latents.shape[1] >= 2 for m in task.buckets.values())  # the image is left out
    clips = {tuple(data.sample(i).latents.shape): [] for m in task.buckets.values() for i in m}
    for members in task.buckets.values():
        for i in members:
            clips[tuple(data.sample(i).latents.shape)].append(data.sample(i).latents)
    anchored = 0
    for batch in _take(task.batches(3, seed=5), 24):
        t = batch.target.shape[2]
        shape_clips = [c for (ch, frames, *_), cs in clips.items() for c in cs if min(frames - 1, 9) == t]
        for b in range(3):
            # the target is a window of consecutive latents after the start of one of the bucket's clips
            found = [c for c in shape_clips for s in range(1, c.shape[1] - t + 1)
                     if torch.equal(batch.target[b], c[:, s:s + t])]
            assert found, "a target that is no window of a clip"
            level = batch.history[0]
            if int(level.indices[b, 0]) == 0:  # inverted: the start anchor is the clip's first latent
                assert any(torch.equal(level.latents[b, :, 0], c[:, 0]) for c in found)
        anchored += int(batch.history[0].indices[0, 0]) == 0
    assert 12 <= anchored <= 23  # about 3 in 4 inverted (vanilla has no anchor at index 0), both seen


def test_short_clip_context_is_zeros_where_the_planner_has_nothing(demo_data):
    task = UserTask({"dataset": str(demo_data), "layouts": {"forward": 1}}, "lora")
    for batch in _take(task.batches(1, seed=0), 12):
        t = batch.target.shape[2]
        plan = plan_sections(1, "forward", task.model.config.schedule, t)[0]
        sources = plan.context_sources()
        slots = torch.cat([level.latents[0] for level in batch.history], dim=1)  # (C, slots, h, w)
        assert len(sources) == slots.shape[1] and sources.count(None) > len(sources) // 2
        for k, source in enumerate(sources):
            # a one-section clip has only its start latent (position 0) as context; the rest is blank
            assert source in (None, START, 0) and bool(slots[:, k].any()) == (source is not None)
            if source is not None:
                assert torch.equal(slots[:, k], slots[:, sources.index(START)])


def test_same_seed_same_stream_and_a_restart_continues_it(demo_data):
    task = UserTask({"dataset": str(demo_data), "layouts": {"inverted": 1, "forward": 1}}, "lora")
    whole = _take(task.batches(2, seed=100), 5)
    restarted = _take(task.batches(2, seed=103), 2)  # the trainer restarts a stream at step k with seed base + k
    for a, b in zip(whole[3:], restarted):
        assert torch.equal(a.target, b.target) and torch.equal(a.window, b.window)
    assert not torch.equal(whole[0].target, whole[1].target) or not torch.equal(whole[0].window, whole[1].window)


def test_text_dropout_trains_the_empty_prompt(demo_data):
    task = UserTask({"dataset": str(demo_data), "text_dropout": 0.5}, "lora")
    empty = task._components()["text"].encode("").pooled[0]
    dropped = [torch.equal(pooled, empty) for batch in _take(task.batches(4, seed=1), 4) for pooled in batch.pooled]
    assert 4 <= sum(dropped) <= 12  # about half of 16 samples


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---- training, export, resume ---------------------------------------------------------------------------------


def test_lora_resume_equals_uninterrupted(demo_data, tmp_path):
    args = {"dataset": str(demo_data), "layouts": {"inverted": 1, "forward": 1}, "rank": 4, "alpha": 8, "dropout": 0.1}
    whole = trainer.train(trainer.TrainConfig(**{**_config(tmp_path / "a", "lora", 4, **args).__dict__, "ema": 0.9}))
    config = trainer.TrainConfig(**{**_config(tmp_path / "b", "lora", 4, **args).__dict__, "ema": 0.9})
    trainer.train(config, max_steps_this_run=2)
    assert not (tmp_path / "b" / "final").exists()
    resumed = trainer.train(config)
    a, b = _lora_tensors(whole / "final" / LORA_FILE), _lora_tensors(resumed / "final" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith(".lora_B") and a[k].abs().sum() > 0 for k in a)  # trained: B starts at zero


def test_finetune_resume_equals_uninterrupted_and_exports_a_model(demo_data, tmp_path):
    args = {"dataset": str(demo_data), "gradient_checkpointing": True}
    whole = trainer.train(_config(tmp_path / "a", "finetune", 3, **args))
    config = _config(tmp_path / "b", "finetune", 3, **args)
    trainer.train(config, max_steps_this_run=2)
    resumed = trainer.train(config)
    a = FramePackTransformer.from_pretrained(whole / "final" / "transformer")
    b = FramePackTransformer.from_pretrained(resumed / "final" / "transformer")
    base = FramePackTransformer.from_pretrained(user_task.resolve_model("tiny").transformer)
    pairs = list(zip(a.state_dict().values(), b.state_dict().values(), base.state_dict().values()))
    assert all(torch.equal(x, y) for x, y, _ in pairs)
    assert sum(not torch.equal(x, z) for x, _, z in pairs) > len(pairs) // 2  # every weight trains
    manifest = json.loads((whole / "final" / "framepack.json").read_text())
    source = user_task.resolve_model(str(whole / "final"))
    assert manifest["transformer"] == "transformer" and source.vae == user_task.resolve_model("tiny").vae
    # the demo's world (its vocabulary and colours) is the base's, not the user's videos': no warnings from it
    assert "world" in user_task.resolve_model("tiny").extra and "world" not in manifest


def test_fp8_base_lora_trains_on_cpu(demo_data, tmp_path):
    from framepack.runtime.placement import FP8

    task = UserTask({"dataset": str(demo_data), "fp8_base": True, "rank": 2}, "lora")
    layer = task.model.transformer_blocks[0].attn.to_q
    assert layer.base_layer.weight.dtype == FP8
    shipped = FramePackTransformer.from_pretrained(user_task.resolve_model("tiny").transformer, dtype=torch.float32)
    full = shipped.transformer_blocks[0]
    # the base's own weights, within fp8's rounding (3 mantissa bits: 2**-4 of the largest at most)
    error = layer.base_layer.dequantized(torch.float32) - full.attn.to_q.weight
    assert 0 < error.abs().max() <= 2**-4 * full.attn.to_q.weight.abs().max()
    stored = layer.base_layer.weight.view(torch.uint8).clone()
    optimizer = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-2)
    for batch in _take(task.batches(2, seed=0), 2):
        loss = task.loss(task.model, batch)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(layer.base_layer.weight.view(torch.uint8), stored)  # the base stays as stored
    assert layer.lora_B["default"].weight.abs().sum() > 0
    task.export(task.model, tmp_path)
    weights = read_lora(tmp_path / LORA_FILE, linear_shapes(shipped))
    assert torch.equal(weights.layers["transformer_blocks.0.attn.to_q"].up, layer.lora_B["default"].weight.detach())


def test_13b_layout_with_image_embeddings_checkpointing_and_bf16(hub_data, tmp_path):
    args = {"dataset": str(hub_data), "gradient_checkpointing": True, "autocast": "bf16", "rank": 2, "text_dropout": 0.5}
    task = UserTask(args, "lora")
    assert task.model.config.has_image_proj and task.model.config.guidance_embeds
    batch = next(task.batches(2, seed=0))
    assert batch.image is not None and batch.image.shape[0] == 2
    loss = task.loss(task.model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in task.model.named_parameters() if "lora_B" in n)
    out = trainer.train(_config(tmp_path / "run", "lora", 2, **args))
    model = FramePackTransformer.from_pretrained(task.source.transformer)
    assert read_lora(out / "final" / LORA_FILE, linear_shapes(model)).layers


# ---- generation with the result ------------------------------------------------------------------------------------


def _generate(tmp: Path, name: str, *args: str) -> list[np.ndarray]:
    """Videos from ``framepack generate ARGS`` (one, or one per line of a --prompts file), in order."""
    image = tmp / "start.png"
    if not image.exists():
        from PIL import Image

        Image.fromarray(world.render(next(world.stream(11)), 1, size=SIZE)[0]).save(image)
    out = tmp / f"{name}.mp4"
    run = subprocess.run([sys.executable, "-m", "framepack", "generate", "--image", str(image), "--prompt",
                          "a red circle moves left", "--seconds", "0.3", "--steps", "3", "--resolution", str(SIZE),
                          "--seed", "1", "--cfg", "1", "--out", str(out), *args],
                         capture_output=True, text=True, env=ENV, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    made = [out] if out.exists() else sorted(tmp.glob(f"{name}-line*.mp4"))
    return [read_frames(path).astype(np.float32) for path in made]


def _merged_model_dir(checkpoint: Path, out: Path) -> Path:
    """The demo model with the checkpoint's PEFT layers merged by hand, W + (alpha / r) B A (Hu et
    al. 2021, eq. 3), read from PEFT's own parameter names (not from our export)."""
    from safetensors.torch import load_file

    state = load_file(str(checkpoint / "model.safetensors"))
    model = FramePackTransformer.from_pretrained(user_task.resolve_model("tiny").transformer, dtype=torch.float32)
    merged = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            down = state.get(f"{name}.lora_A.default.weight")
            if down is not None:
                up = state[f"{name}.lora_B.default.weight"]
                module.weight += (8 / down.shape[0]) * up @ down
                merged += 1
    assert merged
    model.save_pretrained(out / "transformer")
    source = user_task.resolve_model("tiny")
    (out / "framepack.json").write_text(json.dumps(user_task.finetuned_manifest(source, "transformer")))
    return out


def test_exported_lora_generates_as_the_merged_model(demo_data, tmp_path):
    """``framepack generate --lora FILE`` equals the base with the LoRA merged by hand, and differs from no LoRA."""
    config = _config(tmp_path / "run", "lora", 4, dataset=str(demo_data), rank=4, alpha=8)
    run = trainer.train(trainer.TrainConfig(**{**config.__dict__, "validate_every": 4}))
    assert read_frames(run / "validation" / "validation-4.mp4").shape[0] > 1  # the trainer's validation hook
    merged = _merged_model_dir(run / "checkpoint-4", tmp_path / "merged")
    jobs = tmp_path / "jobs.txt"  # the LoRA and none, one model load
    jobs.write_text(json.dumps({"loras": [[str(run / "final" / LORA_FILE), 1.0]]}) + "\n{}\n")
    with_lora, plain = _generate(tmp_path, "tiny", "--model", "tiny", "--prompts", str(jobs))
    (by_hand,) = _generate(tmp_path, "merged", "--model", str(merged))
    assert with_lora.shape == by_hand.shape == plain.shape
    assert np.abs(with_lora - by_hand).mean() < 0.5
    assert np.abs(with_lora - plain).mean() > 5 * max(np.abs(with_lora - by_hand).mean(), 0.1)


def test_validate_writes_a_video_from_the_first_clip(demo_data, tmp_path):
    task = UserTask({"dataset": str(demo_data), "validate_steps": 2}, "lora")
    task.model.train()  # as the trainer has it between steps
    task.validate(task.model, 7, tmp_path)
    frames = read_frames(tmp_path / "validation-7.mp4").astype(np.float32)
    data = PreparedDataset(demo_data)
    index = min(i for m in task.buckets.values() for i in m)
    start = _pixels(task, data.sample(index).latents[None, :, :1])
    assert frames.shape[1:] == start.shape
    # the video starts from the first clip's start frame: nearer to it than to any other clip's
    others = [data.sample(i).latents[None, :, :1] for m in task.buckets.values() for i in m if i != index]
    distance = [np.abs(frames[0] - _pixels(task, latent)).mean() for latent in others]
    assert np.abs(frames[0] - start).mean() < min(distance)
    assert task.model.training  # left as it was


def _pixels(task: UserTask, latent: torch.Tensor) -> np.ndarray:
    """One latent frame (1, C, 1, h, w) decoded by the model's VAE: (H, W, 3) in [0, 255]."""
    with torch.no_grad():
        pixels = task._components()["vae"].decode(latent.float())
    return ((pixels[0, :, 0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).numpy()


@pytest.mark.parametrize("name", ["lora_demo", "finetune_demo"])
def test_shipped_configs_load_and_build(demo_data, name):
    """configs/NAME.json loads as ``framepack train`` loads it, and its task builds on a prepared dataset."""
    config = trainer.TrainConfig.load(Path(__file__).resolve().parents[1] / "configs" / f"{name}.json")
    assert config.task == name.split("_")[0] and config.validate_every > 0
    task = trainer.TASKS[config.task]({**config.task_args, "dataset": str(demo_data)})
    assert torch.isfinite(task.loss(task.model, next(task.batches(2, seed=0))))


# ---- bad configs ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, words", [
    ({"layouts": {"sideways": 1}}, "unknown layouts"),
    ({"layouts": {"inverted": 0}}, "positive sum"),
    ({"autocast": "fp16"}, "autocast"),
    ({"rnak": 4}, "unknown task_args"),
    ({"text_dropout": 1.0}, "text_dropout"),
    ({"validate_seconds": 0}, "validate_seconds"),
    ({"lora_format": "kohya"}, "lora_format"),
])
def test_bad_task_args_name_the_problem(args, words):
    with pytest.raises(ValueError, match=words):
        UserTaskConfig.from_args({"dataset": "d", **args}, "lora")


def test_target_modules_that_name_no_layer_are_one_line():
    with pytest.raises(ValueError, match="names no layer") as caught:
        user_task.add_lora(FramePackTransformer("tiny"), UserTaskConfig(dataset="d", target_modules=["to_qq"]))
    assert "\n" not in str(caught.value)


def test_cli_refuses_lora_options_for_finetune_in_one_line(demo_data, tmp_path):
    config = tmp_path / "config.json"
    out = tmp_path / "run"
    config.write_text(json.dumps({"task": "finetune", "output_dir": str(out), "steps": 2,
                                  "task_args": {"dataset": str(demo_data), "rank": 4}}))
    run = subprocess.run([sys.executable, "-m", "framepack", "train", str(config)], capture_output=True, text=True,
                         env=ENV, timeout=120, check=False)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank" in lines[0] and "lora" in lines[0] and "Traceback" not in run.stderr
    assert not (out / "final").exists() and not list(out.glob("checkpoint-*"))
