"""Training on the second world (issue 18, point 3 groundwork): ``world_start`` in the framepack and
VAE tasks, training on the ``train`` split only, and a latent cache that knows its world."""

from __future__ import annotations

import itertools
import json

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
