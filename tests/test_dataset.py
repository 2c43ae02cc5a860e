"""``framepack dataset prepare`` (issue 19.1): captions from every source, generation's buckets, the
pipeline's own encodings, resuming, skipped files, the 13B layout, and bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_hub import write_model_dir

from framepack.components import SiglipImageEncoder, asset, load_vae
from framepack.images import load_image, prepare_image, resize_and_crop
from framepack.settings import GenerationSettings
from framepack.train import dataset
from framepack.train.dataset import INDEX, MANIFEST, REPORT, PreparedDataset, prepare
from framepack.video import read_frames, write_segment

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
RESOLUTION = 64  # the demo model's buckets scaled down: a clip encodes in milliseconds


def video(path: Path, frames: int, height: int, width: int, seed: int = 0) -> Path:
    """A moving gradient with noise, written by framepack's own mp4 writer."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    clip = np.stack([np.stack([(x * 4 + t * 9) % 256, (y * 3 + t * 5) % 256, (x + y) % 256], -1) for t in range(frames)])
    noisy = clip + rng.integers(0, 40, clip.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_segment(path, np.clip(noisy, 0, 255).astype(np.uint8))
    return path


def image(path: Path, height: int, width: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def captioned(path: Path, caption: str) -> Path:
    path.with_suffix(".txt").write_text(caption)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Captions from all three sources, files without one, a corrupt video, two aspect ratios."""
    root = tmp_path / "videos"
    captioned(video(root / "wide.mp4", 14, 48, 96), "a wide clip")  # 14 frames: 13 = 1 + 4 * 3 usable
    video(root / "clips" / "wide2.mp4", 15, 56, 112, seed=1)  # the same aspect and length bucket
    image(root / "tall.png", 96, 48, seed=2)
    image(root / "tall.jpg", 100, 50, seed=3)
    image(root / "uncaptioned.png", 40, 40)
    captioned(image(root / "blank.webp", 40, 40), "  \n")
    captioned(root / "broken.mp4", "never read").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (root / "metadata.jsonl").write_text(json.dumps({"file": "clips/wide2.mp4", "caption": "from jsonl"}) + "\n"
                                         + json.dumps({"file": "gone.mp4", "caption": "lost"}) + "\n")
    (root / "metadata.csv").write_text('file,caption\ntall.png,"from csv, with a comma"\ntall.jpg,also csv\n')
    return root


def test_captions_buckets_and_skipped_files(folder: Path, tmp_path: Path) -> None:
    report = prepare(folder, tmp_path / "out", "tiny", resolution=RESOLUTION, progress=False)
    data = PreparedDataset(tmp_path / "out")
    captions = {data.sample(i).source: data.sample(i).caption for i in range(len(data))}
    assert captions == {"wide.mp4": "a wide clip", "clips/wide2.mp4": "from jsonl",
                        "tall.png": "from csv, with a comma", "tall.jpg": "also csv"}
    skipped = json.loads((tmp_path / "out" / REPORT).read_text())["skipped"]
    reasons = {entry["file"]: entry["reason"] for entry in skipped}
    assert set(reasons) == {"uncaptioned.png", "blank.webp", "broken.mp4", "gone.mp4"}
    assert "no caption" in reasons["uncaptioned.png"] and "empty caption" in reasons["blank.webp"]
    assert "not a readable video" in reasons["broken.mp4"] and "not found" in reasons["gone.mp4"]
    assert [s.file for s in report.skipped] == sorted(reasons)

    # two aspect ratios: two buckets, each of the size generation gives a start frame of that aspect
    buckets = data.buckets()
    assert len(buckets) == 2
    for i in range(len(data)):
        sample = data.sample(i)
        first = load_image(folder / sample.source) if sample.source.endswith((".png", ".jpg")) \
            else read_frames(folder / sample.source)[0]
        height, width = prepare_image(first, RESOLUTION).shape[:2]
        assert sample.latents.shape[2:] == (height // 8, width // 8)
        assert data.entries[i]["bucket"] == f"{height}x{width}x{sample.latents.shape[1]}"
        assert sample.image is None and sample.mask.dtype == torch.bool and sample.text.shape[0] == sample.mask.shape[0]
    shapes = {key: {tuple(data.sample(i).latents.shape) for i in members} for key, members in buckets.items()}
    assert all(len(s) == 1 for s in shapes.values()), shapes
    latent_frames = {data.sample(i).source: data.sample(i).latents.shape[1] for i in range(len(data))}
    assert latent_frames == {"wide.mp4": 4, "clips/wide2.mp4": 4, "tall.png": 1, "tall.jpg": 1}  # 13 frames


def test_clip_length_is_the_vaes_grouping_and_keeps_most_of_a_clip() -> None:
    for frames in range(1, 400):
        for cap in (None, 1, 9, 33, 200):
            kept = dataset.clip_length(frames, cap)
            usable = frames if cap is None else min(frames, cap)
            assert (kept - 1) % 4 == 0 and kept <= usable, (frames, cap, kept)
            assert kept > min(usable - 4, usable * 2 / 3), (frames, cap, kept)  # 4: the grouping
    assert len({dataset.clip_length(n) for n in range(100, 130)}) <= 2  # similar lengths share a bucket


def test_latents_and_embeddings_are_the_pipelines(tmp_path: Path) -> None:
    """The image's sample equals what the pipeline conditions a job on for it; the clip's latents
    equal the VAE run directly on its frames, cut to the same bucket."""
    from framepack.pipeline import FramePackPipeline

    root = tmp_path / "videos"
    captioned(image(root / "start.png", 72, 120), "a circle moves right")
    captioned(video(root / "clip.mp4", 9, 64, 64), "a square grows")
    prepare(root, tmp_path / "out", "tiny", resolution=RESOLUTION, progress=False)
    data = PreparedDataset(tmp_path / "out")
    by_source = {data.sample(i).source: data.sample(i) for i in range(len(data))}

    pipeline = FramePackPipeline.from_model("tiny")
    still = by_source["start.png"]
    cond = pipeline.condition(GenerationSettings(image=str(root / "start.png"), prompt=still.caption,
                                                 resolution=RESOLUTION))
    assert torch.equal(still.latents, cond.start_latent[0])
    text = pipeline.encode_text(still.caption)
    assert torch.equal(still.text, text.states[0]) and torch.equal(still.mask, text.mask[0])
    assert torch.equal(still.pooled, text.pooled[0])

    clip = by_source["clip.mp4"]
    frames = np.stack([resize_and_crop(f, 64, 64) for f in read_frames(root / "clip.mp4")])
    vae = load_vae(asset("tiny", "vae"), torch.float32, "cpu", tiling=False)
    pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
    assert torch.allclose(clip.latents, vae.encode(pixels)[0], atol=1e-6, rtol=0)


def test_clips_sharing_a_caption_each_get_its_embedding(tmp_path: Path) -> None:
    """A caption is encoded once for all its clips; each sample still stores the embedding (the
    tensors once shared memory, which safetensors refuses to save)."""
    root = tmp_path / "videos"
    for i in range(3):
        captioned(video(root / f"clip-{i}.mp4", 5, 64, 64, seed=i), "a red square blinks")
    prepare(root, tmp_path / "out", "tiny", resolution=RESOLUTION, progress=False)
    data = PreparedDataset(tmp_path / "out")
    samples = [data.sample(i) for i in range(len(data))]
    assert len(samples) == 3
    assert all(torch.equal(s.text, samples[0].text) and torch.equal(s.pooled, samples[0].pooled) for s in samples)
    assert not torch.equal(samples[0].latents, samples[1].latents)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every clip the VAE encodes this test, by its frame count (dataset.load_encoders wrapped)."""
    calls: list[str] = []
    load = dataset.load_encoders

    def counted(*args, **kwargs):
        encoders = load(*args, **kwargs)
        encode = encoders.vae.encode

        def counted_encode(pixels: torch.Tensor) -> torch.Tensor:
            calls.append(str(pixels.shape[2]))
            return encode(pixels)

        encoders.vae.encode = counted_encode
        return encoders

    monkeypatch.setattr(dataset, "load_encoders", counted)
    return calls


def test_an_interrupted_run_continues_to_the_same_dataset(folder: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    whole = prepare(folder, tmp_path / "whole", "tiny", resolution=RESOLUTION, progress=False, shard_bytes=1)
    assert len(calls) == whole.samples == 4

    class Stop(Exception):
        pass

    def stop_after_two(source: str) -> None:
        if len(calls) == 2:
            raise Stop(source)

    calls.clear()
    with pytest.raises(Stop):
        prepare(folder, tmp_path / "part", "tiny", resolution=RESOLUTION, progress=False, shard_bytes=1,
                on_sample=stop_after_two)
    with pytest.raises(ValueError, match="unfinished"):
        PreparedDataset(tmp_path / "part")
    assert not (tmp_path / "part" / REPORT).exists()
    assert not list((tmp_path / "part").glob("*.tmp"))

    calls.clear()
    resumed = prepare(folder, tmp_path / "part", "tiny", resolution=RESOLUTION, progress=False, shard_bytes=1)
    assert len(calls) == resumed.encoded == 2  # only the files no finished shard held
    for name in (INDEX, REPORT, MANIFEST):
        assert (tmp_path / "part" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    a, b = PreparedDataset(tmp_path / "whole"), PreparedDataset(tmp_path / "part")
    for i in range(len(a)):
        x, y = a.sample(i), b.sample(i)
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in ("latents", "text", "mask", "pooled"))

    calls.clear()  # a finished dataset: the same command again encodes nothing
    assert prepare(folder, tmp_path / "part", "tiny", resolution=RESOLUTION, progress=False).encoded == 0
    assert calls == []


def test_a_shard_that_fails_to_write_leaves_nothing_that_looks_finished(folder: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def half_written(tensors, filename):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk unplugged")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="unplugged"):
        prepare(folder, tmp_path / "out", "tiny", resolution=RESOLUTION, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MANIFEST]
    with pytest.raises(ValueError, match="unfinished"):
        PreparedDataset(tmp_path / "out")
    with pytest.raises(ValueError, match="not a prepared dataset"):
        PreparedDataset(folder)


def test_13b_layout_with_an_image_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, paths = write_model_dir(tmp_path / "model")
    root = tmp_path / "videos"
    captioned(video(root / "clip.mp4", 5, 32, 48), "a clip")
    monkeypatch.chdir(tmp_path)
    prepare(root, tmp_path / "out", "model", resolution=32, progress=False)  # a relative path
    data = PreparedDataset(tmp_path / "out")
    assert data.model == str(model.resolve())  # usable from any folder
    sample = data.sample(0)
    frames = np.stack([prepare_image(f, 32) for f in read_frames(root / "clip.mp4")])
    siglip = SiglipImageEncoder.from_pretrained(paths["redux"])
    assert sample.image is not None and torch.equal(sample.image, siglip.encode(frames[0])[0])
    vae = load_vae(paths["hunyuan"] / "vae", torch.float32, "cpu", tiling=False)
    pixels = torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1
    assert sample.latents.shape[:2] == (16, 2)
    assert torch.allclose(sample.latents, vae.encode(pixels)[0], atol=1e-5, rtol=0)


def framepack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], check=False, capture_output=True, text=True, timeout=300)


def test_cli_prepares_and_names_skipped_files(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = framepack("dataset", "prepare", str(folder), "--model", "tiny", "--out", str(out),
                       "--resolution", str(RESOLUTION), "--max-frames", "9")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "skipped broken.mp4: not a readable video" in result.stderr
    assert "skipped uncaptioned.png: no caption" in result.stderr
    assert "4 samples" in result.stdout
    data = PreparedDataset(out)
    assert max(data.sample(i).latents.shape[1] for i in range(len(data))) == 3  # 9 frames at most


def assert_one_line_error(result: subprocess.CompletedProcess, phrase: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("framepack: error: ") and phrase in lines[0], lines[0]


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "empty"
    image(source / "a.png", 16, 16)  # no caption
    before = set(tmp_path.rglob("*"))
    result = framepack("dataset", "prepare", str(source), "--model", "tiny", "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "no usable files")
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("case", ["missing folder", "unknown model", "out is a file", "out holds other files",
                                  "nothing readable", "bad metadata line", "metadata not utf-8"])
def test_more_bad_input_in_process(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same entry point's main without a new interpreter (the subprocess test above covers the exit)."""
    from framepack.cli import main

    source, model, out = tmp_path / "videos", "tiny", tmp_path / "out"
    captioned(image(source / "a.png", 16, 16), "a caption")
    expected = {"missing folder": "does not exist", "unknown model": "unknown model",
                "out is a file": "not a directory", "out holds other files": "other files",
                "nothing readable": "no file in", "bad metadata line": "metadata.jsonl line 2 is not JSON",
                "metadata not utf-8": "metadata.csv is not UTF-8"}[case]
    if case == "missing folder":
        source = tmp_path / "nowhere"
    elif case == "unknown model":
        model = "no-such-model"
    elif case == "out is a file":
        out.write_text("")
    elif case == "out holds other files":
        (out / "notes").mkdir(parents=True)
    elif case == "nothing readable":
        (source / "a.png").write_bytes(b"\x89PNG truncated")
    elif case == "bad metadata line":
        (source / "metadata.jsonl").write_text('{"file": "a.png", "caption": "x"}\n{"file": "b.png",\n')
    else:
        (source / "metadata.csv").write_bytes(b"file,caption\na.png,\xff\xfe\n")
    before = set(tmp_path.rglob("*"))
    code = main(["dataset", "prepare", str(source), "--model", model, "--out", str(out)])
    assert_one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), expected)
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args", [["dataset", "prepare", "--help"], ["dataset"], ["dataset", "prepare", "d"]])
def test_dataset_help_and_usage_errors_import_no_torch(args: list[str]) -> None:
    check = ("import sys\nfrom framepack.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'transformers', 'av') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", check, *args], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr
