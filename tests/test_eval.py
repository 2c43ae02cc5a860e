"""``framepack eval``'s measurements: analytic values, and the world's own ground truth as a perfect model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from framepack.train import world
from framepack.train.evaluate import (
    EvalConfig,
    EvalResult,
    colourfulness,
    direction_cases,
    drift,
    format_table,
    long_cases,
    persistence,
    sharpness,
)


def test_sharpness_is_the_mean_absolute_laplacian():
    flat = np.full((2, 16, 16, 3), 90, np.uint8)
    assert np.allclose(sharpness(flat), 0)
    # a grey checkerboard 0/255: every interior Laplacian is +-4 * 255
    board = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)
    frames = np.repeat(board[None, :, :, None], 3, axis=3)
    assert sharpness(frames) == pytest.approx([4 * 255], rel=1e-9)


def test_colourfulness_of_grey_and_of_a_flat_colour():
    assert colourfulness(np.full((1, 8, 8, 3), 128, np.uint8)) == pytest.approx([0.0], abs=1e-9)
    red = np.zeros((1, 8, 8, 3), np.uint8)
    red[..., 0] = 255
    # rg = 255, yb = 127.5 everywhere: no spread, 0.3 * |mean|
    assert colourfulness(red) == pytest.approx([0.3 * np.hypot(255, 127.5)])


def test_drift_compares_the_first_and_last_15_percent():
    assert drift(np.full(40, 3.0)) == 0
    assert drift(np.arange(100.0)) == pytest.approx(92 - 7)  # means of 0..14 and 85..99
    assert drift(np.array([1.0, 5.0])) == 4  # at least one frame at each end


def test_persistence_counts_frames_where_the_object_is_still_there():
    params = world.held_out(1)[0]
    frames = world.render(params, 20)
    rgb = world.PALETTE[params.color]
    assert persistence(frames, rgb) == 1.0
    gone = frames.copy()
    gone[10:] = gone[0, 0, 0]  # the object vanishes halfway (background colour everywhere)
    assert persistence(gone, rgb) == pytest.approx(0.5)


def test_the_ground_truth_scores_full_marks():
    """The yardstick works: the world's own clips (a perfect model) get every direction right."""
    cases = direction_cases(50)
    assert len(cases) == 50 and len(set(cases)) == 50
    assert all(world.is_held_out(p) and world.expected_direction(p) is not None for p in cases)
    assert {world.expected_direction(p) for p in cases} >= {"left", "right", "up", "down", "still"}
    for p in cases:
        frames = world.render(p, 61)  # 2 s from t = 0, as the eval generates
        assert world.motion_direction(world.track_colour(frames, world.PALETTE[p.color])) == world.expected_direction(p)
    long = long_cases(6)
    assert len(long) == 6 and not any(p.motion in world.PANS for p in long)
    assert len({p.motion for p in long}) == 6  # one of each motion first
    for p in long[:2]:
        assert persistence(world.render(p, 30 * 30, size=64), world.PALETTE[p.color]) == 1.0


def test_validation_scenes_are_unseen_training_scenes():
    """The validation split: training-distribution scenes (never held out) that the latent cache's
    stream does not hold, each with one direction the world's own clips show; a bad split fails."""
    cases = direction_cases(30, "validation")
    assert len(set(cases)) == 30 and not any(world.is_held_out(p) for p in cases)
    assert not set(cases) & set(itertools.islice(world.stream(0), 3000))
    assert {world.expected_direction(p) for p in cases} >= {"left", "right", "up", "down", "still"}
    for p in cases[:10]:
        track = world.track_colour(world.render(p, 61), world.PALETTE[p.color])
        assert world.motion_direction(track) == world.expected_direction(p)
    with pytest.raises(ValueError, match="split"):
        direction_cases(5, "test")
    with pytest.raises(ValueError, match="split"):
        EvalConfig(split="train")
    assert "validation scenes" in format_table(EvalResult(config=EvalConfig(split="validation").__dict__))
    assert "scenes" not in format_table(EvalResult(config=EvalConfig().__dict__)).splitlines()[0]


def test_table_and_bad_config():
    result = EvalResult(config=EvalConfig().__dict__)
    result.direction = [{"caption": "a", "expected": "left", "got": "left"},
                        {"caption": "b", "expected": "still", "got": "up"}]
    result.long = [{"caption": "c", "mode": m, "frames": 9, "persistence": 1.0, "sharpness_drift": d,
                    "colour_drift": d} for m, d in (("inverted", 1.0), ("vanilla", 3.0))]
    table = format_table(result)
    assert "| 50.0% |" in table and "| 100.0% |" in table and "| 0.0% |" in table
    assert "| 1.000 | 3.000 |" in table
    with pytest.raises(ValueError):
        EvalConfig(prompts=0)
    with pytest.raises(ValueError, match="cfg"):
        EvalConfig(cfg=float("nan"))


def test_eval_command_reports_each_video_without_a_terminal(tmp_path):
    """A background eval (stderr a file, so no progress bar) still says how far it has got."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    framepack = str(Path(sys.executable).with_name("framepack"))
    out = subprocess.run([framepack, "eval", "--prompts", "2", "--long-videos", "0", "--seconds", "0.5", "--steps", "2",
                          "--json", str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("framepack eval: video")]
    assert [line.split()[3] for line in lines] == ["1/2", "2/2"]
    assert "motion direction" in out.stdout
    assert len(json.loads((tmp_path / "eval.json").read_text())["direction"]) == 2
