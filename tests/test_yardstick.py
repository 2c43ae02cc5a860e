"""The yardstick of ``framepack eval`` (issue 18.2): the world's own clips score full marks, and
negative controls (caption-blind, frozen, random videos; no model) score at chance or low."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from framepack.train import world, yardstick
from framepack.train.evaluate import YardstickConfig, format_yardstick, measure

SIZE = 64  # the generators' frames: small, so the tests stay fast (the metrics read the size from the frames)
CONFIG = YardstickConfig(start_frames=8, long_videos=5, shape_seconds=(5.0,), persistence_seconds=(5.0, 20.0),
                         drift_seconds=5.0)


frozen = yardstick.frozen_generator(SIZE)
noise = yardstick.noise_generator(SIZE)


@pytest.fixture(scope="module")
def scenes() -> list[world.WorldParams]:
    return world.scenes(CONFIG.split, CONFIG.start_frames, CONFIG.start) + CONFIG.long_scenes()


@pytest.fixture(scope="module")
def truth(scenes):
    generate = yardstick.world_generator(scenes, size=SIZE)
    return measure(CONFIG, generate, generate)


def test_the_classifier_names_every_motion_of_the_worlds_own_clips():
    """Checked before it judges a model: 2 s of every motion every start frame admits, at 64 and 128 px."""
    checked = set()
    for size, starts in ((SIZE, world.scenes("validation", 12)), (world.SIZE, world.scenes("test", 2))):
        for p in starts:
            for motion in world.applicable_motions(p):
                frames = world.render(world.with_motion(p, motion), 61, size=size)
                assert yardstick.classify_motion(frames, world.PALETTE[p.color]) == motion, (p, motion, size)
                checked.add(motion)
    assert checked == set(world.MOTIONS)
    p = world.scenes("validation", 1)[0]
    gone = world.render(p, 61, size=SIZE)
    gone[20:] = gone[0, 0, 0]
    assert yardstick.classify_motion(gone, world.PALETTE[p.color]) == yardstick.LOST


def test_the_worlds_own_clips_score_full_marks(truth):
    summary = truth.summary()
    control = summary["caption_control"]
    assert control["trials"] == sum(len(world.applicable_motions(p)) for p in world.scenes("validation", 8))
    assert control["accuracy"] == 1.0 and control["interval"][1] == pytest.approx(1.0)
    assert all(set(row) == {motion} for motion, row in control["confusion"].items())
    for key in ("iou@5s", "centred_iou@5s"):
        assert summary[key]["videos"] == 5 and summary[key]["mean"] > 0.98, (key, summary[key])
    for key in ("persistence@5s", "persistence@20s"):
        assert summary[key]["mean"] == 1.0, (key, summary[key])
    table = format_yardstick(truth)
    assert "| 100.0% |" in table and "chance" in table and "confusion matrix" in table


def test_a_caption_blind_generator_scores_at_chance(scenes):
    result = measure(CONFIG, yardstick.blind_generator(scenes, SIZE))
    trials = result.trials()
    per_start = {t.start: sum(u.right for u in trials if u.start == t.start) for t in trials}
    assert max(per_start.values()) <= 1  # one video for all k captions: right at most once in k
    control = result.summary()["caption_control"]
    low, high = control["interval"]
    assert low <= control["chance"] <= high
    assert control["accuracy"] <= control["chance"] + 1e-9


def test_a_frozen_video_scores_at_chance_and_loses_the_shape_in_place(truth):
    result = measure(CONFIG, frozen, frozen)
    summary = result.summary()
    control = summary["caption_control"]
    assert {got for row in control["confusion"].values() for got in row} == {"stay"}
    assert control["accuracy"] <= control["chance"] + 1e-9
    # the world's long scenes move or change their object (one per motion first): frozen, it leaves its true place
    assert summary["iou@5s"]["mean"] < 0.5 < truth.summary()["iou@5s"]["mean"]
    # persistence is about the object's size: a frozen square that should shrink is lost once it is 4x too big
    shrinking = world.WorldParams("square", "yellow", "plain", "blue", "shrink", speed=9.0, size=0.16)
    first = world.render(shrinking, 1)[0]
    assert yardstick.persistence(frozen(first, "", 30.0, 0), shrinking) < 0.25
    assert yardstick.persistence(world.render(shrinking, 901, size=SIZE), shrinking) == 1.0


def test_the_caption_alone_follows_every_caption_but_guesses_the_speed():
    """The ceiling control knows the start frame and the caption, not the speed or the heading: in
    the independent-start world (which draws them) full caption control and shapes, and in place it
    falls behind the world's own clips exactly where the true speed is not the one it guesses. (In
    the determined world, the default, it is the world's own clips: tests/test_world_starts.py.)"""
    config = dataclasses.replace(CONFIG, start="independent", persistence_seconds=(5.0,), drift_seconds=0)
    scenes = world.scenes(config.split, config.start_frames, config.start) + config.long_scenes()
    summary = measure(config, yardstick.caption_generator(scenes, SIZE)).summary()
    truth = measure(config, yardstick.world_generator(scenes, SIZE)).summary()
    assert summary["caption_control"]["accuracy"] == 1.0
    assert summary["persistence@5s"]["mean"] == 1.0
    assert summary["iou@5s"]["mean"] < truth["iou@5s"]["mean"] - 0.05
    guess = yardstick.caption_generator([world.with_motion(scenes[0], m) for m in ("right", "stay")], SIZE)
    for speed, in_place in ((world.SPEED_RANGE[0], False), (sum(world.SPEED_RANGE) / 2, True)):
        p = dataclasses.replace(world.with_motion(scenes[0], "right"), speed=speed)
        frames = guess(world.render(p, 1)[0], world.caption(p), 5.0, 0)
        iou, centred_iou = yardstick.shape_fidelity(frames, p)
        assert centred_iou > 0.95 and (iou > 0.95) == in_place, (speed, iou, centred_iou)


