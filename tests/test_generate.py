"""End to end on a tiny random model written in the real Hugging Face layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack.jobs import JobDir
from framepack.pipeline import Cancelled, FramePackPipeline, SectionFinished, StepProgress, VideoUpdated
from framepack.planning import frame_count, latent_count, section_count
from framepack.settings import GenerationSettings
from framepack.video import read_frames, read_metadata
from tiny_hub import write_model_dir

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def write_image(path: Path, size=(64, 64), seed=0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full((h, w), 90)], axis=-1).astype(np.uint8)
    cy, cx = rng.integers(16, 48, size=2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = (220, 30, 30)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"), mode="inverted")[0]


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> FramePackPipeline:
    return FramePackPipeline.from_model(str(tiny_model))


def settings_for(tiny_model, image, **changes) -> GenerationSettings:
    base = dict(image=str(image), prompt="a red circle moves to the right", model=str(tiny_model),
                seconds=2.4, steps=3, resolution=64, seed=7)
    base.update(changes)
    return GenerationSettings(**base)


def run(pipeline, settings, root: Path, stop_after: int | None = None):
    job = JobDir.create(root / "job", settings, root / "out.mp4")
    events = []

    def should_stop():
        done = sum(isinstance(e, SectionFinished) for e in events)
        return stop_after is not None and done >= stop_after

    try:
        pipeline.run(job, on_event=events.append, should_stop=should_stop)
    except Cancelled:
        pass
    return job, events


@pytest.mark.parametrize("mode", ["inverted", "forward", "vanilla"])
def test_video_has_the_expected_frames_and_metadata(pipeline, tiny_model, tmp_path, mode):
    image = write_image(tmp_path / "start.png")
    settings = settings_for(tiny_model, image, mode=mode)
    job, events = run(pipeline, settings, tmp_path)
    n = section_count(settings.seconds)
    frames = read_frames(job.out)
    assert frames.shape == (frame_count(latent_count(n)), 64, 64, 3) == (36 * n + 1, 64, 64, 3)
    assert read_metadata(job.out)["framepack"]["seed"] == 7
    assert sum(isinstance(e, StepProgress) for e in events) == n * settings.steps
    assert [e.final for e in events if isinstance(e, VideoUpdated)] == [False] * (n - 1) + [True]
    assert not job.provisional_path.exists()
    assert sorted(p.name for p in job.root.glob("video/*")) == [job.segment_path(s).name for s in range(n)
                                                               if job.segment_path(s).exists()]


def test_resume_is_bit_identical(pipeline, tiny_model, tmp_path):
    image = write_image(tmp_path / "start.png")
    settings = settings_for(tiny_model, image, seconds=4.8)  # 4 sections
    full, _ = run(pipeline, settings, tmp_path / "full")
    broken, _ = run(pipeline, settings, tmp_path / "broken", stop_after=2)
    assert broken.finished == 2 and not broken.out.exists()
    resumed = JobDir.open(broken.root)
    pipeline.run(resumed)
    for step in range(4):
        assert torch.equal(full.load_latents(step), resumed.load_latents(step))
    assert np.array_equal(read_frames(full.out), read_frames(resumed.out))


def test_seed_decides_the_video(pipeline, tiny_model, tmp_path):
    image = write_image(tmp_path / "start.png")
    a, _ = run(pipeline, settings_for(tiny_model, image, seconds=1), tmp_path / "a")
    b, _ = run(pipeline, settings_for(tiny_model, image, seconds=1), tmp_path / "b")
    c, _ = run(pipeline, settings_for(tiny_model, image, seconds=1, seed=8), tmp_path / "c")
    assert torch.equal(a.load_latents(0), b.load_latents(0))
    assert not torch.equal(a.load_latents(0), c.load_latents(0))


def test_cli_generate_resume_and_from(tiny_model, tmp_path):
    image = write_image(tmp_path / "start.png")
    out = tmp_path / "video.mp4"
    args = [FRAMEPACK, "generate", "--model", str(tiny_model), "--image", str(image), "--prompt",
            "[0s-1s: a red circle] [1s-3s: the circle moves right]", "--seconds", "2.4", "--steps", "2",
            "--resolution", "64", "--seed", "3", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out.resolve())
    assert read_frames(out).shape[0] == 73
    again = tmp_path / "again.mp4"
    result = subprocess.run([FRAMEPACK, "generate", "--from", str(out), "--out", str(again)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_frames(out), read_frames(again))
    # the video records its image by name only: moved away from it, it asks for it in one line
    moved = tmp_path / "elsewhere" / "video.mp4"
    moved.parent.mkdir()
    out.rename(moved)
    result = subprocess.run([FRAMEPACK, "generate", "--from", str(moved), "--out", str(tmp_path / "third.mp4")],
                            capture_output=True, text=True, timeout=300, cwd=moved.parent)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"framepack: error: {moved} was made from the image 'start.png', which is neither beside the video nor in "
        "the current directory; give it with --image"]


def test_components_load_from_hub_ids(tiny_model, tmp_path, monkeypatch):
    """The named-model path: hub ids resolved through huggingface_hub's cache (offline here)."""
    import shutil

    from framepack.components import ModelSource, load_components
    from test_checkpoints import fake_hub_cache

    monkeypatch.chdir(tmp_path)  # hub ids must not resolve as relative paths
    cache = tmp_path / "hub"
    manifest = json.loads((tiny_model / "framepack.json").read_text())
    for repo, key in [("lllyasviel/FramePackI2V_HY", "transformer"), ("hunyuanvideo-community/HunyuanVideo", "hunyuan"),
                      ("lllyasviel/flux_redux_bfl", "redux")]:
        snapshot = fake_hub_cache(cache, repo)
        shutil.copytree(tiny_model / manifest[key], snapshot, dirs_exist_ok=True)
    source = ModelSource("lllyasviel/FramePackI2V_HY", "hunyuanvideo-community/HunyuanVideo", "lllyasviel/flux_redux_bfl",
                         "inverted")
    components = load_components(source, local_files_only=True, cache_dir=cache)
    embedding = components.text.encode("a red circle")
    assert embedding.states.shape[-1] == components.transformer.config.text_embed_dim
    assert components.image.encode(np.zeros((64, 64, 3), np.uint8)).shape[-1] == components.transformer.config.image_proj_dim
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        load_components(ModelSource("org/missing", "org/missing2", None, "inverted"), local_files_only=True, cache_dir=cache)


