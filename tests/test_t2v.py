"""Text-to-video (issue 20.3): ``generate`` without ``--image`` starts from a blank frame, runs end to
end on the demo model, records no start image, resumes array-equal and repeats with ``--from``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from framepack.pipeline import BLANK_START_RGB, blank_start_frame
from framepack.settings import GenerationSettings
from framepack.video import read_frames, read_metadata

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
PROMPT = "a yellow circle moves to the left on a plain blue background"


def _run(cwd: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, "generate", *options, "--device", "cpu"], capture_output=True, text=True,
                          check=False, cwd=cwd)


def test_the_blank_start_is_a_bucket_sized_frame_of_one_colour():
    frame = blank_start_frame(128)
    assert frame.dtype == np.uint8 and frame.shape[2] == 3 and frame.shape[0] % 16 == 0
    assert (frame == np.array(BLANK_START_RGB, np.uint8)).all()
    settings = GenerationSettings(None, PROMPT)
    assert GenerationSettings.from_dict(settings.to_dict()) == settings


def test_a_text_to_video_job_runs_resumes_and_repeats(tmp_path):
    made = _run(tmp_path, "--model", "tiny", "--prompt", PROMPT, "--seconds", "2.4", "--steps", "4", "--out", "t2v.mp4")
    assert made.returncode == 0, made.stderr
    frames = read_frames(tmp_path / "t2v.mp4")
    assert frames.shape[0] == 73  # 2 sections
    # it starts from the blank frame (as the VAE reconstructs it), and the model draws on it after that
    off_blank = np.abs(frames.astype(int) - np.array(BLANK_START_RGB)).mean(axis=(1, 2, 3))
    assert off_blank[0] < off_blank[1:].min() / 2
    assert read_metadata(tmp_path / "t2v.mp4")["framepack"]["image"] is None
    job = tmp_path / "t2v.job"
    assert json.loads((job / "settings.json").read_text())["image"] is None
    assert not list((job / "inputs").glob("start.*"))

    # a lost section is computed again the same way
    (job / "sections" / "0001.safetensors").unlink()
    (tmp_path / "t2v.mp4").unlink()
    resumed = _run(job, "--resume", str(job))
    assert resumed.returncode == 0, resumed.stderr
    assert np.array_equal(read_frames(tmp_path / "t2v.mp4"), frames)

    # --from needs no image either; another seed makes another video
    again = _run(tmp_path, "--from", "t2v.mp4", "--seed", "5", "--out", "again.mp4")
    assert again.returncode == 0, again.stderr
    other = read_frames(tmp_path / "again.mp4")
    assert other.shape == frames.shape and not np.array_equal(other, frames)
    assert read_metadata(tmp_path / "again.mp4")["framepack"]["seed"] == 5
