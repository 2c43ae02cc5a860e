"""The app's back end without a web page: submit, watch, cancel, resume and list jobs.

``JobService`` ties the SQLite store, the job directories under ``outputs/jobs/`` and the worker
threads (one per device) together. The Gradio app and its API endpoints are thin calls into it,
and the tests drive it directly.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..images import load_image
from ..jobs import JobDir
from ..settings import GenerationSettings
from .files import public_text
from .loras import public_loras
from .store import FINISHED, STORE_NAME, JobRecord, JobStore
from .worker import PipelineLoader, Progress, Worker

log = logging.getLogger(__name__)

JOBS_DIR = "jobs"
OFFLOAD_DIR = "offload"  # planned jobs that offload blocks to disk write here (removed after each job)
PATH_SETTINGS = ("image", "end_image", "model")  # the settings that hold server paths


@dataclass(frozen=True)
class JobView:
    """One job as a page (or an API client) sees it: its record, plus live progress while it runs."""

    record: JobRecord
    progress: Progress | None  # None unless a worker of this server is running this job
    queue_place: int | None  # 1 = next, while queued
    device: str | None = None  # the worker running it (its device), while it runs

    def to_dict(self, outputs: Path) -> dict[str, Any]:
        """JSON for the API: no arrays, and no absolute server paths (files relative to ``outputs``)."""
        r, p = self.record, self.progress

        def where(path: Path) -> str:
            return public_text(str(path), outputs)

        data: dict[str, Any] = {
            "job": r.id, "status": r.status, "seed": r.seed, "queue_place": self.queue_place,
            "error": None if r.error is None else public_text(r.error, outputs),
            "video": where(r.out) if r.status == "done" else None, "job_dir": where(r.job_dir),
            "created": r.created, "settings": public_settings(r.settings, outputs), "device": self.device,
            "preserve_gb": r.preserve_gb,
        }
        if p is not None:
            data.update(phase=p.phase, section=p.section, sections=p.sections, step=p.step, steps=p.steps,
                        done_steps=p.done, total_steps=p.total, eta_s=p.eta_s,
                        provisional_video=None if p.video is None else where(p.video))
        return data


def public_settings(settings: dict[str, Any], outputs: Path) -> dict[str, Any]:
    """A job's settings as a client sees them: its files relative to ``outputs``, a model directory by name."""
    shown = {key: public_text(value, outputs) if key in PATH_SETTINGS and isinstance(value, str) else value
             for key, value in settings.items()}
    if "loras" in shown:  # LoRA files by name, as the video records them
        shown["loras"] = public_loras(shown["loras"])
    if isinstance(shown.get("keyframes"), list):  # each keyframe's image as the other images
        shown["keyframes"] = [{**k, "image": public_text(k["image"], outputs)}
                              if isinstance(k, dict) and isinstance(k.get("image"), str) else k
                              for k in shown["keyframes"]]
    return shown


def _check_image(label: str, path: str) -> None:
    """Decode the upload once; the reason names the file, never the server's upload folder."""
    try:
        load_image(path)
    except ValueError as exc:
        raise ValueError(f"{label}: " + str(exc).replace(str(path), Path(path).name)) from None


def worker_device(name: str) -> torch.device | None:
    """The torch device a worker's name stands for (None: unnamed, the loader alone knows)."""
    if not name:
        return None
    try:
        return torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"not a device name: {name!r} (cpu, cuda, cuda:1, ...)") from None


def worker_labels(devices: Sequence[str]) -> list[str]:
    """What the page calls each worker: its device, numbered where two share one (``cpu #1``, ``cpu #2``)."""
    counts = Counter(devices)
    seen: Counter[str] = Counter()
    labels = []
    for device in devices:
        seen[device] += 1
        labels.append(f"{device} #{seen[device]}" if counts[device] > 1 else device)
    return labels


