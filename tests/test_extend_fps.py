"""``generate --extend`` reads the video at the models' 30 fps by presentation time, as ``dataset prepare`` does.

The synthetic videos show their frame number as a flat colour (tests/test_dataset_fps.py), so every frame
read says which source frame it is; the expected frames come from the definition there (``shown_at``: frame
k is the last one stamped at or before k / 30 s)."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from test_dataset_fps import LEVEL, frame_numbers, numbered, shown_at, timed_video
from test_extend import SECTION_FRAMES, _run

from framepack.extend import count_frames, read_video, source_layout, start_frame
from framepack.images import resize_and_crop
from framepack.planning import FPS
from framepack.video import overlap_frames, read_frames, write_segment

WINDOW = 9
HISTORY = 19  # the released context schedule's latents: up to 3 source sections


def at_rate(path: Path, rate: int, count: int, size: int = 32) -> tuple[Path, list[int]]:
    """A video of ``count`` numbered frames at ``rate`` fps, and the frame numbers it shows at 30 fps."""
    write_segment(path, numbered(count, size), crf=0, fps=rate)
    return path, shown_at([Fraction(i, rate) for i in range(count)], FPS)


@pytest.mark.parametrize("rate, count, frames", [(60, 100, 50), (24, 50, 62), (30, 50, 50)])
def test_the_video_is_counted_read_and_started_at_30_fps(tmp_path: Path, rate: int, count: int, frames: int) -> None:
    path, expected = at_rate(tmp_path / f"at-{rate}.mp4", rate, count)
    assert len(expected) == frames  # 100 frames at 60 fps last 1.65 s: 50 at 30; 50 at 24 fps 2.04 s: 62
    assert count_frames(path) == frames  # from the packets, nothing decoded
    read = read_video(path, 32, 32)
    assert frame_numbers(read) == expected == [k * rate // FPS for k in range(frames)]
    # forward: the start image is the first frame of the part used as context, an index into those frames
    layout = source_layout(path, WINDOW, "forward", HISTORY)
    assert layout.frames == frames and layout.first_used == frames - 37
    assert frame_numbers(start_frame(path, layout)[None]) == [expected[layout.first_used]]


def test_a_variable_frame_rate_video_is_counted_and_read_by_its_timestamps(tmp_path: Path) -> None:
    times_ms = [0, 10, 50, 51, 120, 200, 210, 290, 400, 480, 500, 1000]
    path = timed_video(tmp_path / "vfr.mp4", times_ms)
    expected = shown_at([Fraction(ms, 1000) for ms in times_ms], FPS)
    assert count_frames(path) == len(expected) == 31
    assert frame_numbers(read_video(path, 32, 32)) == expected


def test_a_30_fps_video_is_read_frame_for_frame(tmp_path: Path) -> None:
    """Nothing changes at the models' rate: the decoded frames themselves, each resized as before. The clip
    moves, so H.264 gives it B-frames: its packets come out of display order, the count must sort them."""
    import av

    from framepack.train.world import WorldParams, render

    path = tmp_path / "moving.mp4"
    write_segment(path, render(WorldParams("circle", "red", "plain", "blue", "right", speed=10.0, x=0.3, y=0.5), 41))
    with av.open(str(path)) as container:
        stamps = [packet.pts for packet in container.demux(container.streams.video[0]) if packet.size]
    assert stamps[-1] < max(stamps)  # the last packet decoded is not the last frame shown
    decoded = read_frames(path)
    assert count_frames(path) == len(decoded) == 41
    assert np.array_equal(read_video(path, 64, 96), np.stack([resize_and_crop(f, 64, 96) for f in decoded]))
    layout = source_layout(path, WINDOW, "forward", HISTORY)
    assert np.array_equal(start_frame(path, layout), decoded[layout.first_used])


def test_a_video_without_timestamps_is_one_line(tmp_path: Path) -> None:
    """A raw H.264 stream carries no timestamps: there is no time to resample it by."""
    import av

    path = tmp_path / "raw.h264"
    with av.open(str(path), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        for pixels in numbered(40):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    for read in (count_frames, lambda p: read_video(p, 32, 32)):
        with pytest.raises(ValueError, match="without a timestamp: cannot resample it to 30 fps") as caught:
            read(path)
        assert len(str(caught.value).splitlines()) == 1 and str(path) in str(caught.value)
    run = _run("generate", "--extend", str(path), "--prompt", "numbers", "--device", "cpu",
               "--out", str(tmp_path / "out" / "v.mp4"))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "without a timestamp" in run.stderr and not (tmp_path / "out").exists()


def test_extending_a_60_fps_video_keeps_its_speed_and_resumes(tmp_path: Path) -> None:
    """Forward: the output is the video at 30 fps (50 frames of its 100), then one new section; a resume
    from the job's own copy makes the same video."""
    clip, expected = at_rate(tmp_path / "at-60.mp4", 60, 100, size=128)
    out = tmp_path / "after.mp4"
    args = ("--prompt", "numbers count up", "--device", "cpu")
    run = _run("generate", "--extend", str(clip), "--mode", "forward", "--seconds", "1.2", "--steps", "2",
               "--out", str(out), *args)
    assert run.returncode == 0, run.stderr
    extended = read_frames(out)
    assert len(extended) == len(expected) + SECTION_FRAMES == 50 + SECTION_FRAMES
    # the video's own frames, every other one, up to the blend into the new frames; by the red channel
    # alone (the frame number mod 32): the green steps do not survive two lossy encodes at this size
    kept = len(expected) - overlap_frames(WINDOW)
    red = extended[:kept, ..., 0].mean(axis=(1, 2))
    assert [round(r / LEVEL) % 32 for r in red] == [n % 32 for n in expected[:kept]]
    assert expected[:kept] == list(range(0, 2 * kept, 2))

    job = tmp_path / "after.job"
    last = json.loads((job / "state.json").read_text())["finished"] - 1
    (job / "sections" / f"{last:04d}.safetensors").unlink()
    shutil.move(str(clip), tmp_path / "moved.mp4")  # the job reads its own copy
    again = _run("generate", "--resume", str(job), "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_frames(out), extended)
