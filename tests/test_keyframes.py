"""Keyframes (issue 20.1): the pure mapping to per-section overrides, the settings' checks, and the
property on the demo model: with a keyframe, the frame at its time is closer to the keyframe image."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack.components import asset
from framepack.keyframes import (
    Keyframe,
    find_recorded_keyframes,
    overrides_for,
    parse_keyframe_option,
    section_overrides,
    snap_keyframes,
    with_keyframes,
)
from framepack.planning import END, START, KeyframeSource, plan_sections
from framepack.settings import GenerationSettings
from framepack.video import read_frames, read_metadata

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
WINDOW = 9
BOUNDARY_SECONDS = WINDOW * 4 / 30  # 1.2 s: where one section ends and the next begins


# ---- the pure mapping -----------------------------------------------------------------------------------


def test_times_snap_to_the_nearest_section_boundary():
    anchors = snap_keyframes([1.0, 2.4, 4.5], sections=4, window=WINDOW)
    assert [a.position for a in anchors] == [9, 18, 36]  # the last latent of sections 1, 2 and 4
    assert [a.seconds for a in anchors] == pytest.approx([1.2, 2.4, 4.8])
    assert [a.frame for a in anchors] == [36, 72, 144]
    assert [a.index for a in anchors] == [0, 1, 2]


@pytest.mark.parametrize("times, message", [
    ([0.0], "outside the 2.43 s video"),  # the start image is the frame at 0 s
    ([-1.0], "outside"),
    ([2.5], "outside"),
    ([1.0, 1.3], "both snap to the section boundary at 1.20 s"),
    ([float("nan")], "must be a number"),
])
def test_times_outside_the_video_or_on_one_boundary_are_refused(times, message):
    with pytest.raises(ValueError, match=message):
        snap_keyframes(times, sections=2, window=WINDOW)


def test_the_section_ending_at_a_keyframe_gets_it_in_its_nearest_future_slot():
    plans = plan_sections(3, "inverted", window=WINDOW)  # generation order: video sections 3, 2, 1
    overrides = section_overrides(snap_keyframes([1.2], 3, WINDOW), plans)
    by_first = {plan.positions[0]: o for plan, o in zip(plans, overrides)}
    assert by_first[1].future == 0  # video section 1 ends at 1.2 s
    assert by_first[10].future is None and by_first[19].future is None
    # the embeddings are blended for the two sections that meet there, not for the third
    assert (by_first[1].blend, by_first[10].blend, by_first[19].blend) == ((0,), (0,), ())
    changed = with_keyframes(plans, overrides)
    for plan, new in zip(plans, changed):
        if by_first[plan.positions[0]].future is None:
            assert new == plan
            continue
        # only the slot right after the window changes: it held video latent 10, made one step earlier
        assert plan.levels[0].sources[:2] == (START, 10)
        assert new.levels[0].sources[:2] == (START, KeyframeSource(0))
        assert new.levels[0].sources[2:] == plan.levels[0].sources[2:] and new.levels[1:] == plan.levels[1:]
        assert new.levels[0].indices == plan.levels[0].indices and new.positions == plan.positions


def test_a_keyframe_at_the_end_takes_the_end_images_slot():
    plans = plan_sections(2, "inverted", window=WINDOW)
    with_end = plan_sections(2, "inverted", window=WINDOW, end_image=True)
    changed = with_keyframes(plans, overrides_for([Keyframe(2.4, "k.png")], plans))
    assert with_end[0].levels[0].sources[1] == END
    assert changed[0].levels[0].sources[1] == KeyframeSource(0)  # the slot the end image uses
    assert changed[1] == plans[1]


@pytest.mark.parametrize("mode", ["forward", "vanilla"])
def test_causal_modes_have_no_slot_for_a_keyframe(mode):
    plans = plan_sections(2, mode, window=WINDOW)
    with pytest.raises(ValueError, match="keyframes need mode 'inverted'"):
        overrides_for([Keyframe(1.2, "k.png")], plans)
    assert with_keyframes(plans, overrides_for([], plans)) == plans  # no keyframes: any mode


def test_option_and_settings_parse_and_check_keyframes():
    assert parse_keyframe_option("2.4:a:b.png") == Keyframe(2.4, "a:b.png")
    assert parse_keyframe_option("1.2s:k.png") == Keyframe(1.2, "k.png")
    for bad in ("k.png", "x:k.png", "1.2:"):
        with pytest.raises(ValueError, match="TIME:IMAGE|not a number"):
            parse_keyframe_option(bad)
    settings = GenerationSettings("s.png", "p", seconds=2.4, keyframes=[(1.2, "k.png")])
    assert settings.keyframes == (Keyframe(1.2, "k.png"),)
    assert GenerationSettings.from_dict(settings.to_dict()) == settings
    assert GenerationSettings.from_dict({"image": "s.png", "prompt": "p"}).keyframes == ()  # older videos
    with pytest.raises(ValueError, match="end image both set the last frame"):
        settings.replace(keyframes=(Keyframe(2.4, "k.png"),), end_image="e.png")
    with pytest.raises(ValueError, match="keyframes need mode 'inverted'"):
        settings.replace(mode="forward")


# ---- through the CLI, on the demo model ---------------------------------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def _generate(tmp_path: Path, out: str, *options: str) -> subprocess.CompletedProcess:
    start = str(asset("demo", "start.png"))
    prompt = "an orange triangle moves to the right on a striped red background"
    common = ["--model", "tiny", "--image", start, "--prompt", prompt, "--seconds", "2.4", "--steps", "4", "--device", "cpu"]
    return subprocess.run([FRAMEPACK, "generate", *common, "--out", str(tmp_path / out), *options],
                          capture_output=True, text=True, check=False, cwd=tmp_path)


@pytest.fixture(scope="module")
def keyframe_image(tmp_path_factory) -> Path:
    """Clearly unlike the demo's scene: a yellow square on a blue background."""
    pixels = np.zeros((128, 128, 3), np.uint8)
    pixels[:] = (30, 60, 200)
    pixels[40:88, 40:88] = (250, 250, 40)
    path = tmp_path_factory.mktemp("key") / "key.png"
    Image.fromarray(pixels).save(path)
    return path