class JobService:
    """The store plus one worker per loader: ``load_pipeline`` is one loader (one worker), or one
    per device, named by ``devices`` (what the page shows beside a running job)."""

    def __init__(self, outputs: Path, load_pipeline: PipelineLoader | Sequence[PipelineLoader],
                 devices: Sequence[str] | None = None) -> None:
        loaders = [load_pipeline] if callable(load_pipeline) else list(load_pipeline)
        if not loaders:
            raise ValueError("the app needs at least one worker")
        names = list(devices) if devices is not None else [""] * len(loaders)
        if len(names) != len(loaders):
            raise ValueError(f"{len(loaders)} pipeline loaders but {len(names)} device names")
        self.outputs = Path(outputs).resolve()
        self.store = JobStore(self.outputs / STORE_NAME)
        interrupted = self.store.requeue_interrupted()
        if interrupted:
            log.info("continuing interrupted job(s) %s from their last finished section", interrupted)
        # shared by every worker: a claim and that worker's current job change as one step for all
        self._claims = threading.RLock()
        # one pipeline loads at a time (see Worker); sizing a model for a memory plan takes it too
        self.loading = threading.Lock()
        labels = worker_labels(names) if any(names) else names
        self.workers: tuple[Worker, ...] = tuple(
            Worker(self.store, load, device=label, claim_lock=self._claims, load_lock=self.loading,
                   target=worker_device(name),
                   offload_dir=self.outputs / OFFLOAD_DIR)
            for load, label, name in zip(loaders, labels, names))

    def start(self) -> "JobService":
        for worker in self.workers:
            worker.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        for worker in self.workers:  # all at once: each stops within a step, its job goes back to the queue
            worker.request_stop()
        for worker in self.workers:
            worker.stop(timeout)

    def _wake(self) -> None:
        for worker in self.workers:  # every idle worker looks; the store hands the job to one of them
            worker.wake()

    # ---- actions ------------------------------------------------------------------------------------------

    def submit(self, settings: GenerationSettings, preserve_gb: float | None = None) -> JobRecord:
        """Check the images, copy them into a new job directory and queue the job.

        ``preserve_gb``: GPU memory the job's plan leaves free (a CUDA worker's; None: the default).
        It is kept with the queued job, not in its settings: it says how to run, not what to make.
        """
        return self.submit_many([settings], preserve_gb)[0]

    def submit_many(self, jobs: Sequence[GenerationSettings], preserve_gb: float | None = None) -> list[JobRecord]:
        """Queue each of ``jobs`` as its own job, in order (a batch); every image is checked before
        the first is queued, so a bad one queues none."""
        images = dict.fromkeys((label, path) for settings in jobs
                               for label, path in (("start image", settings.image), ("end image", settings.end_image),
                                                   *((f"keyframe image {i} ({k.seconds:g} s)", k.image)
                                                     for i, k in enumerate(settings.keyframes, 1)))
                               if path is not None)
        for label, path in images:  # a batch's jobs share their images: each decoded once
            _check_image(label, path)
        records = []
        for settings in jobs:
            key = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
            out = self.outputs / f"{key}-seed{settings.seed}.mp4"
            job = JobDir.create(self.outputs / JOBS_DIR / key, settings, out)
            records.append(self.store.add(job.settings.to_dict(), job.root, job.out, settings.seed, preserve_gb))
        self._wake()
        return records

    def cancel(self, job_id: int) -> str:
        record = self._record(job_id)
        with self._claims:  # no claim in between: a job not queued is current on one worker, or has ended
            cancelled = any(worker.cancel(job_id) for worker in self.workers)
        if cancelled:
            return f"job {job_id}: cancelling" if record.status == "running" else f"job {job_id}: cancelled"
        return f"job {job_id} is {record.status}: nothing to cancel"

    def resume(self, job_id: int) -> str:
        record = self._record(job_id)
        if self.store.resume(job_id):
            self._wake()
            return f"job {job_id}: queued again; it continues from its last finished section"
        return f"job {job_id} is {record.status}: only cancelled or failed jobs can be resumed"

    # ---- views ----------------------------------------------------------------------------------------------

    def _record(self, job_id: int) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise ValueError(f"no job {job_id}")
        return record

    def devices(self) -> list[torch.device | None]:
        """The device of each worker (None where unnamed): what the page's memory plan is shown for."""
        return [worker.target for worker in self.workers]

    def _live(self, job_id: int) -> tuple[Progress | None, str | None]:
        """The progress of ``job_id`` and the worker running it; (None, None) if none of ours is."""
        for worker in self.workers:
            progress = worker.status.get()
            if progress.job_id == job_id:
                return progress, worker.device or None
        return None, None

    def view(self, job_id: int) -> JobView:
        record = self._record(job_id)
        progress, device = self._live(job_id) if record.status == "running" else (None, None)
        place = self.store.queue_place(job_id) if record.status == "queued" else None
        return JobView(record, progress, place, device)

    def running_jobs(self) -> list[int]:
        """The jobs this server's workers are running, oldest claim first (lowest queue position)."""
        current = {worker.current for worker in self.workers} - {None}
        return [r.id for r in self.store.jobs(("running",)) if r.id in current]

    def running(self) -> int | None:
        """The job a page that submitted nothing follows: the first of the running ones."""
        jobs = self.running_jobs()
        return jobs[0] if jobs else None

    def queue(self) -> list[JobRecord]:
        """Running first, then queued in order."""
        return self.store.jobs(("running",)) + self.store.jobs(("queued",))

    def history(self, limit: int = 100) -> list[JobRecord]:
        return self.store.jobs(FINISHED, newest_first=True, limit=limit)