def test_a_random_video_scores_nothing():
    result = measure(CONFIG, noise, noise)
    summary = result.summary()
    assert summary["caption_control"]["accuracy"] == 0.0
    assert {got for row in summary["caption_control"]["confusion"].values() for got in row} == {yardstick.LOST}
    for key in ("iou@5s", "centred_iou@5s", "persistence@5s", "persistence@20s"):
        assert summary[key]["mean"] < 0.05, (key, summary[key])


def test_a_long_offset_measures_the_next_scenes_of_the_split():
    """``--long-offset K`` (a fresh batch for a later choice) makes the long videos of the scenes after
    the first K, in the same order: none of them one the unshifted run made."""
    asked: list[str] = []

    def recording(first: np.ndarray, caption: str, seconds: float, seed: int) -> np.ndarray:
        asked.append(caption)
        return frozen(first, caption, seconds, seed)

    config = dataclasses.replace(CONFIG, start_frames=0, long_videos=3, long_offset=4, drift_seconds=0)
    measure(config, recording)
    expected = [world.caption(p) for p in yardstick.long_scenes(CONFIG.split, 7, CONFIG.start)[4:]]
    lengths = len({*config.shape_seconds, *config.persistence_seconds})
    assert asked == [c for c in expected for _ in range(lengths)]
    first = {world.caption(p) for p in yardstick.long_scenes(CONFIG.split, 4, CONFIG.start)}
    assert not first & set(asked)


def test_intervals():
    # Wilson: for 0 of n the upper bound is z^2 / (n + z^2); it always holds the observed proportion
    assert yardstick.wilson(0, 10) == pytest.approx((0.0, 1.96**2 / (10 + 1.96**2)))
    for k, n in ((3, 10), (50, 100), (99, 100)):
        low, high = yardstick.wilson(k, n)
        assert low < k / n < high and 0 <= low and high <= 1
    assert all(math.isnan(v) for v in yardstick.wilson(0, 0))
    assert yardstick.mean_interval([0.5] * 6) == (0.5, 0.5, 0.5)
    mean, low, high = yardstick.mean_interval([0.0, 1.0, 0.2, 0.9, 0.4])
    assert mean == pytest.approx(0.5) and low < mean < high
    assert math.isnan(yardstick.mean_interval([0.3])[1])


