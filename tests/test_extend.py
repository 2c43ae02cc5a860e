"""Extend a video (issue 20.2): generate --extend VIDEO, through the real entry point on the demo model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.components import asset
from framepack.extend import frame_differences, seam, span_frames
from framepack.planning import TEMPORAL_RATIO
from framepack.video import overlap_frames, read_frames, soft_join, write_segment

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
PROMPT = "An orange triangle moves to the right on a striped red background"
WINDOW = 9
SECTION_FRAMES = TEMPORAL_RATIO * WINDOW  # new frames per section


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, check=False)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(out: Path, *options: str) -> Path:
    """A video of the demo model from its start image and PROMPT, through the CLI (tests/test_redo.py too)."""
    run = _run("generate", "--image", str(asset("demo", "start.png")), "--prompt", PROMPT, "--device", "cpu",
               "--out", str(out), *options)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Path:
    """A 2-section video of the demo model, inverted."""
    return generate(tmp_path_factory.mktemp("source") / "ours.mp4", "--seconds", "2.4", "--steps", "8", "--mode", "inverted")


def test_a_span_decodes_to_the_frames_its_latents_stand_for():
    # latent 0 is one frame, latent k >= 1 frames 4k-3 .. 4k; a span's first latent gives its last frame only
    assert span_frames((0, 1, 2), 0) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert span_frames((10, 11), 9) == [4, 5, 6, 7, 8]


def _ramp(levels: list[float]) -> np.ndarray:
    """Uniform frames at these grey levels: consecutive differences are the steps between levels."""
    return np.stack([np.full((2, 2, 3), v, np.float32) for v in levels])


def test_the_seam_separates_a_jump_at_the_join_from_the_new_frames_own_changes():
    original = _ramp([10, 11, 12, 13, 14])  # steps of 1
    # forward: a blend of 2 frames, then the new frames moving by 3 per frame, with a jump of 5 into them
    forward = np.concatenate([original[:3], _ramp([14, 16, 21, 24, 27])])
    measured = seam(original, forward, backwards=False, overlap=2)
    assert measured.join == 5.0 and measured.inside == (1.0,) * 4 and measured.new == (3.0, 3.0)
    assert not measured.within
    # backward: the new frames come first; a join as small as the original's steps is within
    backward = np.concatenate([_ramp([2, 4, 6, 8]), original])
    measured = seam(original, backward, backwards=True, overlap=0)
    assert measured.new == (2.0,) * 4 and measured.join == 1.0 and measured.within


def test_the_seam_does_not_count_the_originals_own_step_at_the_blends_outer_end():
    """The blend (soft_join, as the pipeline joins the new section to the video's frames) ends on
    the video's own frame: a step of the original right there is the original's, not the join's."""
    # backward: 2 new frames, the 4-frame slot, a blend of 3 over the video's frames 4-6; the video
    # steps by 20 from its frame 6 (the blend's last, all video) to 7; the new frames continue it exactly
    original = _ramp([10] * 7 + [30] * 3)
    backward = soft_join(_ramp([10] * 9), original[4:], 3)
    assert len(backward) == 2 + len(original)
    measured = seam(original, backward, backwards=True, overlap=3)
    assert measured.join == 0.0 and max(measured.inside) == 20.0
    # forward: the video steps by 20 from its frame 6 into 7, the blend's first (all video)
    original = _ramp([30] * 7 + [10] * 3)
    forward = soft_join(original, _ramp([10] * 5), 3)
    measured = seam(original, forward, backwards=False, overlap=3)
    assert measured.join == 0.0 and max(measured.inside) == 20.0
    # a jump across the blend is still counted: 10 -> 50 -> 90 over its frames
    measured = seam(original, soft_join(original, _ramp([90] * 5), 3), backwards=False, overlap=3)
    assert measured.join == 40.0 and not measured.within


def test_extending_backward_adds_the_new_frames_before_the_video_without_a_seam(ours, tmp_path):
    out = tmp_path / "longer.mp4"
    run = _run("generate", "--extend", str(ours), "--prompt", PROMPT, "--seconds", "1.2", "--steps", "25",
               "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr
    original, extended = read_frames(ours), read_frames(out)
    assert extended.shape[1:] == original.shape[1:]
    assert len(extended) == len(original) + SECTION_FRAMES  # the original plus one new section
    # after the join the original itself (re-encoded): the seam's blend region aside, as close as
    # two encodes of the same frames
    blend = TEMPORAL_RATIO + overlap_frames(WINDOW)
    after = np.abs(extended[SECTION_FRAMES + blend :].astype(float) - original[blend:].astype(float)).mean()
    assert after < 2.0, after
    # the property: the frame difference across the join within the original's own range
    measured = seam(original, extended, backwards=True, overlap=overlap_frames(WINDOW))
    assert measured.within, (measured.join, max(measured.inside))
    # the source is recorded: copied into the job with its sha256
    settings = json.loads((tmp_path / "longer.job" / "settings.json").read_text())
    copy = tmp_path / "longer.job" / settings["extend"]
    assert settings["extend_sha256"] == _sha256(copy) == _sha256(ours)

    # a resume after losing the last new section makes the same video from the job's own copy
    job = tmp_path / "longer.job"
    state = json.loads((job / "state.json").read_text())
    last = state["finished"] - 1
    (job / "sections" / f"{last:04d}.safetensors").unlink()
    moved = tmp_path / "moved.mp4"
    shutil.move(str(ours), moved)  # the user's file is not needed any more
    try:
        again = _run("generate", "--resume", str(job), "--device", "cpu")
    finally:
        shutil.move(str(moved), ours)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_frames(out), extended)

    # a redo of its one new section keeps the video's sections and, with the same seed, makes the same video
    redo = _run("redo", str(job), "--section", "1", "--device", "cpu", "--out", str(tmp_path / "redo.mp4"))
    assert redo.returncode == 0, redo.stderr
    assert json.loads((tmp_path / "redo.job" / "redo.json").read_text())["kept_steps"] == list(range(last))
    assert np.array_equal(read_frames(tmp_path / "redo.mp4"), extended)


def test_extending_forward_continues_a_video_that_is_not_ours(tmp_path):
    from framepack.train.world import WorldParams, render

    clip = tmp_path / "rendered.mp4"
    frames = render(WorldParams("circle", "red", "plain", "blue", "right", speed=10.0, x=0.3, y=0.5), 50)
    write_segment(clip, frames)  # no framepack settings in it
    out = tmp_path / "after.mp4"
    run = _run("generate", "--extend", str(clip), "--mode", "forward", "--prompt", "a red circle moves to the right",
               "--seconds", "1.2", "--steps", "2", "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr
    original, extended = read_frames(clip), read_frames(out)
    assert len(extended) == len(original) + SECTION_FRAMES
    # the video comes first, unchanged but for the encoding, up to the blend into the new frames
    kept = len(original) - overlap_frames(WINDOW)
    assert np.abs(extended[:kept].astype(float) - original[:kept].astype(float)).mean() < 2.0
    assert frame_differences(extended[kept - 1 :]).mean() > 0  # new frames follow


def _sound_only(path: Path) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=44100)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 44100
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not a video at all"), "cannot read the video to extend"),
    (lambda p: write_segment(p, np.zeros((10, 64, 64, 3), np.uint8)), "has 10 frames; extending needs at least 37"),
    (_sound_only, "holds no video stream"),
    (lambda p: None, "video to extend not found"),
])
def test_a_bad_video_is_one_line_and_nothing_is_written(tmp_path, make, message):
    video = tmp_path / "bad.mp4"
    make(video)
    out = tmp_path / "out" / "v.mp4"
    run = _run("generate", "--extend", str(video), "--prompt", PROMPT, "--device", "cpu", "--out", str(out))
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists()
