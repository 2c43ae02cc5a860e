"""The blink concept of the LoRA proof (issue 19.5): the detector against ground-truth renders, and
the user's folder the benchmark script renders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.train import concept, world
from framepack.video import read_frames, write_segment

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 37  # one section of the demo model, what the proof generates


def held_out_scenes(n: int) -> list[world.WorldParams]:
    return world.scenes("validation", n, start="independent") + world.scenes("test", n, start="independent")


def rgb(p: world.WorldParams) -> world.RGB:
    return world.PALETTE[p.color]


def test_the_detector_finds_every_rendered_blink_also_after_mp4_encoding(tmp_path: Path) -> None:
    scenes = held_out_scenes(8)
    for p in scenes:
        found = concept.detect_blink(concept.render(p, FRAMES), rgb(p))
        assert found.detected and found.hidden <= 0.05 and found.back >= 0.9, (p, found)
    p = scenes[0]
    write_segment(tmp_path / "blink.mp4", concept.render(p, FRAMES))
    assert concept.detect_blink(read_frames(tmp_path / "blink.mp4"), rgb(p)).detected
    # From the next cycle on (the detector reads the start frame's object: it must show) and at another resolution.
    assert concept.detect_blink(concept.render(p, FRAMES, start=25), rgb(p)).detected
    assert concept.detect_blink(concept.render(p, FRAMES, size=96), rgb(p)).detected


def test_the_detector_never_fires_on_the_worlds_own_motions() -> None:
    """Every motion the world shows from held-out start frames, from the start and later on (a pan
    carries the object out of view, and it never comes back)."""
    checked = 0
    for p in held_out_scenes(6):
        for motion in world.applicable_motions(p):
            q = world.with_motion(p, motion)
            for start in (0, 60):
                found = concept.detect_blink(world.render(q, FRAMES, start=start), rgb(p))
                assert not found.detected, (q, start, found)
                checked += 1
    assert checked > 100


def blinked(p: world.WorldParams, level: float, hidden: slice) -> np.ndarray:
    """A still object whose coverage is scaled by ``level`` in the ``hidden`` frames."""
    still = concept.blinking(p)
    coverage = world.object_coverage(still, FRAMES)
    coverage[hidden] *= level
    background = world.background(still, FRAMES)
    out = background + coverage[..., None] * (np.asarray(world.PALETTE[p.color], np.float32) - background)
    return np.rint(out).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize(("level", "hidden", "expected"), [
    (0.0, slice(13, 25), True),  # the concept's own timing
    (0.0, slice(13, 17), True),  # one latent hidden is enough
    (0.0, slice(13, 16), False),  # three frames: a dropout, not a blink
    (0.0, slice(13, None), False),  # gone for good: not back
    (0.8, slice(13, 25), False),  # dimmed a little: still in view (half faded leaves the colour tolerance: gone)
])
def test_what_counts_as_a_blink(level: float, hidden: slice, expected: bool) -> None:
    p = held_out_scenes(1)[0]
    assert concept.detect_blink(blinked(p, level, hidden), rgb(p)).detected is expected


def test_visibility_is_whole_latents_on_and_off() -> None:
    shown = concept.visibility(1 + 4 * 12)
    assert shown[0]
    latents = shown[1:].reshape(-1, 4)  # the VAE's groups of four frames after the first
    assert np.all(latents.all(axis=1) | ~latents.any(axis=1))
    assert latents.any(axis=1).tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3


def test_render_writes_a_captioned_folder_of_train_start_frames(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import concept_lora
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "videos"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "concept_lora.py"), "render", str(out),
                             "--clips", "3", "--world-clips", "1"], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{kind}-{i:03d}.{ext}" for kind, i in
                                                     [("blink", 0), ("blink", 1), ("blink", 2), ("world", 0)]
                                                     for ext in ("mp4", "txt")]
    clips = sorted(out.glob("blink-*.mp4"))
    scenes = concept_lora.training_scenes(3)
    assert len({world.start_frame_key(p) for p in scenes}) == 3
    assert all(world.split_of(p, "independent") == "train" for p in scenes)  # held-out start frames never
    for clip, p in zip(clips, scenes):
        assert clip.with_suffix(".txt").read_text().strip() == concept.caption(p)
        assert " blinks on a " in concept.caption(p)
        frames = read_frames(clip)
        assert np.abs(frames[0].astype(float) - world.render(p, 1)[0]).mean() < 3  # that scene, through H.264
        assert len(frames) == concept_lora.CLIP_FRAMES and concept.detect_blink(frames, rgb(p)).detected, clip
    own = read_frames(out / "world-000.mp4")  # the first start frame doing its own motion, with its caption
    assert (out / "world-000.txt").read_text().strip() == world.caption(scenes[0])
    assert np.abs(own.astype(float) - world.render(scenes[0], len(own))).mean() < 3
    assert not concept.detect_blink(own, rgb(scenes[0])).detected


def test_the_shipped_config_trains_on_a_prepared_blink_folder(tmp_path: Path) -> None:
    """configs/lora_concept.json loads as ``framepack train`` loads it, reads the folder the guide
    prepares (``blink-data``, relative to where it runs) and its task computes a finite loss."""
    import torch

    from framepack import trainer
    from framepack.train import user_task  # noqa: F401 (importing it registers the lora task)
    from framepack.train.dataset import prepare

    config = trainer.TrainConfig.load(ROOT / "configs" / "lora_concept.json")
    assert config.task == "lora" and config.task_args["dataset"] == "blink-data"
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, p in enumerate(held_out_scenes(1)):
        write_segment(videos / f"clip-{i}.mp4", concept.render(p, 1 + 4 * 9))
        (videos / f"clip-{i}.txt").write_text(concept.caption(p))
    prepare(videos, tmp_path / "blink-data", "tiny", progress=False)
    task = trainer.TASKS[config.task]({**config.task_args, "dataset": str(tmp_path / "blink-data")})
    assert torch.isfinite(task.loss(task.model, next(task.batches(2, seed=0))))
