"""Colour drift correction (issue 20.6): the pure transfer's properties, then ``--color-match`` in
the pipeline (every mode, recorded, the same frames after a stop and resume) and from the CLI.

Pipeline cases run the tiny random model at 64 px, 2 steps.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_generate import FRAMEPACK, settings_for, tiny_model, write_image  # noqa: F401  (tiny_model: a fixture)

from framepack.color_match import METHODS, match_colors, rgb_to_lab
from framepack.jobs import JobDir
from framepack.pipeline import Cancelled, FramePackPipeline, SectionFinished
from framepack.video import read_frames, read_metadata

MATCHING = [m for m in METHODS if m != "none"]


def scene(seed: int, frames: int = 6) -> np.ndarray:
    """(frames, 32, 32, 3) uint8: smooth colour gradients with a moving bright square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    base = np.stack([xx, yy, 1 - xx * yy], axis=-1) * rng.uniform(80, 200, 3) + rng.uniform(0, 40, 3)
    clip = np.repeat(base[None], frames, axis=0)
    for t in range(frames):
        clip[t, 8 + t : 16 + t, 8:16] = rng.uniform(150, 255, 3)
    return np.clip(clip, 0, 255).astype(np.uint8)


def lab_moments(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = rgb_to_lab(np.asarray(frames, np.float64).reshape(-1, 3))
    return lab.mean(axis=0), lab.std(axis=0)


# ---- the pure function ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_a_section_that_already_matches_is_left_as_it_is(method):
    reference = scene(0, frames=1)[0]
    section = np.repeat(reference[None], 5, axis=0)  # the reference's own colours, exactly
    out = match_colors(section, reference, method)
    assert out.shape == section.shape and out.dtype == np.float32
    assert np.abs(out - section).max() < 0.01


def test_lab_gives_the_section_the_references_colour_statistics():
    reference = scene(1, frames=1)[0]
    drifted = scene(1).astype(np.float32) * 0.7 + np.array([30, 10, -5])  # darker, greyer, tinted
    out = match_colors(np.clip(drifted, 0, 255), reference, "lab")
    (mean, std), (want_mean, want_std) = lab_moments(out), lab_moments(reference)
    before = lab_moments(drifted)[0]
    assert np.abs(mean - want_mean).max() < 1.0 < np.abs(before - want_mean).max()
    assert np.allclose(std, want_std, rtol=0.05, atol=0.5)


def test_histogram_gives_each_channel_the_references_distribution():
    reference = scene(2, frames=1)[0]
    drifted = np.clip(scene(2).astype(np.float32) * 0.6 + 50, 0, 255)
    out = match_colors(drifted, reference, "histogram")
    for c in range(3):
        got = np.percentile(out[..., c], [5, 25, 50, 75, 95])
        want = np.percentile(reference[..., c], [5, 25, 50, 75, 95])
        assert np.abs(got - want).max() < 3.0


@pytest.mark.parametrize("method", MATCHING)
def test_the_output_stays_in_the_uint8_range(method):
    rng = np.random.default_rng(3)
    reference = rng.uniform(225, 255, (8, 8, 3)).astype(np.uint8)  # bright: the section is shifted up
    section = rng.uniform(100, 140, (4, 8, 8, 3))
    section[:, ::4, ::4], section[:, 1::4, 1::4] = 255, 0  # outliers a mean/std transfer pushes past 255
    out = match_colors(section, reference, method)
    assert out.min() >= 0 and out.max() <= 255
    assert np.array_equal(match_colors(section, reference, method), out)  # deterministic


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown colour match 'sepia'"):
        match_colors(scene(0), scene(0)[0], "sepia")


# ---- in the pipeline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> FramePackPipeline:
    return FramePackPipeline.from_model(str(tiny_model))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return write_image(tmp_path_factory.mktemp("inputs") / "start.png")


def make(pipeline, settings, root, stop_after: int | None = None) -> JobDir:
    job = JobDir.create(root / "job", settings, root / "out.mp4")
    done: list = []

    def on_event(event) -> None:
        if isinstance(event, SectionFinished):
            done.append(event)

    if stop_after is None:
        pipeline.run(job, on_event=on_event)
    else:
        with pytest.raises(Cancelled):
            pipeline.run(job, on_event=on_event, should_stop=lambda: len(done) >= stop_after)
    return job


@pytest.mark.parametrize("mode, method, lose_pending", [("inverted", "lab", False), ("forward", "lab", True),
                                                        ("vanilla", "histogram", False)])
def test_color_match_is_recorded_and_a_stopped_job_resumes_to_the_same_frames(pipeline, tiny_model, image,
                                                                               tmp_path, mode, method, lose_pending):
    settings = settings_for(tiny_model, image, seconds=2.4, steps=2, mode=mode, crf=0, color_match=method)
    whole = make(pipeline, settings, tmp_path / "whole")
    frames = read_frames(whole.out)
    assert read_metadata(whole.out)["framepack"]["color_match"] == method
    assert json.loads((whole.root / "settings.json").read_text())["color_match"] == method

    stopped = make(pipeline, settings, tmp_path / "stopped", stop_after=1)
    assert stopped.finished == 1
    if lose_pending:  # then the resume decodes the finished section again: it must be matched as before
        pending = list(stopped.root.glob("video/pending-*.npy"))
        assert len(pending) == 1
        pending[0].unlink()
    pipeline.run(JobDir.open(stopped.root))
    assert np.array_equal(read_frames(stopped.out), frames)


def test_only_the_pixels_change_toward_the_start_frames_colours(pipeline, tiny_model, image, tmp_path):
    settings = settings_for(tiny_model, image, seconds=2.4, steps=2, crf=0)
    plain = make(pipeline, settings, tmp_path / "plain")
    matched = make(pipeline, settings.replace(color_match="lab"), tmp_path / "matched")
    want = lab_moments(np.asarray(Image.open(image).convert("RGB")))[0]
    distance = [np.abs(lab_moments(read_frames(job.out))[0] - want).sum() for job in (plain, matched)]
    assert distance[1] < distance[0]
    for step in range(2):  # the latents the model conditions on are the sampled ones
        assert np.array_equal(plain.load_latents(step), matched.load_latents(step))


def test_an_extended_videos_own_frames_are_left_as_they_are(pipeline, tiny_model, tmp_path):
    """--extend: only the new sections are matched (to the frame they start from), the video's stay."""
    from framepack.settings import GenerationSettings
    from framepack.train.world import WorldParams, render
    from framepack.video import overlap_frames, write_segment

    clip = tmp_path / "clip.mp4"
    write_segment(clip, render(WorldParams("circle", "red", "plain", "blue", "right", speed=10.0, x=0.3, y=0.5), 50,
                               size=64), crf=0)
    base = GenerationSettings(image=None, prompt="a red circle moves to the right", model=str(tiny_model), seconds=1.2,
                              steps=2, resolution=64, mode="forward", crf=0, extend=str(clip))
    plain = read_frames(make(pipeline, base, tmp_path / "plain").out)
    matched = read_frames(make(pipeline, base.replace(color_match="lab"), tmp_path / "matched").out)
    kept = 50 - overlap_frames(base.window)  # the video's frames before the blend into the new ones
    assert len(matched) == len(plain) > 50
    assert np.array_equal(matched[:kept], plain[:kept])
    assert not np.array_equal(matched[50:], plain[50:])


# ---- the CLI ---------------------------------------------------------------------------------------------


def one_line_error(*args: str) -> str:
    result = subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_the_cli_refuses_an_unknown_method_and_text_to_video_in_one_line(image, tmp_path):
    out = tmp_path / "out.mp4"
    assert "unknown colour match 'sepia'" in one_line_error("generate", "--image", str(image), "--prompt", "x",
                                                            "--color-match", "sepia", "--out", str(out))
    assert "needs a start image" in one_line_error("generate", "--prompt", "x", "--color-match", "--out", str(out))
    assert not out.exists() and not out.with_name("out.mp4.job").exists()
