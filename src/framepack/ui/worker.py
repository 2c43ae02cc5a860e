"""A background thread that runs the store's queued jobs in order and reports on the one it runs.

The app runs one worker per device (``framepack ui --devices cuda:0,cuda:1``): each claims the next
queued job from the shared store (a claim is one SQLite transaction, so no job runs twice), loads
its own pipeline on its device and publishes its own :class:`Progress`. The worker owns no
settings of its own: it opens each job's directory (so a job that was
interrupted continues from its last finished section), asks the pipeline to run it, and turns the
pipeline's events into a :class:`Progress` snapshot that any number of UI sessions can read.
Cancelling sets a flag the pipeline checks after every sampling step.

Memory plans (:mod:`framepack.ui.memory`): a worker on a CUDA device plans each job for the GPU's
free memory less the job's "GPU memory to preserve", loads that job's pipeline on the host and
places it as the plan says (``runtime.apply``), as ``framepack generate`` does. Placing cannot be
undone in place (weights stored in fp8 / int8, offload hooks, moved modules), so the rule is the
simplest correct one: **a CUDA worker keeps no pipeline between jobs**. Each planned job loads its
own and drops it when it ends (its placement closed, its disk offload folder removed), and a
pipeline kept from an unplanned job is let go before the free memory is measured (it would hold
the memory being measured). Workers on other devices never plan and keep their pipelines as before.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..jobs import JobDir
from ..pipeline import Cancelled, Done, Event, FramePackPipeline, SectionStarted, StepProgress, VideoUpdated
from ..runtime.plan import format_plan
from .memory import job_plan, plans_memory
from .store import JobRecord, JobStore

if TYPE_CHECKING:
    from ..runtime.plan import MemoryPlan

log = logging.getLogger(__name__)
# one line per job started, finished, failed or stopped: `framepack ui` shows this logger at INFO
# even when everything else is at WARNING, so the server's console tells what it did
job_log = logging.getLogger("framepack.ui.jobs")

IDLE_RECHECK_S = 5.0  # an idle worker looks at the store this often even without a wake-up
PREVIEW_HEIGHT = 96  # latent previews are tiny (h = H/8): enlarged to about this height
PREVIEW_FRAMES = 9  # at most this many frames side by side


class PipelineLoader(Protocol):
    """Loads a model's pipeline for a worker: on the worker's device, or, with a memory ``plan``,
    on the host with the weights as the plan stores them (``runtime.apply`` then places it).
    A loader is called with a plan only by a worker whose device plans (CUDA)."""

    def __call__(self, model: str, plan: MemoryPlan | None = None) -> FramePackPipeline: ...


def pipeline_loader(device: torch.device, dtype: torch.dtype) -> PipelineLoader:
    """The loader of ``framepack ui``'s worker on ``device``."""

    def load(model: str, plan: MemoryPlan | None = None) -> FramePackPipeline:
        if plan is None:  # each worker keeps its own pipeline on its own device
            log.info("loading %s on %s", model, device)
            return FramePackPipeline.from_model(model, device=device, dtype=dtype)
        from ..components import load_components, resolve_model
        from ..runtime.apply import load_options

        # a planned job (CUDA): every component loads on the host, the transformer's blocks straight
        # into fp8 when the plan stores them so; the worker then places them (runtime.apply), as
        # `framepack generate` does
        log.info("loading %s on the host for a memory plan on %s", model, device)
        components = load_components(resolve_model(model), dtype=dtype, device="cpu", **load_options(plan))
        return FramePackPipeline(components, device)

    return load


@dataclass(frozen=True)
class Progress:
    """What the worker is doing now. Versions change whenever the preview / video does."""

    job_id: int | None = None
    phase: str = "idle"  # idle | loading | sampling
    section: int = 0  # 1-based, in generation order
    sections: int = 0
    step: int = 0  # steps done in the current section
    steps: int = 0
    done: int = 0  # steps done over the whole job (finished sections count in full)
    total: int = 0
    eta_s: float | None = None
    preview: np.ndarray | None = None  # (h, T*w, 3) uint8
    preview_version: int = 0
    video: Path | None = None  # provisional (or final) video of the running job
    video_version: int = 0


