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
