"""The web app's back end without a browser: job store, form checks, worker order, cancel, resume, restart."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from framepack.jobs import JobDir
from framepack.pipeline import Event, FramePackPipeline, SectionStarted, StepProgress
from framepack.settings import GenerationSettings
from framepack.planning import real_seconds, section_count
from framepack.settings import MAX_SECONDS
from framepack.ui.files import model_names, payload_path, public_text
from framepack.ui.form import (FormDefaults, form_from_settings, history_limit, job_number, length_note,
                               section_seconds, settings_from_form, snap_seconds)
from framepack.ui.service import JobService
from framepack.ui.store import JobStore
from framepack.ui.worker import preview_strip
from framepack.video import read_frames, read_metadata
from ui_tiny_model import write_image, write_tiny_model

TIMEOUT_S = 180  # generous: a busy CPU makes a 3-second job take a minute


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("ui_model"))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("ui_image") / "start.png")


class SlowPipeline:
    """The real pipeline, with a pause after every sampling step and a log of the sections started."""

    def __init__(self, pipeline: FramePackPipeline, step_delay: float) -> None:
        self.pipeline, self.step_delay = pipeline, step_delay
        self.started: list[int] = []

    def plans(self, settings: GenerationSettings):
        return self.pipeline.plans(settings)

    def run(self, job: JobDir, on_event, should_stop) -> Path:
        def slow(event: Event) -> None:
            on_event(event)
            if isinstance(event, SectionStarted):
                self.started.append(event.step)
            if isinstance(event, StepProgress):
                time.sleep(self.step_delay)

        return self.pipeline.run(job, on_event=slow, should_stop=should_stop)


def loader(model: Path, step_delay: float = 0.0, loaded: list | None = None):
    def load(name: str) -> SlowPipeline:
        if name != str(model):
            raise ValueError(f"unknown model {name!r}")
        pipeline = SlowPipeline(FramePackPipeline.from_model(name), step_delay)
        if loaded is not None:
            loaded.append(pipeline)
        return pipeline

    return load


def settings(model: Path, image: Path, **changes) -> GenerationSettings:
    base = dict(image=str(image), prompt="a red circle moves to the right", model=str(model), seconds=1.0,
                steps=2, seed=1)
    return GenerationSettings(**{**base, **changes})


def wait_for(condition, timeout: float = TIMEOUT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- store ---------------------------------------------------------------------------------------------------


def test_store_runs_jobs_in_order_and_transitions_atomically(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    a = store.add({"prompt": "a"}, tmp_path / "a", tmp_path / "a.mp4", 1)
    b = store.add({"prompt": "b"}, tmp_path / "b", tmp_path / "b.mp4", 2)
    assert (store.queue_place(a.id), store.queue_place(b.id)) == (1, 2)
    first = store.claim_next()
    assert first is not None and first.id == a.id and first.status == "running"
    assert store.queue_place(b.id) == 1
    assert not store.cancel_queued(a.id)  # running: a queued-only transition does nothing
    assert store.mark_cancelled(a.id) and not store.finish(a.id)  # exactly one outcome
    assert store.resume(a.id)  # back in the queue, behind b
    assert [j.id for j in store.jobs(("queued",))] == [b.id, a.id]
    assert not store.resume(a.id)  # already queued


def test_store_requeues_interrupted_jobs_first(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    ids = [store.add({}, tmp_path / str(i), tmp_path / f"{i}.mp4", i).id for i in range(3)]
    assert store.claim_next().id == ids[0]
    reopened = JobStore(tmp_path / "jobs.sqlite")  # a new server process on the same file
    assert reopened.requeue_interrupted() == [ids[0]]
    assert [j.id for j in reopened.jobs(("queued",))] == ids  # the interrupted job keeps its place


def test_claims_are_exclusive_across_threads(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    for i in range(20):
        store.add({}, tmp_path / str(i), tmp_path / f"{i}.mp4", i)
    claimed: list[int] = []
    lock = threading.Lock()

    def claim() -> None:
        while (record := store.claim_next()) is not None:
            with lock:
                claimed.append(record.id)

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 21))


# ---- form --------------------------------------------------------------------------------------------------


MODELS = {"m": "m"}


def any_file(label: str, value) -> str | None:
    """The form's own tests take any path; which files pass the app's gate is tests/test_ui_security.py's."""
    return payload_path(label, value)