def test_the_frame_at_a_keyframe_is_closer_to_it_and_the_job_resumes(tmp_path, keyframe_image):
    shutil.copy(keyframe_image, tmp_path / "key.png")
    with_key = _generate(tmp_path, "key.mp4", "--keyframe", "1.0:key.png")  # relative: resolved
    assert with_key.returncode == 0, with_key.stderr
    assert "keyframe at 1 s moved to 1.20 s" in with_key.stderr
    plain = _generate(tmp_path, "plain.mp4")
    assert plain.returncode == 0, plain.stderr
    key = np.asarray(Image.open(keyframe_image).convert("RGB"))
    frames, without = read_frames(tmp_path / "key.mp4"), read_frames(tmp_path / "plain.mp4")
    at = 36  # the frame at 1.2 s
    assert _psnr(frames[at], key) > _psnr(without[at], key) + 1.0
    # the video records the keyframe by file name, as it does the start image
    assert read_metadata(tmp_path / "key.mp4")["framepack"]["keyframes"] == [{"seconds": 1.0, "image": "key.png"}]

    # a resume from another directory recomputes a lost section the same way, from the job's own copy
    # of the keyframe image (the user's file moved away meanwhile)
    job = tmp_path / "key.job"
    assert (job / "inputs" / "keyframe-1" / "key.png").read_bytes() == (tmp_path / "key.png").read_bytes()
    (job / "sections" / "0001.safetensors").unlink()
    (tmp_path / "key.mp4").unlink()
    (tmp_path / "key.png").rename(tmp_path / "moved.png")
    resumed = subprocess.run([FRAMEPACK, "generate", "--resume", str(job), "--device", "cpu"], capture_output=True,
                             text=True, check=False, cwd=job)
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(read_frames(tmp_path / "key.mp4"), frames)
    (tmp_path / "moved.png").rename(tmp_path / "key.png")

    # --from finds the keyframe image beside the video, as it finds the start image; one line when it is gone
    recorded = read_metadata(tmp_path / "key.mp4")["framepack"]["keyframes"]
    assert find_recorded_keyframes(tmp_path / "key.mp4", recorded) == (Keyframe(1.0, str(tmp_path / "key.png")),)
    (tmp_path / "key.png").unlink()
    again = subprocess.run([FRAMEPACK, "generate", "--from", str(tmp_path / "key.mp4"), "--image",
                            str(asset("demo", "start.png")), "--out", str(tmp_path / "again.mp4")],
                           capture_output=True, text=True, check=False, cwd=job)
    assert again.returncode == 2 and "made from the image 'key.png'" in again.stderr and "--keyframe" in again.stderr


@pytest.mark.parametrize("option, message", [
    (["--keyframe", "9:KEY"], "keyframe at 9 s is outside the 2.43 s video"),
    (["--keyframe", "nope"], "expected TIME:IMAGE"),
    (["--keyframe", "1.2:missing.png"], "image not found:"),
    (["--keyframe", "1.2:KEY", "--mode", "forward"], "keyframes need mode 'inverted'"),
])
def test_bad_keyframes_are_one_line_before_anything_is_written(tmp_path, keyframe_image, option, message):
    option = [o.replace("KEY", str(keyframe_image)) for o in option]
    run = _generate(tmp_path, "v.mp4", *option)
    assert run.returncode == 2
    assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "v.mp4").exists() and not (tmp_path / "v.job").exists()
