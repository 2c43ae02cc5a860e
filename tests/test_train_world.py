"""Training on the second world (issue 18, point 3 groundwork): ``world_start`` in the framepack and
VAE tasks, training on the ``train`` split only, and a latent cache that knows its world."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import TINY, _tiny_framepack_args

from framepack import trainer
from framepack.train import vae_task, world
from framepack.train.framepack_task import training_mirror


def _replayed_cache_scenes(n: int, start: str) -> list[tuple[world.WorldParams, int]]:
    """What the cache's scenes are by construction: the first ``n`` of the training stream of seed
    0, each with a start frame drawn from its own seed-0 generator (every clip at t = 0 here)."""
    rng = np.random.default_rng(0)
    return [(p, int(rng.integers(0, 1))) for p in itertools.islice(world.stream(0, start), n)]


def test_default_world_draws_the_first_worlds_clips(tmp_path):
    """Without ``world_start`` the task draws exactly the first world's clips (the shipped model's
    configs reproduce their data): the cache's scenes, fresh renders and mirrors alike."""
    args = _tiny_framepack_args(tmp_path)
    default = trainer.TASKS["framepack"]({**args, "clips": 60})
    assert default.world_start == "by-motion"
    assert list(default._cache_scenes()) == _replayed_cache_scenes(60, "by-motion")
    fresh = trainer.TASKS["framepack"](args)
    captions = [c for _, (_, _, c) in zip(range(4), fresh._clips(np.random.default_rng(0), 3))]
    assert captions == [world.caption(p) for p in itertools.islice(world.stream(3, "by-motion"), 4)]
    # the first world's mirrors are excluded by its single held-out bucket, as before
    rng = np.random.default_rng(5)
    scenes = [world.sample_params(rng) for _ in range(3000)]
    excluded = [p for p in scenes if world.mirror(p) is not None and world.is_held_out(world.mirror(p))]
    assert excluded  # so the comparison below can fail
    assert all(training_mirror(p) == (None if (m := world.mirror(p)) is None or world.is_held_out(m) else m)
               for p in scenes)


def test_independent_world_trains_on_its_train_split_only(tmp_path):
    """``world_start: "independent"`` draws the new world's training stream (centres in the central
    region whatever the motion), never a validation or test scene, and drops mirrors that fall in
    a held-out split of that world."""
    args = {**_tiny_framepack_args(tmp_path), "world_start": "independent", "mirror": True}
    task = trainer.TASKS["framepack"]({**args, "clips": 400})
    scenes = list(task._cache_scenes())
    assert scenes == _replayed_cache_scenes(400, "independent")
    assert all(world.split_of(p, "independent") == "train" for p, _ in scenes)
    low, high = world.CENTRAL
    assert all(low <= p.x <= high and low <= p.y <= high for p, _ in scenes)
    first = [p for p, _ in _replayed_cache_scenes(400, "by-motion")]
    assert not all(low <= p.x <= high and low <= p.y <= high for p in first)  # the first world's do not

    mirrored = [m for m, _ in task._mirror_scenes()]
    assert all(world.split_of(m, "independent") == "train" for m in mirrored)
    held_out = [p for p, _ in scenes if (m := world.mirror(p)) is not None and world.split_of(m, "independent") != "train"]
    assert held_out and all(training_mirror(p, "independent") is None for p in held_out)
    assert len(mirrored) == sum(p.motion != "rotate" for p, _ in scenes) - len(held_out)

    fresh = trainer.TASKS["framepack"](args)
    stream = world.stream(0, "independent")
    for p, (_, _, caption) in zip(stream, itertools.islice(fresh._clips(np.random.default_rng(0), 0), 12)):
        allowed = {world.caption(p)} | ({world.caption(m)} if (m := training_mirror(p, "independent")) else set())
        assert caption in allowed
    with pytest.raises(ValueError, match="world_start"):
        trainer.TASKS["framepack"]({**args, "world_start": "centred"})
    with pytest.raises(ValueError, match="mirror"):  # its bounces head one way: a mirror is not of that world
        trainer.TASKS["framepack"]({**args, "world_start": "determined"})
    determined = trainer.TASKS["framepack"]({**args, "world_start": "determined", "mirror": False, "clips": 40})
    assert [p for p, _ in determined._cache_scenes()] == [p for p, _ in _replayed_cache_scenes(40, "determined")]


