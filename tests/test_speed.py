"""Speed work that must not change the video: reused decoded frames; compiled blocks that compile once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import framepack.pipeline as pipeline_module
from framepack.demo import demo_settings
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.video import Assembler, read_frames


@pytest.fixture(scope="module")
def demo() -> FramePackPipeline:
    return FramePackPipeline.from_model("tiny")


def _clips_and_video(pipeline: FramePackPipeline, root: Path, monkeypatch, reuse: bool, mode: str):
    """Run 3 demo sections; returns (every clip the blend received, latents decoded, final frames)."""
    clips: list[np.ndarray] = []
    decoded: list[int] = []
    add, decode = Assembler.add, pipeline.c.vae.decode

    def recording_add(self, clip, last):
        if clip.size:  # not the layout's dry run on empty frames
            clips.append(clip.copy())
        return add(self, clip, last)

    def counting_decode(latents):
        decoded.append(latents.shape[2])
        return decode(latents)

    with monkeypatch.context() as patch:
        patch.setattr(Assembler, "add", recording_add)
        patch.setattr(pipeline.c.vae, "decode", counting_decode)
        if not reuse:  # the reference path: every section's span decoded whole, as before
            patch.setattr(pipeline_module, "_decodes_latents_alone", lambda vae: False)
        settings = dataclasses.replace(demo_settings(seconds=3.6, steps=1), mode=mode)
        job = JobDir.create(root / "job", settings, root / "out.mp4")
        pipeline.run(job)
    return clips, sum(decoded), read_frames(job.out)


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_reused_decoded_frames_leave_the_video_bit_identical(demo, tmp_path, monkeypatch, mode):
    clips, fewer, video = _clips_and_video(demo, tmp_path / "reuse", monkeypatch, True, mode)
    ref_clips, whole, ref_video = _clips_and_video(demo, tmp_path / "whole", monkeypatch, False, mode)
    assert fewer < whole  # the reuse did happen: fewer latents went through the VAE
    assert len(clips) == len(ref_clips) == 3
    for clip, ref in zip(clips, ref_clips):
        assert clip.dtype == ref.dtype and clip.shape == ref.shape
        assert np.array_equal(clip, ref)  # the float frames before rounding, bit for bit
    assert np.array_equal(video, ref_video)


# ---- --compile ---------------------------------------------------------------------------------------


def test_compiled_blocks_compile_once_and_agree_with_eager(tmp_path):
    import torch
    from torch._dynamo.utils import counters

    from framepack.pipeline import SectionFinished
    from framepack.runtime.compile import compile_blocks

    # a prompt per section of different lengths: the text length changes from section to section too
    settings = dataclasses.replace(demo_settings(seconds=3.6, steps=2), prompt=(
        "[0s-1.2s: a red ball] [1.2s-2.4s: a small blue square slides to the left] [2.4s-3.6s: a circle]"))
    eager = FramePackPipeline.from_model("tiny")
    reference = JobDir.create(tmp_path / "eager", settings, tmp_path / "eager.mp4")
    eager.run(reference)

    torch._dynamo.reset()
    counters.clear()
    compiled = FramePackPipeline.from_model("tiny")
    assert compile_blocks(compiled.c.transformer) == 6
    graphs: list[int] = []
    compiles: list[int] = []

    def on_event(event) -> None:
        if isinstance(event, SectionFinished):
            graphs.append(counters["stats"]["unique_graphs"])
            compiles.append(sum(counters["inductor"].values()))

    job = JobDir.create(tmp_path / "compiled", settings, tmp_path / "compiled.mp4")
    try:
        compiled.run(job, on_event=on_event)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3 and graphs[0] > 0  # the first section compiled the blocks
    assert graphs[1:] == [graphs[0]] * 2  # and nothing was traced again afterwards
    assert compiles[1:] == [compiles[0]] * 2
    for step in range(3):  # fused kernels round differently, nothing more
        torch.testing.assert_close(job.load_latents(step), reference.load_latents(step), rtol=1e-3, atol=1e-3)


def test_compile_and_attention_refusals_are_one_line_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    from framepack.components import asset

    framepack = str(Path(sys.executable).with_name("framepack"))
    base = [framepack, "generate", "--model", "tiny", "--image", str(asset("demo", "start.png")), "--prompt", "p",
            "--device", "cpu", "--out", str(tmp_path / "out.mp4")]
    for extra, words in ((["--attention", "flash"], ["--attention flash", "CUDA", "flash-attn"]),
                         (["--attention", "sage"], ["--attention sage", "CUDA", "sageattention"]),
                         (["--compile", "--attention", "sage"], ["sage"])):
        result = subprocess.run(base + extra, capture_output=True, text=True, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert list(tmp_path.iterdir()) == []


# ---- --attention -------------------------------------------------------------------------------------


def _unmasked(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_a_mask_free_kernel_runs_a_masked_batch_sample_by_sample():
    import torch

    from framepack.model.attention import by_sample, sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 2, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False  # padded text at the end of two samples
    mask[2, 4:] = False
    torch.testing.assert_close(by_sample(_unmasked, q, k, v, mask), sdpa(q, k, v, mask))
    torch.testing.assert_close(by_sample(_unmasked, q, k, v, None), sdpa(q, k, v, None))
    # and the mask matters: without it sample 0 would differ
    assert not torch.allclose(by_sample(_unmasked, q, k, v, None)[0], sdpa(q, k, v, mask)[0])


def test_use_attention_applies_to_the_models_forwards_only_and_is_undone(demo, monkeypatch):
    import threading

    import torch

    from framepack.model import attention

    calls: list[str] = []

    def kernel(q, k, v):
        calls.append(threading.current_thread().name)
        return _unmasked(q, k, v)

    monkeypatch.setattr(attention, "load_kernel", lambda backend: kernel)
    model = demo.c.transformer
    undo = attention.use_attention(model, "flash")
    q = torch.randn(1, 4, 2, 8)
    attention.attention(q, q, q)  # outside the model's forward: SDPA
    assert calls == []
    inputs = _tiny_forward_inputs(model)

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    forward()
    assert calls and set(calls) == {threading.current_thread().name}
    calls.clear()
    worker = threading.Thread(target=forward, name="worker")  # the pipeline samples in a thread of its own
    worker.start()
    worker.join()
    assert calls and set(calls) == {"worker"}
    undo()
    calls.clear()
    forward()
    assert calls == []


def _tiny_forward_inputs(model):
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, 1, 4, 4, generator=g)
    text = torch.randn(1, 5, cfg.text_embed_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    image = torch.randn(1, 3, cfg.image_proj_dim, generator=g) if cfg.has_image_proj else None
    guidance = torch.tensor([10_000.0]) if cfg.guidance_embeds else None
    return latents, torch.tensor([500.0]), text, None, pooled, image, None, (), guidance