class LiveStatus:
    """A :class:`Progress` shared between the worker (writer) and the UI sessions (readers)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = Progress()

    def get(self) -> Progress:
        with self._lock:
            return self._progress

    def update(self, **changes: Any) -> None:
        with self._lock:
            self._progress = replace(self._progress, **changes)

    def reset(self, **changes: Any) -> None:
        with self._lock:
            # versions keep counting so a reader never mistakes a new picture for one it has shown
            self._progress = replace(Progress(), preview_version=self._progress.preview_version + 1,
                                     video_version=self._progress.video_version + 1, **changes)


def preview_strip(frames: np.ndarray, height: int = PREVIEW_HEIGHT, max_frames: int = PREVIEW_FRAMES) -> np.ndarray:
    """(T, h, w, 3) uint8 latent-size frames -> one (h*k, n*w*k, 3) strip, enlarged k times (nearest)."""
    pick = np.linspace(0, len(frames) - 1, min(len(frames), max_frames)).round().astype(int)
    strip = np.concatenate(list(frames[pick]), axis=1)
    k = max(1, math.ceil(height / frames.shape[1]))
    return strip.repeat(k, axis=0).repeat(k, axis=1)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


class Worker:
    """Runs queued jobs one at a time in a daemon thread; ``stop`` leaves the running job resumable.

    ``device`` names where its pipelines live (shown with the job it runs). Workers that share a
    store share ``claim_lock`` as well: a claim and the worker's current job then change together
    for all of them, so a cancel that finds a job neither queued nor current on any worker knows it
    has already ended. They share ``load_lock`` too: one pipeline loads at a time, because two loads
    at once double the peak host RAM of loading (the reference's most common silent exit), and
    libraries that import lazily on first use (transformers) are not safe to import from two threads.
    ``target`` (a CUDA device) makes the worker apply memory plans (see the module docstring); jobs
    offloaded to disk write under ``offload_dir``.
    """

    def __init__(self, store: JobStore, load_pipeline: PipelineLoader | Callable[[str], FramePackPipeline],
                 keep_pipelines: int = 1, device: str = "", claim_lock: threading.RLock | None = None,
                 load_lock: threading.Lock | None = None, target: torch.device | None = None,
                 offload_dir: Path | None = None) -> None:
        self.store = store
        self.device = device
        self.target = target  # the torch device of its jobs, where known: what memory plans are made for
        self._offload_dir = offload_dir  # disk offload of planned jobs (default: the system's temporary folder)
        self.status = LiveStatus()
        self._load_pipeline = load_pipeline
        self._keep = keep_pipelines
        self._pipelines: OrderedDict[str, FramePackPipeline] = OrderedDict()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._cancel = threading.Event()
        # claim + current job change together (cancel reads both); re-entrant, so that a service can
        # hold it across the cancels of all its workers
        self._lock = claim_lock if claim_lock is not None else threading.RLock()
        self._loading = load_lock if load_lock is not None else threading.Lock()
        self._current: int | None = None
        self._thread: threading.Thread | None = None

    # ---- control ------------------------------------------------------------------------------------------

    def start(self) -> "Worker":
        if self._thread is not None:
            raise RuntimeError("the worker is already started")
        name = f"framepack-ui-worker-{self.device}" if self.device else "framepack-ui-worker"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        return self

    def request_stop(self) -> None:
        """Ask the thread to stop after the current sampling step, without waiting for it."""
        self._stopping.set()
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current sampling step; the running job goes back to the queue."""
        self.request_stop()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self) -> None:
        """Something was queued: look at the store now."""
        self._wake.set()

    def cancel(self, job_id: int) -> bool:
        """Cancel a queued job, or stop the running one within a step; False if it is neither."""
        with self._lock:
            if self.store.cancel_queued(job_id):
                return True
            if self._current == job_id:
                self._cancel.set()
                return True
        return False

    @property
    def current(self) -> int | None:
        return self._current

    # ---- the loop -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking, so a submit during the look is not lost
            with self._lock:
                record = self.store.claim_next()
                self._current = None if record is None else record.id
                self._cancel.clear()
            if record is None:
                self._wake.wait(IDLE_RECHECK_S)
                continue
            try:
                self._run(record)
            finally:
                with self._lock:
                    self._current = None
                self.status.reset()

    def _run(self, record: JobRecord) -> None:
        self.status.reset(job_id=record.id, phase="loading")
        began = time.perf_counter()
        where = f" on {self.device}" if self.device else ""
        job_log.info("job %d started (seed %d)%s", record.id, record.seed, where)
        try:
            job = JobDir.open(record.job_dir)
            plan = self._plan(job, record)
            if plan is None:
                self._sample(self._pipeline(job.settings.model), job, record.id)
            else:
                self._sample_placed(job, record.id, plan)
        except Cancelled:
            if self._cancel.is_set():
                self.store.mark_cancelled(record.id)
                job_log.info("job %d cancelled after %.0f s; resumable", record.id, time.perf_counter() - began)
            else:  # the server is stopping: the job continues at the next start
                self.store.requeue(record.id)
                job_log.info("job %d interrupted by shutdown; queued again", record.id)
        except Exception as exc:  # any failure belongs to this job only; the worker goes on
            log.info("job %d failed", record.id, exc_info=True)  # the traceback, with -v
            self.store.fail(record.id, one_line(exc))
            job_log.warning("job %d failed: %s", record.id, one_line(exc))
        else:
            self.store.finish(record.id)
            job_log.info("job %d done in %.0f s: %s", record.id, time.perf_counter() - began, record.out.name)

    def _plan(self, job: JobDir, record: JobRecord) -> MemoryPlan | None:
        """The job's memory plan; a NoPlanError (one line) fails the job before anything loads."""
        if plans_memory(self.target):
            self._pipelines.clear()  # a kept pipeline would hold the memory about to be measured
            self._free_device()
        with self._loading:  # sizing the model must not run beside another worker's load (ui.memory says why)
            plan = job_plan(job.settings, self.target, record.preserve_gb)
        if plan is not None:
            log.info("job %d: memory plan on %s (predicted peaks):\n%s", record.id, self.target, format_plan(plan))
        return plan

    def _sample_placed(self, job: JobDir, job_id: int, plan: MemoryPlan) -> None:
        """Load the job's own pipeline on the host, place it as ``plan`` says, run, and let it go."""
        from ..runtime.apply import apply_plan

        assert self.target is not None  # only a worker with a device plans
        pipeline: FramePackPipeline | None = None
        try:
            with self._loading:
                pipeline = self._load_pipeline(job.settings.model, plan)  # type: ignore[call-arg]
            pipeline.use_loras(job.settings.loras)  # fused before the plan stores or offloads the weights
            with apply_plan(pipeline, plan, self.target, offload_dir=self._offload_dir):
                self._sample(pipeline, job, job_id)
        finally:
            del pipeline  # placed for this plan only: never kept (see the module docstring)
            self._free_device()
            if self._offload_dir is not None:  # the placement removed its own folder; the parent goes when
                with contextlib.suppress(OSError):  # empty (another worker's job may still offload there)
                    self._offload_dir.rmdir()

    def _free_device(self) -> None:
        """Give a dropped pipeline's GPU memory back (offload hooks keep reference cycles)."""
        gc.collect()
        if self.target is not None and self.target.type == "cuda":
            torch.cuda.empty_cache()

    def _pipeline(self, model: str) -> FramePackPipeline:
        if model not in self._pipelines:
            while len(self._pipelines) >= self._keep:  # free the old model before loading a new one
                self._pipelines.popitem(last=False)
            with self._loading:
                self._pipelines[model] = self._load_pipeline(model)
        self._pipelines.move_to_end(model)
        return self._pipelines[model]

    def _sample(self, pipeline: FramePackPipeline, job: JobDir, job_id: int) -> None:
        sections = len(pipeline.plans(job.settings))
        steps = job.settings.steps
        resumed_at = job.finished * steps
        began = time.perf_counter()
        self.status.update(phase="sampling", sections=sections, section=job.finished + 1, steps=steps,
                           done=resumed_at, total=sections * steps)

        def on_event(event: Event) -> None:
            if isinstance(event, SectionStarted):
                self.status.update(section=event.step + 1, sections=event.count, step=0)
            elif isinstance(event, StepProgress):
                done = event.step * event.n + event.i + 1
                total = event.count * event.n
                rate = (time.perf_counter() - began) / max(1, done - resumed_at)  # seconds per step, this run
                current = self.status.get()
                self.status.update(step=event.i + 1, steps=event.n, done=done, total=total,
                                   eta_s=rate * (total - done), preview=preview_strip(event.preview),
                                   preview_version=current.preview_version + 1)
            elif isinstance(event, VideoUpdated):
                self.status.update(video=event.path, video_version=self.status.get().video_version + 1)
            elif isinstance(event, Done):
                self.status.update(eta_s=0.0)

        pipeline.run(job, on_event=on_event, should_stop=lambda: self._cancel.is_set() or self._stopping.is_set())