def form(start: Path | None, **changes) -> dict:
    base = dict(image={"path": str(start)} if start else None, prompt="a red circle", seconds=1, seed=3,
                random_seed=False, steps=2, distilled_guidance=10, cfg=1, sampler="unipc", mode="auto",
                model="m", resolution="auto", crf=16)
    return {**base, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"image": None, "color_match": True}, "needs a start image"),  # no image is text-to-video, but nothing to match
    ({"prompt": "  "}, "type a prompt"),
    ({"prompt": "[0s-2s: a cat] oops"}, "malformed prompt timeline"),
    ({"seconds": 1e9}, "seconds must be > 0"),
    ({"seconds": None}, "length (seconds) is empty"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"steps": 100000}, "steps must be between 1 and 200"),
    ({"cfg": "lots"}, "CFG must be a number"),
    ({"seed": 2**70}, "seed must fit in 64 bits"),
    ({"model": "../../etc"}, "unknown model"),
    ({"mode": "sideways"}, "unknown mode"),
    ({"resolution": "12"}, "resolution must be between 64 and 1280"),
    ({"cache": "turbo"}, "unknown cache 'turbo'"),
    ({"cache": "teacache:lots"}, "threshold must be a number"),
    ({"cache": ["teacache"]}, "step cache"),
])
def test_form_rejects_bad_input_with_one_line(changes, message, image):
    with pytest.raises(ValueError) as err:
        settings_from_form(form(image, **changes), MODELS, accept_file=any_file)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_form_round_trip_and_random_seed(image):
    s = settings_from_form(form(image, random_seed=True, resolution="64", mode="forward", seconds=2.4), MODELS,
                           accept_file=any_file)
    assert 0 <= s.seed < 2**32 and s.resolution == 64 and s.mode == "forward"
    values = form_from_settings(s.to_dict())
    assert values["seed"] == s.seed and not values["random_seed"]
    assert values["image"] is None  # settings never hand out an image path: the caller does, for its own jobs
    assert settings_from_form({**values, "image": {"path": str(image)}}, MODELS, accept_file=any_file) == s
    assert s.cache == "model"  # the form's default: the model's own step cache
    cached = settings_from_form(form(image, cache="TeaCache:0.3"), MODELS, accept_file=any_file)
    assert cached.cache == "teacache:0.3" and form_from_settings(cached.to_dict())["cache"] == "teacache:0.3"
    assert form_from_settings({"prompt": "old video"})["cache"] == "none"  # made before caching existed


@pytest.mark.parametrize("job", [1e30, float("inf"), float("nan"), 10**30, "abc", -1, 0, True, [1], {"a": 1}, "1e30"])
def test_job_numbers_are_checked_with_a_message(job):
    with pytest.raises(ValueError) as err:
        job_number(job)
    assert "job" in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 120


@pytest.mark.parametrize("limit", ["abc", None, float("nan"), 0, 10**30, 2.5, True])
def test_history_limit_is_checked_with_a_message(limit):
    with pytest.raises(ValueError, match="limit"):
        history_limit(limit)


def test_the_length_control_moves_in_sections_and_shows_the_real_length():
    step = section_seconds()
    assert section_count(step) == 1 and section_count(2 * step) == 2  # one step of the control = one section
    for asked in (1, 2, 3, 5, 7.7, 60, 120):
        snapped = snap_seconds(asked)
        assert real_seconds(snapped) == real_seconds(asked)  # the control's position makes the same video
        assert 0 < snapped <= MAX_SECONDS and abs(snapped / step - round(snapped / step)) < 1e-6
        assert f"{real_seconds(asked):.2f} s" in length_note(asked)
    assert "must be a number" in length_note("x")