def test_latent_cache_records_its_world(tmp_path):
    """A cache built from one world is rebuilt, not reused, by a task of the other; a cache written
    before ``world_start`` existed counts as the first world's."""
    args = {**_tiny_framepack_args(tmp_path), "clips": 2, "cache": str(tmp_path / "clips.safetensors")}
    meta = tmp_path / "clips.meta.json"
    first = trainer.TASKS["framepack"](args)
    latents, captions = first._load_or_build_cache()
    assert json.loads(meta.read_text())["world_start"] == "by-motion"

    second = trainer.TASKS["framepack"]({**args, "world_start": "independent"})
    assert second._read_cache(tmp_path / "clips.safetensors")[0] is None
    new_latents, new_captions = second._load_or_build_cache()
    assert new_captions == [world.caption(p) for p, _ in _replayed_cache_scenes(2, "independent")]
    torch.testing.assert_close(new_latents[:1].float(), second._encode_clip(next(second._cache_scenes())[0], 0),
                               atol=2e-3, rtol=2e-3)
    assert json.loads(meta.read_text())["world_start"] == "independent"

    again, again_captions = first._load_or_build_cache()  # back to the first world: rebuilt again
    assert again_captions == captions and torch.equal(again, latents)
    meta.write_text(json.dumps({"start_frames": 1}))  # as the caches of the shipped model's runs were written
    assert torch.equal(first._read_cache(tmp_path / "clips.safetensors")[0], latents)
    assert second._read_cache(tmp_path / "clips.safetensors")[0] is None


def test_vae_task_world_start():
    """The VAE task trains on the chosen world's training stream and measures on its validation
    split; by default the first world's stream and fixed held-out set, as before."""
    def first_batch(task_args: dict) -> torch.Tensor:
        return next(trainer.TASKS["vae"]({**TINY, **task_args}).batches(2, seed=4))

    def replayed(start: str) -> torch.Tensor:
        return vae_task.clip_batch(np.random.default_rng(4), world.stream(4, start), 2, TINY["groups"], TINY["size"])

    assert torch.equal(first_batch({}), replayed("by-motion"))
    assert torch.equal(first_batch({"world_start": "independent"}), replayed("independent"))
    assert not torch.equal(replayed("independent"), replayed("by-motion"))
    assert vae_task.held_out_scenes(4) == world.held_out(4)
    assert all(world.split_of(p, "independent") == "validation" for p in vae_task.held_out_scenes(4, "independent"))
    with pytest.raises(ValueError, match="world_start"):
        trainer.TASKS["vae"]({**TINY, "world_start": "centred"})


GEN2 = ("gen2_vae", "gen2_vae_smooth", "gen2_framepack", "gen2_framepack_long")  # the chain, in order (docs/training-gen2.md)
# runs that start from the chain's shipped result: the student (tests/test_distill.py) and fine-tunes
GEN2_AFTER = ("gen2_student", "gen2_student3", "gen2_student4", "gen2_student5", "gen2_finetune_rotate", "gen2_framepack_far",
              "gen2_framepack_determined", "gen2_framepack_det_far")
REPO = Path(__file__).resolve().parents[1]


def _tiny_stage(name: str, root: Path) -> trainer.TrainConfig:
    """configs/NAME.json with its architecture, world and options kept, and the cost cut: 32 px,
    2 clips, 2 steps of batch 2, a checkpoint every step; its runs/ paths (outputs, caches, the
    previous stage's exports) under ``root``, so the stages chain as they will for real."""
    data = json.loads((REPO / "configs" / f"{name}.json").read_text())

    def place(value):
        if isinstance(value, str) and value.startswith("runs/"):
            return str(root / value)
        if isinstance(value, str) and value.startswith("src/"):
            return str(REPO / value)  # the shipped components a stage starts from
        return value

    args = {k: place(v) for k, v in data["task_args"].items()}
    if data["task"] == "vae":
        args.update(size=32, crop=32, groups=1)
    else:
        args.update(size=32, clips=2)
    data.update(output_dir=place(data["output_dir"]), steps=2, batch_size=2, warmup=1, checkpoint_every=1, task_args=args)
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return trainer.TrainConfig.load(path)  # the loader `framepack train` uses


