"""Batches from one command: --count N and --prompts FILE."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.batch import expand, read_prompts
from framepack.components import asset
from framepack.video import read_frames, read_metadata

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def test_lines_and_counts_make_every_job_with_consecutive_seeds(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text('a red circle\n# skipped\n\n{"prompt": "a blue square", "seed": 7, "steps": 3}\n')
    lines = read_prompts(prompts)
    assert lines == [(1, {"prompt": "a red circle"}), (4, {"prompt": "a blue square", "seed": 7, "steps": 3})]
    jobs = expand({"image": "i.png", "seed": 100, "steps": 2}, lines, 3, Path("out/v.mp4"), default_seed=1)
    assert [(j.settings["prompt"], j.settings["seed"], j.settings["steps"]) for j in jobs] == [
        ("a red circle", 100, 2), ("a red circle", 101, 2), ("a red circle", 102, 2),
        ("a blue square", 7, 3), ("a blue square", 8, 3), ("a blue square", 9, 3)]
    assert len({j.out for j in jobs}) == 6 and jobs[3].out == Path("out/v-line4-seed7.mp4")
    # --count alone: the command's settings, seeds from the default
    alone = expand({"prompt": "p"}, None, 2, Path("v.mp4"), default_seed=5)
    assert [(j.settings["seed"], j.out.name) for j in alone] == [(5, "v-seed5.mp4"), (6, "v-seed6.mp4")]
    assert [j.out.name for j in expand({}, None, 1, Path("v.mp4"), 5)] == ["v.mp4"]


@pytest.mark.parametrize("text, message", [
    ("ok\n{not json\n", "line 2: not valid JSON"),
    ('["a list"]\n', None),  # a plain prompt that happens to start with [ (a timeline is one)
    ("[1, 2]\n", None),
    ('{"seed": "x"}\n', "seed must be an integer"),
    ("# only a comment\n\n", "holds no prompt"),
])
def test_prompt_file_problems_name_their_line(tmp_path, text, message):
    path = tmp_path / "p.txt"
    path.write_text(text)
    if message is None:
        assert read_prompts(path)[0][1]["prompt"] == text.strip()
        return
    with pytest.raises(ValueError, match=message):
        expand({}, read_prompts(path), 1, Path("v.mp4"), 1)


def test_a_batch_runs_every_job_and_each_equals_its_single_run(tmp_path):
    start = str(asset("demo", "start.png"))
    prompts = tmp_path / "p.txt"
    prompts.write_text('a red circle moves to the right\n{"prompt": "a blue square moves up", "seed": 7}\n')
    common = ["--model", "tiny", "--image", start, "--seconds", "1.2", "--steps", "2", "--device", "cpu"]
    run = subprocess.run([FRAMEPACK, "generate", *common, "--prompts", str(prompts), "--count", "2",
                          "--out", str(tmp_path / "b" / "v.mp4")], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    made = sorted(p.name for p in (tmp_path / "b").glob("*.mp4"))
    assert made == ["v-line1-seed31337.mp4", "v-line1-seed31338.mp4", "v-line2-seed7.mp4", "v-line2-seed8.mp4"]
    recorded = read_metadata(tmp_path / "b" / "v-line2-seed8.mp4")["framepack"]
    assert (recorded["prompt"], recorded["seed"]) == ("a blue square moves up", 8)
    # the same job alone, in its own process, makes the same video
    single = subprocess.run([FRAMEPACK, "generate", *common, "--prompt", "a blue square moves up", "--seed", "8",
                             "--out", str(tmp_path / "one.mp4")], capture_output=True, text=True, check=False)
    assert single.returncode == 0, single.stderr
    assert np.array_equal(read_frames(tmp_path / "one.mp4"), read_frames(tmp_path / "b" / "v-line2-seed8.mp4"))


@pytest.mark.parametrize("extra, message", [
    (["--prompts", "{bad"], "line 1: not valid JSON"),
    (["--prompts", '{"prompt": "p", "colour": 1}'], "unknown settings: colour"),
    (["--count", "0"], "--count must be at least 1"),
    (["--count", "2", "--job-dir", "j"], "--job-dir names one job"),
])
def test_a_bad_batch_is_one_line_and_writes_nothing(tmp_path, extra, message):
    if extra[0] == "--prompts":
        (tmp_path / "p.txt").write_text(extra[1] + "\n")
        extra = ["--prompts", str(tmp_path / "p.txt")]
    run = subprocess.run([FRAMEPACK, "generate", "--model", "tiny", "--image", str(asset("demo", "start.png")),
                          "--prompt", "p", "--out", str(tmp_path / "out" / "v.mp4"), *extra],
                         capture_output=True, text=True, cwd=tmp_path, check=False)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