def test_settings_from_an_mp4_are_not_trusted():
    values = form_from_settings({"image": "/etc/passwd", "end_image": "/etc/hosts", "seed": "x", "steps": [1],
                                 "cfg": "lots", "model": {"a": 1}, "prompt": 5, "seconds": float("nan")})
    assert values["image"] is None and values["end_image"] is None and values["model"] is None
    assert values["seed"] == FormDefaults().seed and values["steps"] == FormDefaults().steps
    assert values["prompt"] == "" and values["seconds"] == snap_seconds(FormDefaults().seconds)


def test_preview_strip_is_enlarged_side_by_side():
    frames = np.zeros((12, 8, 10, 3), np.uint8)
    assert preview_strip(frames, height=96, max_frames=9).shape == (96, 9 * 10 * 12, 3)


# ---- worker and service ---------------------------------------------------------------------------------


def test_jobs_run_in_order_with_progress(tmp_path, model, image):
    service = JobService(tmp_path / "out", loader(model, step_delay=0.3)).start()  # time to see progress
    try:
        a = service.submit(settings(model, image, seed=1))
        b = service.submit(settings(model, image, seed=2, prompt="[0s-0.5s: a red circle] [0.5s-1s: it moves right]"))
        seen: set[tuple] = set()

        def both_done() -> bool:
            progress = service.workers[0].status.get()
            if progress.job_id is not None:
                seen.add((progress.job_id, progress.done))
            return all(service.view(j.id).record.status == "done" for j in (a, b))

        wait_for(both_done, what="both jobs")
        ra, rb = service.view(a.id).record, service.view(b.id).record
        assert ra.updated <= rb.updated  # a finished first
        assert any(job == a.id and done > 0 for job, done in seen)  # progress was published
        for record in (ra, rb):
            assert read_frames(record.out).shape[0] > 0
            assert read_metadata(record.out)["framepack"]["seed"] == record.seed
        assert [j.id for j in service.history()] == [b.id, a.id]
        assert service.view(b.id).to_dict(service.outputs)["video"] == rb.out.name  # relative to outputs
    finally:
        service.stop(TIMEOUT_S)


def test_cancel_within_a_step_then_resume_gives_the_same_video(tmp_path, model, image):
    long = settings(model, image, seconds=3.0, steps=3, seed=7)  # 2 sections
    reference = JobDir.create(tmp_path / "ref", long, tmp_path / "ref.mp4")
    FramePackPipeline.from_model(str(model)).run(reference)

    loaded: list[SlowPipeline] = []
    service = JobService(tmp_path / "out", loader(model, step_delay=0.3, loaded=loaded)).start()
    try:
        record = service.submit(long)
        wait_for(lambda: service.workers[0].status.get().section == 2 and service.workers[0].status.get().step >= 1,
                 what="the second section")
        asked = time.monotonic()
        assert "cancelling" in service.cancel(record.id)
        wait_for(lambda: service.view(record.id).record.status == "cancelled", what="the cancel")
        assert time.monotonic() - asked < 3.0  # within a step or so (a step takes ~0.3 s here)
        assert JobDir.open(record.job_dir).finished == 1
        assert "nothing to cancel" in service.cancel(record.id)

        assert "queued again" in service.resume(record.id)
        wait_for(lambda: service.view(record.id).record.status == "done", what="the resumed job")
        assert loaded[0].started == [0, 1, 1]  # section 2 was begun again, section 1 was not
        np.testing.assert_array_equal(read_frames(record.out), read_frames(reference.out))
    finally:
        service.stop(TIMEOUT_S)


