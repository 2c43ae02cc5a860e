"""Redo one section (issue 20.4): which sections a branch keeps, and the branch itself through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_extend import PROMPT, _run, generate  # the demo model's videos through the CLI

from framepack.planning import plan_sections
from framepack.redo import regenerated_steps, video_order


def _reads(plan) -> set[int]:
    return {s for s in plan.context_sources() if isinstance(s, int)}


@pytest.mark.parametrize("mode", ["forward", "inverted", "vanilla"])
@pytest.mark.parametrize("count", [1, 3, 5])
def test_a_section_is_redone_exactly_when_it_is_k_or_reads_one_that_is(mode, count):
    plans = plan_sections(count, mode)
    for section in range(1, count + 1):
        redone = set(regenerated_steps(plans, section))
        target = video_order(plans)[section - 1].step
        assert target in redone
        written = {p for plan in plans if plan.step in redone for p in plan.positions}
        for plan in plans:
            reads_redone = bool(_reads(plan) & written)
            if plan.step != target:
                # made again if and only if it reads a section made again (which exists only after K)
                assert (plan.step in redone) == (plan.step > target and reads_redone), (mode, section, plan.step)
        # what is kept is a prefix in generation order, so the branch continues like a resumed job
        assert redone == set(range(min(redone), count))


def test_which_sections_are_kept_depends_on_the_generation_order():
    forward, inverted = plan_sections(3, "forward"), plan_sections(3, "inverted")
    # the first section in time: forward makes it first (everything after reads it), inverted last
    assert regenerated_steps(forward, 1) == [0, 1, 2]
    assert regenerated_steps(inverted, 1) == [video_order(inverted)[0].step] == [2]
    # the last section in time: the opposite
    assert regenerated_steps(forward, 3) == [2]
    assert regenerated_steps(inverted, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="between 1 and 3"):
        regenerated_steps(forward, 4)


def test_a_later_section_that_reads_nothing_made_again_is_kept():
    from dataclasses import replace

    from framepack.planning import LevelPlan
    from framepack.redo import kept_prefix

    plans = plan_sections(3, "forward")
    # a made-up last section whose context holds only the start image: nothing of section 2
    blind = [LevelPlan(level.kernel, level.indices, tuple("start" if s == "start" else None for s in level.sources))
             for level in plans[2].levels]
    plans[2] = replace(plans[2], levels=tuple(blind))
    assert regenerated_steps(plans, 2) == [1]
    assert kept_prefix(plans, [1]) == 1  # a job continues from a prefix: step 2 is made again all the same


# ---- through the CLI -------------------------------------------------------------------------------------



def _hashes(root: Path) -> dict[str, str]:
    # the lock file is left out: taking the job's lock (so no run changes it while it is read) writes our pid there
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}


def _sections(job: Path) -> list:
    from framepack.jobs import JobDir

    opened = JobDir.open(job)
    return [opened.load_latents(step) for step in range(opened.finished)]


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A finished 3-section job of the demo model (inverted: made from the end)."""
    return generate(tmp_path_factory.mktemp("original") / "v.mp4", "--seconds", "3.6", "--steps", "2",
                    "--mode", "inverted").with_name("v.job")


