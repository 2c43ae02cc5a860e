"""The embedded demo model: shipped files, the CPU default, and a generation through `framepack demo`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framepack.components import native_bf16_or_fp32, resolve_model
from framepack.demo import asset
from framepack.train import world
from framepack.train.evaluate import persistence
from framepack.video import read_frames, read_metadata

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def test_shipped_files_are_complete_and_small():
    root = asset("tiny")
    source = resolve_model("tiny")
    assert Path(source.transformer) == root / "transformer" and Path(source.vae) == root / "vae"
    assert source.redux is None and source.mode == "inverted"
    assert source.resolution(None) == 128 and source.shift(None) == 3.0
    assert source.resolution(256) == 256 and source.shift(5.0) == 5.0
    manifest = json.loads((root / "framepack.json").read_text())
    assert source.cfg(None) == manifest["cfg"] > 1 and source.cfg(1.0) == 1.0  # trained with dropped captions
    assert resolve_model("framepack-i2v").cfg(None) == 1.0  # the 13B models: off unless asked
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size <= 60e6, f"{size / 1e6:.1f} MB"
    card = (root / "MODEL_CARD.md").read_text()
    assert "PSNR" in card and "wall hours" in card
    assert json.loads((root / "vae" / "metrics.json").read_text())["psnr_db"] >= 30


def test_the_shipped_student_is_its_teachers_few_step_student():
    """tiny-fast: the teacher's encoders by relative paths (no second copy in the package), its
    own transformer of the teacher's architecture, 4 steps at cfg 1 and no step cache by default;
    and `framepack demo` runs it unless told otherwise."""
    from framepack.cli import build_parser
    from framepack.model import FramePackTransformer

    student, teacher = resolve_model("tiny-fast"), resolve_model("tiny")
    assert (student.vae, student.hunyuan, student.text_embeddings) == (teacher.vae, teacher.hunyuan, teacher.text_embeddings)
    assert not (asset("tiny-fast") / "vae").exists() and not (asset("tiny-fast") / "text").exists()
    assert Path(student.transformer) == asset("tiny-fast") / "transformer"
    a = FramePackTransformer.from_pretrained(student.transformer, dtype=torch.float32)
    b = FramePackTransformer.from_pretrained(teacher.transformer, dtype=torch.float32)
    # the teacher's architecture; the gap rule of long inverted videos is each model's own (chosen on validation)
    assert a.config.same_architecture(b.config) and any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    manifest = json.loads((asset("tiny-fast") / "framepack.json").read_text())
    assert student.steps(None) == 4 and student.cfg(None) == 1.0 and manifest["cache"] == "none"
    assert manifest["distilled_from"]["teacher_cfg"] == teacher.cfg(None) and teacher.steps(None) == 25
    assert (student.mode, student.resolution(None), student.shift(None)) == (teacher.mode, 128, teacher.shift(None))
    assert build_parser().parse_args(["demo"]).model == "tiny-fast"
    card = (asset("tiny-fast") / "MODEL_CARD.md").read_text()
    # its test table and its timing, each made by a script (the teacher comparison: docs/demo-model.md)
    assert "<!-- bench:student-own-test -->\nMade by" in card and "<!-- bench:student-time -->\nMade by" in card
    assert "test split" in card.split("<!-- bench:student-own-test -->")[1].split("<!-- /bench:student-own-test -->")[0]


def test_tiny_is_the_default_without_cuda(monkeypatch):
    import torch

    from framepack import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli._default_model() == "tiny"


def test_demo_command_makes_a_video_of_the_prompt(tmp_path):
    """`framepack demo` with the embedded student: a playable mp4, the table, and the object stays."""
    out = tmp_path / "demo.mp4"
    result = subprocess.run([FRAMEPACK, "demo", "--seconds", "1", "--steps", "8", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model tiny-fast on cpu" in result.stderr  # the student, by default
    # the line names the VAE's own decode precision where it is not the weights' (bf16 on this CPU or not)
    decoded_in = native_bf16_or_fp32(torch.device("cpu"))
    assert ("(float32; VAE decodes in bfloat16)" if decoded_in == torch.bfloat16 else "(float32)") in result.stderr
    assert "context stays at 736 tokens in every section" in result.stdout
    frames = read_frames(out)
    assert frames.shape == (37, 128, 128, 3)
    assert read_metadata(out)["framepack"]["prompt"] == asset("demo", "prompt.txt").read_text().strip()
    # a trained model keeps the orange triangle of the start frame in every frame (random weights do not)
    assert persistence(frames, world.PALETTE["orange"]) == 1.0
    shutil.rmtree(tmp_path / "demo.job", ignore_errors=True)


@pytest.mark.parametrize("mode", ["forward", "vanilla"])
def test_other_modes_run(tmp_path, mode):
    from dataclasses import replace

    from framepack.demo import demo_settings
    from framepack.jobs import JobDir
    from framepack.pipeline import FramePackPipeline

    settings = replace(demo_settings(seconds=2.4, steps=4), mode=mode)
    job = JobDir.create(tmp_path / "job", settings, tmp_path / "out.mp4")
    FramePackPipeline.from_model("tiny").run(job)
    assert read_frames(job.out).shape == (73, 128, 128, 3)


def test_cfg_defaults_to_the_models_own(tmp_path):
    """cfg=None runs the manifest's scale: the same video as asking for it, another than cfg 1."""
    from dataclasses import replace

    import numpy as np

    from framepack.demo import demo_settings
    from framepack.jobs import JobDir
    from framepack.pipeline import FramePackPipeline

    pipeline = FramePackPipeline.from_model("tiny")
    base = replace(demo_settings(seconds=1, steps=3), cfg=None)
    videos = {}
    for name, cfg in (("own", None), ("asked", resolve_model("tiny").cfg(None)), ("off", 1.0)):
        job = JobDir.create(tmp_path / name, replace(base, cfg=cfg), tmp_path / f"{name}.mp4")
        pipeline.run(job)
        videos[name] = job.load_latents(0)
    assert torch.equal(videos["own"], videos["asked"])
    assert not np.allclose(videos["own"].numpy(), videos["off"].numpy())
