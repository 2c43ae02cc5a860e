"""``framepack dataset prepare`` resamples videos to the model's 30 fps by presentation time (``--fps``).

The synthetic videos show their frame number as a flat colour, so every output frame says which source
frame it is; the expected frames come from the definition (output frame k is the last source frame
stamped at or before k / fps, a stamp up to 1 ms late counting as on time: containers round to
milliseconds), computed here by brute force with exact fractions."""

from __future__ import annotations

import json
from fractions import Fraction
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from framepack.images import resize_and_crop
from framepack.train import dataset
from framepack.train.dataset import INDEX, MANIFEST, MediaFile, PreparedDataset, prepare, read_clip
from framepack.video import read_frames, resample, write_segment

RESOLUTION = 64
LEVEL = 8  # colour steps between frame numbers: wide enough to survive H.264's rounding at crf 0


def numbered(count: int, size: int = 32) -> np.ndarray:
    """(count, size, size, 3) uint8: frame i is flat, red and green spelling i in base 32."""
    return np.stack([np.full((size, size, 3), (LEVEL * (i % 32), LEVEL * (i // 32), 128), np.uint8)
                     for i in range(count)])


def frame_numbers(frames: np.ndarray) -> list[int]:
    red, green = frames[..., 0].mean(axis=(1, 2)), frames[..., 1].mean(axis=(1, 2))
    return [round(r / LEVEL) + 32 * round(g / LEVEL) for r, g in zip(red, green)]


def timed_video(path: Path, times_ms: list[int]) -> Path:
    """A variable-frame-rate mp4: frame i stamped at times_ms[i] milliseconds."""
    import av

    frames = numbered(len(times_ms))
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.height, stream.width, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "0"}
        for pixels, ms in zip(frames, times_ms):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def shown_at(times: list[Fraction], fps: int) -> list[int]:
    """The definition: for each k / fps up to the last frame's time, the last frame stamped at or before
    it (or up to 1 ms after: rounded), times counted from the first frame's."""
    late = Fraction(1, 1000)
    since = [t - times[0] for t in times]
    count = int((since[-1] + late) * fps) + 1
    return [max(i for i, t in enumerate(since) if t <= Fraction(k, fps) + late) for k in range(count)]


def clip(path: Path, fps: float = 30, max_frames: int | None = None) -> np.ndarray:
    return read_clip(MediaFile(path, path.name, "a caption", video=True), RESOLUTION, max_frames, fps)


def captioned(path: Path, caption: str = "numbers count up") -> Path:
    path.with_suffix(".txt").write_text(caption)
    return path


# ---- the pure function ------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["60 fps", "24 fps", "30 fps", "29.97 fps", "variable", "late start"])
@pytest.mark.parametrize("fps", [30, 24, 15, 60])
def test_resample_takes_the_frame_showing_at_each_output_time(source: str, fps: int) -> None:
    times = {"60 fps": [Fraction(i, 60) for i in range(50)], "24 fps": [Fraction(i, 24) for i in range(50)],
             "30 fps": [Fraction(i, 30) for i in range(50)], "29.97 fps": [Fraction(1001 * i, 30000) for i in range(50)],
             "variable": [Fraction(ms, 1000) for ms in (0, 10, 50, 51, 120, 200, 210, 290, 400, 480, 500, 1000)],
             "late start": [Fraction(7, 2) + Fraction(i, 60) for i in range(50)]}[source]
    got = list(resample([(t, i) for i, t in enumerate(times)], fps))
    assert got == shown_at(times, fps)
    if source == f"{fps} fps":
        assert got == list(range(50))  # already at the rate: frame for frame


def test_resample_counts_frames_stamped_in_whole_milliseconds_as_on_time() -> None:
    """WebM and Matroska round stamps to 1 ms: a 30 fps frame due at 66.67 ms says 67 ms."""
    times = [Fraction(round(1000 * i / 30), 1000) for i in range(40)]
    assert list(resample([(t, i) for i, t in enumerate(times)], 30)) == list(range(40))
    # ... yet a frame a real fraction of a frame late is not on time
    late = [Fraction(0), Fraction(1, 30) + Fraction(4, 1000), Fraction(2, 30)]
    assert list(resample([(t, i) for i, t in enumerate(late)], 30)) == [0, 0, 2]


def test_resample_reads_no_further_than_it_must() -> None:
    read = []

    def frames():
        for i in range(100):
            read.append(i)
            yield Fraction(i, 60), i

    assert list(islice(resample(frames(), 30), 5)) == [0, 2, 4, 6, 8]
    assert len(read) == 10  # the 10th frame (9/60 s) ends the showing of the 5th output frame
    assert list(resample([], 30)) == []
    assert list(resample([(Fraction(2), "only")], 30)) == ["only"]


# ---- videos -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [60, 24, 30])
def test_videos_are_read_at_30_fps_by_presentation_time(rate: int, tmp_path: Path) -> None:
    path = tmp_path / f"at-{rate}.mp4"
    write_segment(path, numbered(50), crf=0, fps=rate)
    frames = clip(path)
    expected = shown_at([Fraction(i, rate) for i in range(50)], 30)
    kept = dataset.clip_length(len(expected))
    assert frame_numbers(frames) == expected[:kept] == [k * rate // 30 for k in range(kept)]
    assert frames.shape[1:] == (RESOLUTION, RESOLUTION, 3)


def test_a_variable_frame_rate_video_follows_its_timestamps(tmp_path: Path) -> None:
    times_ms = [0, 10, 50, 51, 120, 200, 210, 290, 400, 480, 500, 1000]
    path = timed_video(tmp_path / "vfr.mp4", times_ms)
    expected = shown_at([Fraction(ms, 1000) for ms in times_ms], 30)
    assert len(expected) == 31
    assert frame_numbers(clip(path)) == expected[:dataset.clip_length(31)]
    assert frame_numbers(clip(path, fps=10)) == shown_at([Fraction(ms, 1000) for ms in times_ms], 10)[:9]


def test_a_30_fps_video_keeps_exactly_the_frames_it_has(tmp_path: Path) -> None:
    """The frames before resampling existed: every one decoded, bucketed, cut to 1 + 4n (17 of 19)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    write_segment(path, rng.integers(0, 256, (19, 48, 80, 3), dtype=np.uint8))
    frames = clip(path)
    decoded = read_frames(path)
    height, width = frames.shape[1:3]
    assert np.array_equal(frames, np.stack([resize_and_crop(f, height, width) for f in decoded[:17]]))


def test_max_frames_counts_frames_after_resampling(tmp_path: Path) -> None:
    path = tmp_path / "at-60.mp4"
    write_segment(path, numbered(60), crf=0, fps=60)
    assert frame_numbers(clip(path, max_frames=9)) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert frame_numbers(clip(path, fps=60, max_frames=9)) == list(range(9))


# ---- prepare and the CLI ---------------------------------------------------------------------------------


def test_prepare_records_the_rates_and_refuses_another_fps_on_the_same_out(tmp_path: Path) -> None:
    root = tmp_path / "videos"
    root.mkdir()
    write_segment(captioned(root / "fast.mp4"), numbered(40), crf=0, fps=60)  # 0.65 s: 20 frames at 30 fps
    write_segment(captioned(root / "slow.mp4"), numbered(14), crf=0, fps=24)  # 13/24 s: 17 frames at 30 fps
    prepare(root, tmp_path / "out", "tiny", resolution=RESOLUTION, progress=False)
    data = PreparedDataset(tmp_path / "out")
    latents = {data.sample(i).source: data.sample(i).latents.shape[1] for i in range(len(data))}
    assert latents == {"fast.mp4": 5, "slow.mp4": 5}  # 17 frames each (1 + 4 * 4); as read, 33 and 13
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["fps"] == 30
    entries = [json.loads(line) for line in (tmp_path / "out" / INDEX).read_text().splitlines()]
    assert {e["source"]: e["source_fps"] for e in entries} == {"fast.mp4": 60.0, "slow.mp4": 24.0}

    with pytest.raises(ValueError, match=r"other settings \(fps 30\)"):
        prepare(root, tmp_path / "out", "tiny", resolution=RESOLUTION, fps=24, progress=False)
    assert prepare(root, tmp_path / "out", "tiny", resolution=RESOLUTION, fps=30.0, progress=False).encoded == 0


def test_cli_fps_reaches_the_dataset(tmp_path: Path) -> None:
    from framepack.cli import main

    root = tmp_path / "videos"
    root.mkdir()
    write_segment(captioned(root / "fast.mp4"), numbered(40), crf=0, fps=60)
    assert main(["dataset", "prepare", str(root), "--model", "tiny", "--out", str(tmp_path / "out"),
                 "--resolution", str(RESOLUTION), "--fps", "15"]) == 0
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["fps"] == 15
    assert PreparedDataset(tmp_path / "out").sample(0).latents.shape[1] == 3  # 10 frames at 15 fps: 9 kept


@pytest.mark.parametrize("value", ["0", "-24", "abc", "nan", "inf", ""])
def test_cli_bad_fps_is_one_line_and_exit_2(value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from framepack.cli import main

    root = tmp_path / "videos"
    root.mkdir()
    write_segment(captioned(root / "clip.mp4"), numbered(5), crf=0)
    before = set(tmp_path.rglob("*"))
    try:
        code = main(["dataset", "prepare", str(root), "--model", "tiny", "--out", str(tmp_path / "out"),
                     "--fps", value])
    except SystemExit as exc:  # argparse's own exit, for what is not a number
        code = exc.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "error" in lines[0] and "fps" in lines[0] and "Traceback" not in lines[0], lines[0]
    assert set(tmp_path.rglob("*")) == before