def test_a_redo_with_the_same_seed_and_prompt_is_bit_identical_and_the_original_untouched(original, tmp_path):
    import torch

    from framepack.video import read_frames

    before = _hashes(original)
    out = tmp_path / "again.mp4"
    run = _run("redo", str(original), "--section", "2", "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert _hashes(original) == before
    branch = tmp_path / "again.job"
    record = json.loads((branch / "redo.json").read_text())
    # inverted: the middle section is the second made; only the one made before it (the last in time) is kept
    assert record["kept_steps"] == [0] and record["redone_steps"] == [1, 2]
    # the kept section is the original's file itself (a hard link), not one made again
    assert (branch / "sections" / "0000.safetensors").samefile(original / "sections" / "0000.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(_sections(branch), _sections(original), strict=True))
    assert np.array_equal(read_frames(out), read_frames(original.with_name("v.mp4")))


def test_a_redo_with_a_seed_and_prompt_changes_only_what_depends_on_the_section(original, tmp_path):
    import torch

    out = tmp_path / "other.mp4"
    run = _run("redo", str(original), "--section", "1", "--seed", "7", "--prompt", "A blue circle moves up",
               "--device", "cpu", "--out", str(out))
    assert run.returncode == 0, run.stderr
    branch, made = _sections(tmp_path / "other.job"), _sections(original)
    # the first section in time is the last made: the two after it in the video are kept as they were
    assert torch.equal(branch[0], made[0]) and torch.equal(branch[1], made[1])
    assert not torch.equal(branch[2], made[2])
    settings = json.loads((tmp_path / "other.job" / "settings.json").read_text())
    assert settings["section_prompts"] == ["A blue circle moves up", PROMPT, PROMPT] and settings["seed"] == 7


@pytest.mark.parametrize("args, message", [
    (["--section", "4"], "--section must be between 1 and 3"),
    (["--section", "1", "--prompt", " "], "--prompt is empty"),
    (["--section", "1", "--seed", str(2**64)], "seed must fit in 64 bits"),
])
def test_a_bad_redo_is_one_line_and_writes_nothing(original, tmp_path, args, message):
    out = tmp_path / "no.mp4"
    run = _run("redo", str(original), *args, "--device", "cpu", "--out", str(out))
    assert run.returncode == 2 and message in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not out.exists() and not (tmp_path / "no.job").exists()


def test_redo_of_something_that_is_not_a_job_is_one_line(tmp_path):
    run = _run("redo", str(tmp_path), "--section", "1")
    assert run.returncode == 2 and "is not a framepack job directory" in run.stderr, run.stderr


# ---- the web app ----------------------------------------------------------------------------------------


def _wait_done(client, job: int, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while (status := client.predict(job=job, api_name="/status")["status"]) in ("queued", "running"):
        assert time.monotonic() < deadline, f"job {job} still {status}"
        time.sleep(0.5)
    assert status == "done", status


def test_the_web_app_redoes_a_section_of_a_job_it_made(tmp_path):
    pytest.importorskip("gradio", reason="needs gradio (pip install 'framepack[ui]')")
    import torch
    from gradio_client import Client, handle_file
    from ui_slow_server import Server
    from ui_tiny_model import write_image, write_tiny_model


    server = Server(tmp_path / "outputs", write_tiny_model(tmp_path / "model"), tmp_path / "server.log").start()
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path))
        first = client.predict(image=handle_file(str(write_image(tmp_path / "s.png"))), prompt="a red circle",
                               seconds=2.4, steps=1, seed=3, api_name="/submit")["job"]
        _wait_done(client, first)
        original = Path(server.jobs()[first]["job_dir"])
        before = _hashes(original)
        for job, section, message in ((999, 1, "no job 999"), (first, 3, "between 1 and 2"), (first, "x", "section")):
            with pytest.raises(Exception, match=message):  # gradio_client's AppError, with the one-line reason
                client.predict(job=job, section=section, api_name="/redo")
        branch = client.predict(job=first, section=1, api_name="/redo")["job"]
        _wait_done(client, branch)
        assert _hashes(original) == before
        record = json.loads((Path(server.jobs()[branch]["job_dir"]) / "redo.json").read_text())
        assert record["kept_steps"] == [0]  # inverted: the second section in time was made first
        made, again = _sections(original), _sections(Path(server.jobs()[branch]["job_dir"]))
        assert all(torch.equal(a, b) for a, b in zip(made, again, strict=True))  # same seed and prompt: the same
        assert set(server.jobs()) == {first, branch}  # the refused requests queued nothing
    finally:
        server.stop()