def _framepack(*args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("framepack"))
    return subprocess.run([exe, "eval", *args], capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize("args, message", [
    (["--yardstick", "caption", "--prompts", "3"], "--prompts is an option of --yardstick direction"),
    (["--prompts", "3", "--start", "by-motion"], "--start is an option of --yardstick caption"),
    (["--yardstick", "direction", "--start-frames", "2"], "--start-frames is an option of --yardstick caption"),
    (["--split", "held-out"], "split must be validation or test"),
    (["--shape-seconds", "5,x"], "--shape-seconds takes seconds"),
    (["--drift-seconds", "7"], "drift seconds 7 must be one of the long videos' lengths"),
    (["--start-frames", "0", "--long-videos", "0"], "nothing to measure"),
    (["--long-offset", "-1"], "the long videos' offset must be >= 0"),
])
def test_eval_refuses_bad_options_in_one_line(args, message, tmp_path):
    out = _framepack(*args, "--json", str(tmp_path / "eval.json"))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert not (tmp_path / "eval.json").exists()


def test_eval_runs_the_yardstick_on_the_demo_model(tmp_path):
    """Through the real entry point, with a few steps: every caption of one start frame, a table and the JSON."""
    out = _framepack("--start-frames", "1", "--long-videos", "0", "--caption-seconds", "0.5", "--steps", "1",
                     "--json", str(tmp_path / "eval.json"))
    assert out.returncode == 0, out.stderr
    captions = len(world.applicable_motions(world.scenes("validation", 1)[0]))
    lines = [line for line in out.stderr.splitlines() if line.startswith("framepack eval: video")]
    assert [line.split()[3] for line in lines] == [f"{i}/{captions}" for i in range(1, captions + 1)]
    assert "caption control" in out.stdout and "validation split" in out.stdout
    data = json.loads((tmp_path / "eval.json").read_text())
    assert len(data["captions"]) == captions == data["summary"]["caption_control"]["trials"]


def test_the_docs_table_script_writes_the_model_beside_the_controls(tmp_path):
    """benchmarks/evaluation.py: a run's JSON (here the world's own clips, measured as a model would
    be) beside the controls, between the doc's markers; the model's column is the JSON's."""
    from framepack.train.evaluate import save

    config = YardstickConfig(start_frames=1, long_videos=1, shape_seconds=(1.0,), persistence_seconds=(1.0,),
                             drift_seconds=0)
    scenes = world.scenes("validation", 1, config.start) + config.long_scenes()
    save(measure(config, yardstick.world_generator(scenes)), tmp_path / "run.json")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- bench:yardstick -->\nold\n<!-- /bench:yardstick -->\nend\n")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluation.py"
    out = subprocess.run([sys.executable, str(script), "--model-json", str(tmp_path / "run.json"), "--doc", str(doc)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    row = next(line for line in text.splitlines() if line.startswith("| caption control ("))
    model, truth, ceiling, blind, frozen_cell, random_cell = (cell.strip() for cell in row.split("|")[2:8])
    assert model.startswith("100.0%") and truth.startswith("100.0%") and random_cell.startswith("0.0%")
    assert ceiling.startswith("100.0%")
    assert not blind.startswith("100.0%") and not frozen_cell.startswith("100.0%")
    assert ("| model tiny | world's own clips | caption alone (ceiling) | caption-blind | frozen video | random video |"
            in text)
    assert "new world (independent starts)" in text


def test_the_student_script_holds_the_student_to_its_teachers_bounds(tmp_path):
    """benchmarks/student.py: the world's own clips as a "teacher", and as "students" the same clips
    (within every bound) and a frozen video (below them): the table says which holds, pairs the
    caption trials, and runs made on other trials are refused."""
    from framepack.train.evaluate import save

    config = YardstickConfig(start_frames=2, long_videos=1, shape_seconds=(1.0,), persistence_seconds=(1.0,),
                             drift_seconds=0)
    scenes = world.scenes("validation", 2, config.start) + config.long_scenes()
    save(measure(config, yardstick.world_generator(scenes)), tmp_path / "truth.json")
    save(measure(config, frozen), tmp_path / "frozen.json")
    save(measure(YardstickConfig(start_frames=1, long_videos=0), frozen), tmp_path / "other.json")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "student.py"

    def table(student: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "--teacher", str(tmp_path / "truth.json"), "--student",
                               str(tmp_path / student), *extra], capture_output=True, text=True, timeout=300, check=False)

    same, worse, other = table("truth.json"), table("frozen.json"), table("other.json")
    assert same.returncode == 0 and worse.returncode == 0, same.stderr + worse.stderr

    def within(out: str, row: str) -> str:
        return next(line for line in out.splitlines() if line.startswith(f"| {row}")).split("|")[-2].strip()

    assert within(same.stdout, "caption control") == "yes" and within(same.stdout, "shape IoU in place") == "yes"
    assert within(worse.stdout, "caption control") == "no" and within(worse.stdout, "shape IoU in place") == "no"
    assert "the student misses 0 that the teacher shows" in same.stdout
    right = sum(yardstick.CaptionTrial(**t).right for t in json.loads((tmp_path / "frozen.json").read_text())["captions"])
    trials = len(json.loads((tmp_path / "truth.json").read_text())["captions"])
    assert f"the student misses {trials - right} that the teacher shows and shows 0" in worse.stdout
    assert other.returncode != 0 and "not made on the same trials" in other.stderr
    loose = table("frozen.json", "--iou-margin", "1")  # a rule's own bound: the frozen video is within 1
    assert within(loose.stdout, "shape IoU in place") == "yes" and "| >= -1 | yes |" in loose.stdout
    missed = trials - right  # a caption bound in trials: the frozen video is within exactly its own misses
    assert within(table("frozen.json", "--caption-trials", str(missed)).stdout, "caption control") == "yes"
    assert within(table("frozen.json", "--caption-trials", str(missed - 1)).stdout, "caption control") == "no"


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_text_to_video_scripts_controls_bound_its_window():
    """benchmarks/text_to_video.py reads the motion from 1.2 s on: on that window the world's own
    clips show every caption (11 motions, pans included), the caption-blind control only its own
    motion's captions, and the frozen grey frame draws nothing; the table counts them so."""
    t2v = _benchmark("text_to_video")
    scenes = yardstick.one_per_motion_first(world.scenes("validation", 400), len(world.MOTIONS))
    assert sorted(p.motion for p in scenes) == sorted(world.MOTIONS)
    ceiling, blind, frozen_grey = t2v.controls(scenes).values()
    assert ceiling == [p.motion for p in scenes]
    assert [got == p.motion for got, p in zip(blind, scenes)] == [p.motion == t2v.BLIND_MOTION for p in scenes]
    assert frozen_grey == [yardstick.LOST] * len(scenes)
    table = t2v.table(t2v.controls(scenes), scenes)
    assert "| 11/11 | 11/11 = 100% |" in table and "| 11/11 | 1/11 = 9% |" in table and "| 0/11 | 0/11 = 0% |" in table


def test_the_jump_measurement_sees_a_catch_up_and_not_the_truth():
    """benchmarks/demo_jumps.py: the world's clip of a moving scene has no jump; the same clip held
    for 30 frames and then caught up has exactly one, at the catch-up; a lost object is counted."""
    jumps = _benchmark("demo_jumps")
    scene = jumps.demo_scene()  # the demo's: a triangle moving right
    assert scene.motion == "right"
    clip = world.render(scene, 145)
    truth = float(np.nanmax(jumps.steps(clip, scene)))
    assert 0 < truth < 2
    paused = clip.copy()
    paused[60:90] = clip[60]
    steps = jumps.steps(paused, scene)
    assert np.flatnonzero(steps > jumps.JUMP * truth).tolist() == [89]
    assert jumps.row("x", clip, truth, scene).endswith("| 0 | 0 |")
    gone = clip.copy()
    gone[100:] = clip[100:, :1, :1]  # the background's corner colour everywhere: no object
    assert jumps.row("x", gone, truth, scene).endswith(f"| {145 - 100} |")
