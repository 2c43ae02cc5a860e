"""One worker per device (``framepack ui --devices cpu,cpu``): two jobs run at the same time, each
page and API client sees its own job's progress, a cancel stops only its job, a restart requeues
every running job, and each video equals the one a single run of the same settings makes."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from framepack.jobs import JobDir
from framepack.pipeline import Event, FramePackPipeline, SectionStarted, StepProgress
from framepack.settings import GenerationSettings
from framepack.ui import parse_devices
from framepack.ui.service import JobService, worker_labels
from framepack.video import read_frames
from ui_slow_server import Server
import test_ui_store
from test_ui_store import image, model  # noqa: F401  (fixtures: the tiny random model, a start image)

TIMEOUT_S = 240  # two jobs share 2 busy cores
STEP_DELAY_S = 0.3  # per sampling step: both jobs last long enough to overlap and to be cancelled


class Recorder:
    """What the workers did, from the pipelines' own events: when each job's steps ran, which
    sections each began, and which pipeline object (so which worker) ran it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: dict[Path, list[float]] = defaultdict(list)  # job dir -> monotonic time of each step
        self.sections: dict[Path, list[int]] = defaultdict(list)
        self.pipeline_of: dict[Path, int] = {}
        self.loaded = 0


class RecordingPipeline:
    """The real pipeline with a pause after every sampling step, reporting to a :class:`Recorder`."""

    def __init__(self, pipeline: FramePackPipeline, recorder: Recorder) -> None:
        self.pipeline, self.recorder = pipeline, recorder

    def plans(self, settings: GenerationSettings):
        return self.pipeline.plans(settings)

    def run(self, job: JobDir, on_event, should_stop) -> Path:
        rec = self.recorder

        def slow(event: Event) -> None:
            on_event(event)
            with rec.lock:
                rec.pipeline_of[job.root] = id(self)
                if isinstance(event, SectionStarted):
                    rec.sections[job.root].append(event.step)
                if isinstance(event, StepProgress):
                    rec.steps[job.root].append(time.monotonic())
            if isinstance(event, StepProgress):
                time.sleep(STEP_DELAY_S)

        return self.pipeline.run(job, on_event=slow, should_stop=should_stop)


def service_with_two_workers(outputs: Path, model: Path, recorder: Recorder) -> JobService:
    def load(name: str) -> RecordingPipeline:  # one call per worker: each loads its own pipeline
        if name != str(model):
            raise ValueError(f"unknown model {name!r}")
        with recorder.lock:
            recorder.loaded += 1
        return RecordingPipeline(FramePackPipeline.from_model(name), recorder)

    return JobService(outputs, [load, load], devices=["cpu", "cpu"])


def settings(model: Path, image: Path, **changes) -> GenerationSettings:
    base = dict(image=str(image), prompt="a red circle moves to the right", model=str(model), seconds=3.0,
                steps=3, seed=1)  # 2 sections of 3 steps
    return GenerationSettings(**{**base, **changes})


def reference_frames(tmp_path: Path, settings: GenerationSettings) -> np.ndarray:
    """The video one plain, single run of these settings makes."""
    job = JobDir.create(tmp_path / f"ref-{settings.seed}", settings, tmp_path / f"ref-{settings.seed}.mp4")
    FramePackPipeline.from_model(settings.model).run(job)
    return read_frames(job.out)


def wait_for(condition, timeout: float = TIMEOUT_S, what: str = "condition") -> None:
    test_ui_store.wait_for(condition, timeout, what)  # the same poll, with this file's longer default


def both_sampling(service: JobService, a: int, b: int) -> bool:
    """Both jobs running, each with its own live progress, on two different workers."""
    va, vb = service.view(a), service.view(b)
    pa, pb = va.progress, vb.progress
    return (pa is not None and pb is not None and pa.phase == pb.phase == "sampling"
            and pa.job_id == a and pb.job_id == b and va.device != vb.device)


# ---- pure parts ----------------------------------------------------------------------------------------