def test_restart_continues_the_interrupted_job_from_its_last_section(tmp_path, model, image):
    outputs = tmp_path / "out"
    first = JobService(outputs, loader(model, step_delay=0.3)).start()
    record = first.submit(settings(model, image, seconds=3.0, steps=3, seed=5))
    queued = first.submit(settings(model, image, seed=6))
    wait_for(lambda: JobDir.open(record.job_dir).finished == 1, what="the first section")
    # a killed server leaves the job 'running'; simulate the kill by stopping the thread without
    # touching the store, then putting the status back as the dead process would have left it
    first.stop(TIMEOUT_S)
    assert first.store.claim_next() is not None  # the requeued job, claimed as if still running
    assert first.store.get(record.id).status == "running"

    loaded: list[SlowPipeline] = []
    second = JobService(outputs, loader(model, loaded=loaded)).start()
    try:
        wait_for(lambda: all(second.view(j.id).record.status == "done" for j in (record, queued)),
                 what="both jobs after the restart")
        assert loaded[0].started[0] == 1  # it began at the second section
        assert second.store.get(record.id).updated <= second.store.get(queued.id).updated
    finally:
        second.stop(TIMEOUT_S)


def test_a_failing_job_does_not_stop_the_queue(tmp_path, model, image, caplog):
    caplog.set_level(logging.INFO, logger="framepack.ui.jobs")
    service = JobService(tmp_path / "out", loader(model)).start()
    try:
        bad = service.submit(settings(model, image).replace(model=str(tmp_path / "missing-model")))
        good = service.submit(settings(model, image, seed=9))
        wait_for(lambda: service.view(good.id).record.status == "done", what="the good job")
        failed = service.view(bad.id).record
        assert failed.status == "failed" and "unknown model" in failed.error and "\n" not in failed.error
        # what a client sees of the reason names no server path
        shown = service.view(bad.id).to_dict(service.outputs)["error"]
        assert "missing-model" in shown and str(tmp_path) not in shown
    finally:
        service.stop(TIMEOUT_S)
    # the server's console: one line per job started and ended
    lines = [r.getMessage() for r in caplog.records if r.name == "framepack.ui.jobs"]
    assert f"job {bad.id} started (seed 1)" in lines and any(line.startswith(f"job {bad.id} failed: unknown model")
                                                            for line in lines)
    assert any(line.startswith(f"job {good.id} done in") for line in lines)


def test_public_text_hides_server_paths(tmp_path):
    outputs = tmp_path / "out"
    text = f"cannot read {outputs}/jobs/a/inputs/start.png nor /etc/ssl/secret.key; and/or keep 1/2 as it is"
    shown = public_text(text, outputs)
    assert shown == "cannot read jobs/a/inputs/start.png nor secret.key; and/or keep 1/2 as it is"
    assert model_names(["tiny", "/srv/models/mine", "/other/mine"]) == {"tiny": "tiny", "mine": "/srv/models/mine",
                                                                        "mine (2)": "/other/mine"}


def test_submit_rejects_a_non_image_before_queueing(tmp_path, model):
    service = JobService(tmp_path / "out", loader(model))
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        service.submit(settings(model, fake))
    assert service.store.jobs() == []


def test_ui_command_options():
    import argparse

    from framepack.ui import add_ui_command, parse_auth

    parser = argparse.ArgumentParser()
    add_ui_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.auth, args.share) == ("127.0.0.1", 7860, None, False)
    args = parser.parse_args(["ui", "--host", "0.0.0.0", "--port", "8000", "--auth", "me:pw", "--share"])
    assert (args.host, args.port, parse_auth(args.auth), args.share) == ("0.0.0.0", 8000, ("me", "pw"), True)
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth("nopassword")


def test_importing_the_ui_package_is_light():
    import subprocess
    import sys

    code = "import sys, framepack.ui; print('gradio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]  # gradio is imported when the app starts, not before


def test_fields_follow_the_model(tmp_path, model):
    """The page shows a model's own CFG and hides distilled guidance for a model that does not read it."""
    import json
    import shutil

    from framepack.ui.app import model_cfg, uses_distilled_guidance

    assert not uses_distilled_guidance(str(model))  # the tiny test model has no guidance embedding
    guided = shutil.copytree(model, tmp_path / "guided")
    config = guided / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": True}))
    manifest = guided / "framepack.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "cfg": 2.5}))
    assert uses_distilled_guidance(str(guided)) and model_cfg(str(guided)) == 2.5
    assert model_cfg(str(model)) == 1.0  # no cfg in its manifest: off
