"""A model's default section order may depend on the clip's length: a manifest's ``forward_up_to``
(seconds) makes an inverted model sample plain clips up to that length forward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.components import ModelSource, resolve_model
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.redo import model_plans
from framepack.settings import GenerationSettings
from framepack.video import read_frames
from tiny_hub import write_model_dir
from test_generate import write_image

LIMIT = 1.5  # seconds: one 1.2 s section is under it, two (2.4 s) are over it


def source(mode: str, **extra) -> ModelSource:
    return ModelSource("t", "h", None, mode, extra=extra)


@pytest.mark.parametrize("model, requested, seconds, plain, expected", [
    (source("inverted", forward_up_to=10), None, 5.0, True, "forward"),
    (source("inverted", forward_up_to=10), None, 10.0, True, "forward"),  # up to and including
    (source("inverted", forward_up_to=10), None, 10.1, True, "inverted"),
    (source("inverted", forward_up_to=10), None, 5.0, False, "inverted"),  # end image, keyframes, extend
    (source("inverted", forward_up_to=10), "inverted", 5.0, True, "inverted"),  # the request wins
    (source("inverted", forward_up_to=10), "vanilla", 60.0, True, "vanilla"),
    (source("inverted"), None, 5.0, True, "inverted"),  # no limit: the model's own, as before
    (source("forward", forward_up_to=10), None, 60.0, True, "forward"),  # only an inverted model changes
    (source("vanilla", forward_up_to=10), None, 5.0, True, "vanilla"),
])
def test_the_mode_is_the_request_else_the_models_for_that_length(model, requested, seconds, plain, expected):
    assert model.sampling_mode(requested, seconds, plain) == expected


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("model"), mode="inverted", forward_up_to=LIMIT)[0]


def settings(model_dir: Path, image: Path, **changes) -> GenerationSettings:
    base = dict(image=str(image), prompt="a red circle moves to the right", model=str(model_dir),
                seconds=1.2, steps=2, resolution=64, seed=3)
    return GenerationSettings(**{**base, **changes})


def test_plans_follow_the_length_and_inverted_only_jobs_stay_inverted(model_dir, tmp_path):
    image = write_image(tmp_path / "start.png")

    def modes(**changes) -> set[str]:
        return {plan.mode for plan in model_plans(settings(model_dir, image, **changes))[0]}

    assert modes() == {"forward"} and modes(seconds=2.4) == {"inverted"}
    assert modes(end_image=str(image)) == {"inverted"}  # an end image needs inverted order
    assert modes(seconds=2.4, keyframes=[(1.2, str(image))], mode=None) == {"inverted"}
    assert modes(mode="inverted") == {"inverted"} and modes(seconds=2.4, mode="forward") == {"forward"}


def test_the_default_samples_what_the_named_mode_samples(model_dir, tmp_path):
    """Bit for bit: a short clip by default is the forward clip, a longer one the inverted clip."""
    image = write_image(tmp_path / "start.png")
    pipeline = FramePackPipeline.from_model(str(model_dir))

    def video(name: str, **changes) -> np.ndarray:
        job = JobDir.create(tmp_path / name, settings(model_dir, image, **changes), tmp_path / f"{name}.mp4")
        pipeline.run(job)
        return read_frames(job.out)

    short = video("short")
    assert np.array_equal(short, video("short-forward", mode="forward"))
    assert not np.array_equal(short, video("short-inverted", mode="inverted"))  # the modes differ here
    assert np.array_equal(video("long", seconds=2.4), video("long-inverted", seconds=2.4, mode="inverted"))


@pytest.mark.parametrize("value", [0, -1, "10", True, [10]])
def test_a_bad_forward_up_to_is_named(tmp_path, value):
    root = tmp_path / "m"
    root.mkdir()
    (root / "framepack.json").write_text(json.dumps({"transformer": "t", "hunyuan": "h", "mode": "inverted",
                                                     "forward_up_to": value}))
    with pytest.raises(ValueError, match="forward_up_to must be a number of seconds > 0"):
        resolve_model(str(root))


def test_the_cli_says_which_mode_a_video_is_sampled_in(model_dir, tmp_path):
    image = write_image(tmp_path / "start.png")
    args = [str(Path(sys.executable).with_name("framepack")), "generate", "--model", str(model_dir), "--image",
            str(image), "--prompt", "a red circle", "--seconds", "1.2", "--steps", "1", "--resolution", "64"]
    short = subprocess.run([*args, "--out", str(tmp_path / "a.mp4")], capture_output=True, text=True)
    assert short.returncode == 0, short.stderr
    assert f"whole sections), forward mode (the model's default up to {LIMIT:g} s)\n" in short.stderr
    asked = subprocess.run([*args, "--mode", "forward", "--out", str(tmp_path / "b.mp4")], capture_output=True, text=True)
    assert "whole sections), forward mode\n" in asked.stderr  # asked for: no reason to give