@pytest.mark.parametrize("mode", ["inverted", "vanilla"])
def test_demo_layout_runs_through_the_same_pipeline(tmp_path, mode):
    """The demo model's shape: no SigLIP, no guidance embedder, our small VAE, local text encoders."""
    from framepack import FramePackTransformer, preset
    from framepack.small_vae import SmallVAEConfig, SmallVideoAutoencoder
    from framepack.train.text_encoder import write_text_encoders

    root = tmp_path / "demo"
    write_text_encoders(root / "text", text_dim=32, pooled_dim=16, extra_words=["circle", "right"])
    SmallVideoAutoencoder(SmallVAEConfig(channels=(8, 8, 8))).save_pretrained(root / "vae")
    config = preset("tiny").replace(has_image_proj=False, guidance_embeds=False, text_embed_dim=32,
                                    pooled_projection_dim=16)
    FramePackTransformer(config).save_pretrained(root / "transformer")
    (root / "framepack.json").write_text(json.dumps(
        {"transformer": "transformer", "hunyuan": "text", "vae": "vae", "redux": None, "mode": mode}))
    pipeline = FramePackPipeline.from_model(str(root))
    assert pipeline.c.image is None
    image = write_image(tmp_path / "start.png")
    settings = GenerationSettings(image=str(image), prompt="a red circle moves to the right", model=str(root),
                                  seconds=2.4, steps=2, resolution=64, seed=1)
    job = JobDir.create(tmp_path / "job", settings, tmp_path / "out.mp4")
    pipeline.run(job)
    assert read_frames(job.out).shape == (73, 64, 64, 3)


@pytest.mark.parametrize("cfg, message", [("lots", "cfg must be a number"), (float("nan"), "cfg must be a number"),
                                          (-1.0, "cfg must be a finite number >= 0")])
def test_a_bad_cfg_is_named_and_none_means_the_models_own(cfg, message):
    from framepack.settings import GenerationSettings

    with pytest.raises(ValueError, match=message):  # a ValueError that names it, not a TypeError
        GenerationSettings(image="a.png", prompt="p", cfg=cfg)
    assert GenerationSettings(image="a.png", prompt="p").cfg is None


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stores its pixels sideways and says so in EXIF; it must load upright."""
    from PIL import Image

    from framepack.images import load_image

    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high as stored
    stored[:8, :8] = (255, 0, 0)  # a mark in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.png"
    Image.fromarray(stored).save(path, exif=exif)
    upright = load_image(path)
    assert upright.shape == (64, 32, 3)
    assert np.array_equal(upright, np.rot90(stored, k=-1))  # the mark is now top-right
    assert (upright[:8, -8:] == (255, 0, 0)).all()


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width`` x ``height`` (no pixel data: nothing may decode it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("width, height", [(30000, 30000), (9000, 5000)])
def test_an_oversized_image_names_its_size_and_the_limit(tmp_path, width, height):
    """Past Pillow's own bomb limit (30000x30000) as below it: the size and our limit, one line."""
    image = huge_png(tmp_path / "huge.png", width, height)
    result = subprocess.run([FRAMEPACK, "generate", "--model", "tiny", "--image", str(image), "--prompt", "p",
                             "--out", str(tmp_path / "v.mp4")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"framepack: error: image huge.png is {width}x{height} = {width * height / 1e6:.1f} MP; the limit is 40 MP"]
    assert not list(tmp_path.glob("v.*"))