def test_devices_are_parsed_and_workers_named():
    assert parse_devices(None, None) == ["auto"]
    assert parse_devices("cuda:1", None) == ["cuda:1"]
    assert parse_devices(None, " cuda:0, cuda:1 ") == ["cuda:0", "cuda:1"]
    for bad in ("", "cpu,", ",cpu", "cpu,,cpu"):
        with pytest.raises(ValueError, match="comma-separated"):
            parse_devices(None, bad)
    with pytest.raises(ValueError, match="not both"):
        parse_devices("cpu", "cpu,cpu")
    assert worker_labels(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert worker_labels(["cpu", "cuda:0", "cpu"]) == ["cpu #1", "cuda:0", "cpu #2"]


@pytest.mark.parametrize("args, message", [
    (["--devices", "cpu,banana"], "unknown device 'banana'"),
    (["--devices", "cpu,,cpu"], "comma-separated"),
    (["--device", "cpu", "--devices", "cpu,cpu"], "not both"),
])
def test_bad_devices_are_one_line(tmp_path, args, message):
    framepack = Path(sys.executable).with_name("framepack")
    done = subprocess.run([str(framepack), "ui", "--outputs", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out").exists()  # refused before the job store is made


# ---- two CPU workers -----------------------------------------------------------------------------------


def test_two_jobs_run_at_the_same_time_and_both_finish(tmp_path, model, image):
    first, second = settings(model, image, seed=3), settings(model, image, seed=4, prompt="a red circle")
    recorder = Recorder()
    service = service_with_two_workers(tmp_path / "out", model, recorder).start()
    try:
        a, b = service.submit(first), service.submit(second)
        wait_for(lambda: both_sampling(service, a.id, b.id), what="both jobs sampling at once")
        assert set(service.running_jobs()) == {a.id, b.id}
        assert {service.view(a.id).device, service.view(b.id).device} == {"cpu #1", "cpu #2"}
        status = service.view(a.id).to_dict(service.outputs)  # what /status answers
        assert status["device"] in ("cpu #1", "cpu #2") and status["total_steps"] == 6
        wait_for(lambda: all(service.view(j.id).record.status == "done" for j in (a, b)), what="both jobs")
    finally:
        service.stop(TIMEOUT_S)
    ta, tb = recorder.steps[a.job_dir], recorder.steps[b.job_dir]
    assert len(ta) == len(tb) == 6
    assert max(ta[0], tb[0]) < min(ta[-1], tb[-1])  # their sampling intervals overlap
    assert recorder.loaded == 2 and recorder.pipeline_of[a.job_dir] != recorder.pipeline_of[b.job_dir]
    np.testing.assert_array_equal(read_frames(a.out), reference_frames(tmp_path, first))
    np.testing.assert_array_equal(read_frames(b.out), reference_frames(tmp_path, second))


def test_cancel_of_one_leaves_the_other_running(tmp_path, model, image):
    recorder = Recorder()
    service = service_with_two_workers(tmp_path / "out", model, recorder).start()
    try:
        a, b = service.submit(settings(model, image, seed=5)), service.submit(settings(model, image, seed=6))
        wait_for(lambda: both_sampling(service, a.id, b.id), what="both jobs sampling at once")
        assert "cancelling" in service.cancel(a.id)
        wait_for(lambda: service.view(a.id).record.status == "cancelled", what="the cancel")
        other = service.view(b.id)
        assert other.record.status == "running" and other.progress is not None  # untouched
        steps_then = len(recorder.steps[b.job_dir])
        wait_for(lambda: service.view(b.id).record.status == "done", what="the other job")
        assert len(recorder.steps[b.job_dir]) > steps_then  # it went on sampling after the cancel
        assert service.view(a.id).record.status == "cancelled" and service.running_jobs() == []
    finally:
        service.stop(TIMEOUT_S)


def test_a_restart_requeues_both_running_jobs(tmp_path, model, image):
    outputs = tmp_path / "out"
    first_settings, second_settings = settings(model, image, seed=7), settings(model, image, seed=8)
    first = service_with_two_workers(outputs, model, Recorder()).start()
    a, b = first.submit(first_settings), first.submit(second_settings)
    wait_for(lambda: all(JobDir.open(j.job_dir).finished == 1 for j in (a, b)), what="a section of each job")
    # a killed server leaves both jobs 'running': stop the threads, then mark both as the dead process would
    first.stop(TIMEOUT_S)
    assert {first.store.claim_next().id, first.store.claim_next().id} == {a.id, b.id}

    recorder = Recorder()
    second = service_with_two_workers(outputs, model, recorder)
    assert {j.id for j in second.store.jobs(("queued",))} == {a.id, b.id}  # requeued on start
    second.start()
    try:
        wait_for(lambda: all(second.view(j.id).record.status == "done" for j in (a, b)),
                 what="both after the restart")
    finally:
        second.stop(TIMEOUT_S)
    for job in (a, b):
        assert recorder.sections[job.job_dir][0] == 1  # each went on from its second section
    np.testing.assert_array_equal(read_frames(a.out), reference_frames(tmp_path, first_settings))
    np.testing.assert_array_equal(read_frames(b.out), reference_frames(tmp_path, second_settings))


# ---- through a real server -----------------------------------------------------------------------------


def test_a_server_with_two_cpu_workers_runs_two_jobs_at_once(tmp_path, model, image):
    pytest.importorskip("gradio_client", reason="needs gradio (pip install 'framepack[ui]')")
    from gradio_client import Client, handle_file

    server = Server(tmp_path / "outputs", model, tmp_path / "server.log", devices="cpu,cpu").start()
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
        jobs = [client.predict(image=handle_file(str(image)), prompt="a red circle", seconds=3.0, steps=4,
                               seed=seed, api_name="/submit")["job"] for seed in (1, 2)]
        devices_seen: set[tuple[str, str]] = set()  # (device of the 1st, of the 2nd) while both ran
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            status = [client.predict(job=job, api_name="/status") for job in jobs]
            if all(s["status"] == "running" and s.get("step") is not None for s in status):
                devices_seen.add((status[0]["device"], status[1]["device"]))
            if all(s["status"] == "done" for s in status):
                break
            assert all(s["status"] in ("queued", "running", "done") for s in status), status
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert any(x != y for x, y in devices_seen), "the two jobs were never seen running at once"
        for job in jobs:
            assert Path(client.predict(job=job, api_name="/video")).stat().st_size > 0
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    started = [f"job {job} started (seed {seed}) on cpu #" for job, seed in zip(jobs, (1, 2))]
    assert all(line in log for line in started), log[-2000:]