def test_gen2_configs_start_checkpoint_resume_and_chain(tmp_path):
    """Every configs/gen2_*.json is a stage of the documented chain; each, cut to tiny cost, trains
    on the new world, checkpoints, stops, resumes where it stopped and exports what the next stage
    starts from (the real transformer architecture, the previous stage's VAE and weights)."""
    chain = sorted(p.stem for p in (REPO / "configs").glob("gen2_*.json") if p.stem not in GEN2_AFTER)
    assert chain == sorted(GEN2)
    for name in GEN2:
        config = _tiny_stage(name, tmp_path)
        assert config.task_args["world_start"] == "independent"
        out = Path(config.output_dir)
        trainer.train(config, max_steps_this_run=1)
        assert trainer.latest_checkpoint(out).name == "checkpoint-1" and not (out / "final").exists()
        assert (out / "checkpoint-1" / trainer.WeightAverage.FILE).exists() == bool(config.ema)
        trainer.train(config)  # resumes at step 1
        assert [json.loads(line)["step"] for line in (out / "loss.log").read_text().splitlines()] == [1, 2]
        assert (out / "final").is_dir()
    from framepack import FramePackTransformer

    base, long = (FramePackTransformer.from_pretrained(tmp_path / "runs" / run / "final").config
                  for run in ("gen2-framepack", "gen2-framepack-long"))
    assert base == long and base.num_attention_heads == 6  # the larger transformer, carried into the curriculum
    assert json.loads((tmp_path / "runs" / "gen2-vae" / "final" / "metrics.json").read_text())["psnr_db"] > 0
    # the smoothing stage: the VAE's decoder reads the previous latent, over the same latents
    from framepack.small_vae import SmallVideoAutoencoder

    vae, smooth = (SmallVideoAutoencoder.from_pretrained(tmp_path / "runs" / run / "final")
                   for run in ("gen2-vae", "gen2-vae-smooth"))
    assert smooth.config.decoder_context == 1
    assert smooth.config.scaling_factor == vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(vae.encoder.parameters(), smooth.encoder.parameters(), strict=True))

    # model selection: the stage's export packaged into a model directory, measured on the validation split
    from framepack.train import package

    runs = tmp_path / "runs"
    model = runs / "gen2-model"
    assert package.main(["--out", str(model), "--transformer", str(runs / "gen2-framepack-long"),
                         "--transformer-runs", str(runs / "gen2-framepack"), str(runs / "gen2-framepack-long"),
                         "--vae", str(runs / "gen2-vae-smooth"), "--vae-runs", str(runs / "gen2-vae"),
                         str(runs / "gen2-vae-smooth"),
                         "--text", str(REPO / "src/framepack/assets/tiny/text"), "--cfg", "3"]) == 0
    framepack = str(Path(sys.executable).with_name("framepack"))
    out = subprocess.run([framepack, "eval", "--model", str(model), "--split", "validation", "--start-frames", "1",
                          "--long-videos", "0", "--caption-seconds", "0.5", "--steps", "1",
                          "--json", str(tmp_path / "eval.json")], check=False, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "validation split" in out.stdout and str(model) in out.stdout
    trials = json.loads((tmp_path / "eval.json").read_text())["summary"]["caption_control"]["trials"]
    assert trials == len(world.applicable_motions(world.scenes("validation", 1)[0]))


@pytest.mark.parametrize("name", ["gen2_finetune_rotate", "gen2_framepack_determined"])
def test_gen2_finetunes_start_from_the_shipped_teacher(tmp_path, name):
    """The fine-tune configs, cut to tiny cost, start from the shipped transformer (the same
    architecture: a mismatch is refused), draw their world and motions and export a transformer."""
    config = _tiny_stage(name, tmp_path)
    assert config.task_args["init"] == str(REPO / "src/framepack/assets/tiny/transformer")
    assert set(config.task_args.get("motion_weights", {})) <= set(world.MOTIONS)
    assert config.task_args["world_start"] in world.STARTS
    trainer.train(config)
    from framepack import FramePackTransformer

    shipped = FramePackTransformer.from_pretrained(REPO / "src/framepack/assets/tiny/transformer")
    tuned = FramePackTransformer.from_pretrained(Path(config.output_dir) / "final")
    # the same architecture; the gap rule of long inverted videos is the config's (the shipped model's is its own)
    assert tuned.config.same_architecture(shipped.config)


def test_the_far_determined_fine_tune_continues_the_determined_one(tmp_path):
    """gen2_framepack_det_far, cut to tiny cost, starts from the determined fine-tune's export,
    trains on the same world with the longer clips, and exports the same architecture told gaps
    up to 9 windows (docs/training-gen2.md)."""
    first = _tiny_stage("gen2_framepack_determined", tmp_path)
    trainer.train(first)
    far = _tiny_stage("gen2_framepack_det_far", tmp_path)
    assert far.task_args["init"] == str(Path(first.output_dir) / "final")
    assert far.task_args["world_start"] == first.task_args["world_start"] == "determined"
    assert far.task_args["sections"] > far.task_args["config"]["max_inverted_padding"]  # capped gaps with later sections
    trainer.train(far)
    from framepack import FramePackTransformer

    before, after = (FramePackTransformer.from_pretrained(Path(c.output_dir) / "final").config for c in (first, far))
    assert after.same_architecture(before)
    assert (before.max_inverted_padding, after.max_inverted_padding) == (3, 9)
