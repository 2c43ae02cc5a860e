"""The Gradio web app: a form, a live view of a job, a queue and a history.

A page follows the job it submitted (or, before it submits one, the first running job); with one
worker per device several jobs run at once, each with its own progress. Every page polls
(``gr.Timer``) one cheap snapshot of its job instead of holding a generator
open, so a closed tab, a second user or a server restart never disturbs a job. The same back end
is exposed as named API endpoints (``/submit``, ``/status``, ``/cancel``, ``/resume``,
``/video``, ``/history``, ``/queue``) for ``gradio_client``.
"""

from __future__ import annotations

import functools
import html
import inspect
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import gradio as gr
from starlette.middleware import Middleware

from ..jobs import JobDir
from ..redo import branch_job, model_plans
from ..sampling import SAMPLERS
from ..settings import MAX_SECONDS
from ..video import read_metadata
from ..world_check import world_notes
from .files import FileGate, FileReferenceGuard, model_names, public_text
from .form import (AUTO, CACHE_CHOICES, MAX_PRESERVE_GB, MODES, RESOLUTIONS, AcceptFile, FormDefaults, batch_jobs,
                   form_from_settings, history_limit, job_number, length_note, plan_settings, preserve_gb,
                   RedoRequest, redo_request, section_seconds, settings_from_form, snap_seconds)
from .loras import LoraFolder, PendingLoras, loras_from_form, loras_text, public_loras
from .memory import BUSY, NO_PLAN, plan_panel, plans_memory
from .service import JOBS_DIR, JobService, JobView, public_settings
from .store import JobRecord
from .worker import one_line

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a page asks for progress
PROMPT_CHARS = 60  # prompt shown in tables
LIVE_PREVIEW = "Section being denoised"
IDLE_PREVIEW = "Preview (while a section is denoised)"
T2V_NOTE = ("Without a start image the video starts from a grey frame (text-to-video). The demo model was trained "
            "to move what its start image shows: from grey it draws the prompt's colours, but does not follow the "
            "caption's object or motion (docs/generation.md, Text-to-video).")
FORM_FIELDS: tuple[str, ...] = ("image", "end_image", "prompt", "negative_prompt", "seconds", "seed", "random_seed",
                                "steps", "distilled_guidance", "cfg", "sampler", "mode", "model", "resolution", "crf",
                                "cache", "preserve_gb")
# issue 20's fields travel beside the form, as the Batch fields do (on_extras), so that clients of the
# form handler that know nothing of them call it as before
EXTRA_FIELDS: tuple[str, ...] = ("keyframe_images", "keyframe_times", "color_match")
PLAN_FIELDS: tuple[str, ...] = ("model", "resolution", "cfg", "preserve_gb")  # what the memory plan panel follows
PLANNING = "The memory plan of each GPU appears here (it is computed for the form's model and resolution)."
PRESERVE_STEP_GB = 0.5
PLAN_WAIT_S = 2.0  # the panel waits this long for a model load to end before saying one is running
QUEUE_HEADERS = ["job", "status", "place", "prompt", "s", "seed"]
HISTORY_HEADERS = ["job", "status", "finished", "prompt", "s", "seed", "steps", "model", "video / error"]
# the tables wrap their text in these widths, so every column stays on screen at 1400 px
QUEUE_WIDTHS = ["9%", "14%", "10%", "41%", "9%", "17%"]
HISTORY_WIDTHS = ["5%", "7%", "10%", "30%", "4%", "9%", "5%", "8%", "22%"]
CSS = """
#fp-progress progress { width: 100%; height: 1.2em; }
#fp-message p, #fp-history-message p, #fp-length p, #fp-plan p { margin: 0; }
.fp-error { color: #b91c1c; font-weight: 600; }
.fp-note { color: #92400e; }
"""
T = TypeVar("T")


# ---- small views ---------------------------------------------------------------------------------------------


def _short(text: str, limit: int = PROMPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error(message: str) -> str:
    return f'<span class="fp-error">⚠ {html.escape(message)}</span>'


def _note(message: str) -> str:
    """A remark beside a submission that did go through (the model's world: framepack.world_check)."""
    return f'<span class="fp-note">ⓘ {html.escape(message)}</span>'


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    seconds = round(seconds)
    return f"ETA {seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"ETA {seconds} s"


def job_line(view: JobView, outputs: Path) -> str:
    r = view.record
    parts = [f"**Job {r.id}**", r.status, f"seed {r.seed}"]
    if view.device is not None:  # which worker runs it (`framepack ui --devices`)
        parts.append(f"on {view.device}")
    if view.queue_place is not None:
        parts.append(f"place {view.queue_place} in the queue")
    if r.status == "done":
        parts.append(f"video: `{r.out.name}`")
    if r.status == "cancelled":
        parts.append("resumable: press Resume")
    line = " · ".join(parts)
    return line + ("\n\n" + _error(public_text(r.error, outputs)) if r.error else "")


def progress_bar(view: JobView | None) -> str:
    if view is None:
        return '<div class="fp-bar"><progress value="0" max="1"></progress><span>idle</span></div>'
    p, status = view.progress, view.record.status
    if p is None or p.phase != "sampling":
        value, total = (1, 1) if status == "done" else (0, 1)
        label = "loading the model …" if p is not None else status
    else:
        value, total = p.done, max(1, p.total)
        label = f"section {p.section}/{p.sections} · step {p.step}/{p.steps} · {_eta(p.eta_s)}"
    return (f'<div class="fp-bar"><progress value="{value}" max="{total}"></progress>'
            f'<span class="fp-bar-label">{html.escape(label)}</span></div>')


def queue_rows(service: JobService) -> list[list[Any]]:
    rows = []
    for r in service.queue():
        place = service.store.queue_place(r.id) if r.status == "queued" else ""
        prompt = _short(str(r.settings.get("prompt", "")))
        device = service.view(r.id).device if r.status == "running" else None
        status = f"{r.status} on {device}" if device else r.status  # several run at once with --devices
        rows.append([r.id, status, place, prompt, r.settings.get("seconds"), r.seed])
    return rows


def history_rows(records: Sequence[JobRecord], outputs: Path) -> list[list[Any]]:
    return [[r.id, r.status, time.strftime("%m-%d %H:%M", time.localtime(r.updated)),
             _short(str(r.settings.get("prompt", ""))), r.settings.get("seconds"), r.seed, r.settings.get("steps"),
             Path(str(r.settings.get("model", ""))).name,
             r.out.name if r.status == "done" else public_text(r.error or "", outputs)]
            for r in records]


def _table(rows: list[list[Any]], headers: list[str]) -> dict[str, Any]:
    return {"data": rows, "headers": headers}


def queue_submission(service: JobService, form: Mapping[str, Any], models: Mapping[str, str], accept_file: AcceptFile,
                     loras: Callable[[], Any], folder: LoraFolder | None) -> tuple[list[JobRecord], list[str]]:
    """Check a submission (one job, or a batch: ``count`` and ``prompts`` in ``form``) through the
    form's parsers and queue each job; nothing is queued unless every job passes. ``loras`` gives
    the LoRA field's value once the jobs are checked. Returns the queued jobs and the notes to show
    beside them (where the jobs leave their model's world)."""
    jobs = []
    for job in batch_jobs(form):
        try:
            jobs.append(settings_from_form(job.form, models, accept_file=accept_file))
        except ValueError as exc:
            if not job.label:
                raise
            raise ValueError(f"batch job {len(jobs) + 1} ({job.label}): {exc}") from None
    chosen = loras_from_form(loras(), folder)
    preserve = preserve_gb(form.get("preserve_gb"))
    notes = world_notes(jobs)
    return service.submit_many([settings.replace(loras=chosen) for settings in jobs], preserve), notes


def queue_redo(service: JobService, request: RedoRequest) -> JobRecord:
    """Queue a branch of one of this app's finished jobs with section K made again (framepack.redo:
    the sections not depending on K are linked from it, the rest made by a worker like any job).
    ``request`` comes from the form's parser (:func:`redo_request`); the job is looked up in the
    app's own store, so a client never names a job directory, and it must lie under this app's outputs."""
    number, k = request.job, request.section
    record = service.view(number).record
    if record.status != "done":
        raise ValueError(f"job {number} is {record.status}: only a finished job can be redone")
    if not record.job_dir.resolve().is_relative_to(service.outputs / JOBS_DIR):
        raise ValueError(f"job {number} was not made by this app")
    original = JobDir.open(record.job_dir)
    plans, given = model_plans(original.settings)
    key = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    branch = branch_job(original, plans, k, service.outputs / f"{key}-redo{k}.mp4", service.outputs / JOBS_DIR / key,
                        seed=request.seed, prompt=request.prompt, given=given)
    queued = service.store.add(branch.settings.to_dict(), branch.root, branch.out, branch.settings.seed)
    for worker in service.workers:  # every idle worker looks; the store hands the job to one of them
        worker.wake()
    return queued


def submitted_text(service: JobService, records: Sequence[JobRecord], notes: Sequence[str]) -> str:
    """What the page says after a submission: the job(s) and their place, then any notes."""
    first = records[0]
    place = service.store.queue_place(first.id)
    where = f"place {place} in the queue" if place else "starting"
    if len(records) == 1:
        text = f"Job {first.id} submitted (seed {first.seed}, {where})."
    else:
        first_where = f"the first at {where}" if place else "the first starting"
        text = f"Jobs {first.id} to {records[-1].id} submitted ({len(records)} jobs; {first_where})."
    return "\n\n".join([text, *(_note(note) for note in notes)])


def lora_listing(folder: LoraFolder) -> str:
    """The LoRA folder's files, as the panel lists them."""
    names = folder.names()
    if not names:
        return "The LoRA folder holds no .safetensors files."
    return "LoRA files: " + ", ".join(f"`{name}`" for name in names)


def uses_distilled_guidance(model: str) -> bool:
    """Whether a model reads the distilled-guidance scale (its transformer embeds it); the demo
    model does not. A model on the hub (the 13B ones) does."""
    from ..components import resolve_model

    transformer = Path(resolve_model(model).transformer)
    try:
        config = json.loads((transformer / "config.json").read_text())
    except (OSError, ValueError):
        return True
    return bool(config.get("guidance_embeds", True)) if isinstance(config, dict) else True


def model_cfg(model: str) -> float:
    """The CFG scale a model is made for (1 = off): what the CFG field shows for it."""
    from ..components import resolve_model

    return resolve_model(model).cfg(None)


def model_steps(model: str) -> int:
    """The sampling steps a model is made for: what the steps field shows when it is chosen."""
    from ..components import resolve_model

    return resolve_model(model).steps(None)


def field_updates(model: str, cfg: float | None = None, guidance: float | None = None) -> tuple[Any, Any]:
    """The CFG and distilled-guidance fields for ``model``: its own CFG unless ``cfg`` is given; the
    guidance field only where the model reads it."""
    guidance_update = gr.update(visible=uses_distilled_guidance(model))
    if guidance is not None:
        guidance_update = gr.update(value=guidance, visible=uses_distilled_guidance(model))
    return gr.update(value=model_cfg(model) if cfg is None else cfg), guidance_update


def endpoint(outputs: Path) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Every handler's error translation: a bad argument (ValueError, OSError, LookupError) becomes
    a ``gr.Error`` with its one-line reason, paths shown relative to ``outputs``; anything else is
    logged and answered with a message too, never with Gradio's generic 'upstream app' error."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> T:
            try:
                return fn(*args, **kwargs)
            except gr.Error:
                raise
            except (ValueError, OSError, LookupError, TypeError) as exc:
                raise gr.Error(public_text(one_line(exc), outputs), print_exception=False) from None
            except Exception as exc:
                log.exception("%s failed", fn.__name__)
                raise gr.Error(f"the server failed to answer ({type(exc).__name__}); its log has the details",
                               print_exception=False) from None

        return call

    return wrap


# ---- the app ---------------------------------------------------------------------------------------------------


def build_app(service: JobService, models: Sequence[str], defaults: FormDefaults = FormDefaults(),
              poll_s: float = POLL_S, gate: FileGate | None = None, loras: LoraFolder | None = None) -> gr.Blocks:
    """The page and its API; ``service`` must be started by the caller (see :func:`launch`).

    ``gate`` decides which files clients may name (by default: this app's uploads); :func:`launch`
    shares it with the request guard in front of Gradio. ``loras``: the LoRA folder whose files the
    page offers (``framepack ui --lora-dir``); None: no LoRA control.
    """
    if not models:
        raise ValueError("the app needs at least one model")
    names = model_names(models)  # the page shows names; a model directory's path stays on the server
    shown_name = {model: name for name, model in names.items()}
    first = next(iter(names.values()))
    outputs = service.outputs
    checked = endpoint(outputs)

    with gr.Blocks(title="FramePack", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        if gate is None:  # only files Gradio received as uploads for this app, or that the app handed out
            gate = FileGate(outputs, lambda: app.upload_file_set)
        watched = gr.State(None)  # the job this page follows
        shown = gr.State({})  # what the page shows now, so a poll only sends what changed
        cancelling = gr.State(None)  # a job this page asked to cancel, until the poll sees it stop
        gr.Markdown("## FramePack\nA start image and a prompt in, a video out, section by section. "
                    "Jobs wait in a queue that survives restarts.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        start = gr.Image(label="Start image (empty: text-to-video)", type="filepath",
                                         sources=["upload", "clipboard"], height=240, elem_id="fp-start")
                        end = gr.Image(label="End image (optional)", type="filepath", sources=["upload", "clipboard"],
                                       height=240, elem_id="fp-end")
                    gr.Markdown(T2V_NOTE, elem_id="fp-t2v-note")
                    with gr.Accordion("Keyframes", open=False, elem_id="fp-keyframes-panel"):
                        keyframe_images = gr.File(label="Keyframe images, in order (inverted mode)", file_count="multiple",
                                                  file_types=["image"], elem_id="fp-keyframes")
                        keyframe_times = gr.Textbox(label="Their times in seconds, one per image in the same order "
                                                    "(snapped to the section boundaries, every 1.2 s)", value="",
                                                    max_lines=1, placeholder="1.2, 2.4", elem_id="fp-keyframe-times")
                    prompt = gr.Textbox(label="Prompt", lines=3, value=defaults.prompt, elem_id="fp-prompt",
                                        placeholder="a prompt, or a timeline: "
                                                    "[0s-2s: a cat sits] [2s-5s: the cat jumps]")
                    step = section_seconds()
                    seconds = gr.Slider(step, MAX_SECONDS, value=snap_seconds(defaults.seconds), step=step,
                                        label=f"Length (seconds, in sections of {step:g} s)", elem_id="fp-seconds")
                    length = gr.Markdown(length_note(snap_seconds(defaults.seconds)), elem_id="fp-length")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="fp-seed")
                        random_seed = gr.Checkbox(label="Random seed (the one used is shown with the job)",
                                                  value=defaults.random_seed, elem_id="fp-random-seed")
                    with gr.Accordion("Advanced", open=False, elem_id="fp-advanced"):
                        model = gr.Dropdown(list(names), value=next(iter(names)), label="Model", elem_id="fp-model")
                        negative = gr.Textbox(label="Negative prompt (used when CFG > 1)",
                                              value=defaults.negative_prompt, elem_id="fp-negative")
                        with gr.Row():
                            steps = gr.Number(label="Steps per section", value=defaults.steps, precision=0,
                                              elem_id="fp-steps")
                            sampler = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label="Sampler",
                                                  elem_id="fp-sampler")
                        with gr.Row():
                            # shown only for models that read it (the demo model does not)
                            guidance = gr.Number(label="Distilled guidance", value=defaults.distilled_guidance,
                                                 visible=uses_distilled_guidance(first), elem_id="fp-guidance")
                            # a Number field cannot stay empty (Gradio shows and submits 0, unconditional
                            # generation): it shows the chosen model's own scale
                            cfg = gr.Number(label="CFG (1 = off)", elem_id="fp-cfg",
                                            value=defaults.cfg if defaults.cfg is not None else model_cfg(first))
                        with gr.Row():
                            mode = gr.Dropdown([("model's own", AUTO)] + [(m, m) for m in MODES if m != AUTO],
                                               value=defaults.mode, label="Mode", elem_id="fp-mode")
                            resolution = gr.Dropdown([("model's own", AUTO)] + [(str(r), str(r)) for r in RESOLUTIONS],
                                                     value=defaults.resolution, label="Resolution",
                                                     elem_id="fp-resolution")
                        crf = gr.Slider(0, 51, value=defaults.crf, step=1, elem_id="fp-crf",
                                        label="MP4 quality (CRF: 0 lossless, lower is better)")
                        # skips transformer evaluations whose result barely changes (docs/caching.md)
                        cache = gr.Dropdown(list(CACHE_CHOICES), value=defaults.cache, elem_id="fp-cache",
                                            label="Step cache (faster; 'off' is exact)")
                        color = gr.Checkbox(label="Colour drift correction: each section's colours matched to the start "
                                            "image (the written frames only; needs a start image)", value=False,
                                            elem_id="fp-color-match")
                    with gr.Accordion("Batch", open=False, elem_id="fp-batch"):
                        count = gr.Number(label="Count (one job per seed: the seed above, +1, +2, ...)", value=1,
                                          precision=0, minimum=1, elem_id="fp-count")
                        prompts_box = gr.Textbox(label="Prompts (one job per line, or a JSON object of settings per "
                                                       "line; empty: the prompt above)", lines=3, value="",
                                                 elem_id="fp-prompts",
                                                 placeholder='a red circle moves up\n'
                                                             '{"prompt": "a blue square grows", "seed": 7}')
                    lora_box = lora_add = lora_list = None
                    if loras is not None:
                        with gr.Accordion("LoRAs", open=False, elem_id="fp-loras-panel"):
                            lora_list = gr.Markdown(lora_listing(loras), elem_id="fp-lora-list")
                            lora_add = gr.Dropdown(loras.names(), value=None, label="Add a LoRA",
                                                   elem_id="fp-lora-add")
                            lora_box = gr.Textbox(label="LoRAs and weights (name:weight, comma-separated; "
                                                  "weight 1 when left out)", value="", elem_id="fp-loras",
                                                  placeholder="style.safetensors:0.8, motion.safetensors")
                    with gr.Accordion("Memory plan", open=False, elem_id="fp-memory"):
                        # the reference's control: what a CUDA worker leaves free of the plan (for the
                        # desktop, other programs); more preserved means more offloading, slower
                        preserve = gr.Number(label="GPU memory to preserve (GB; larger means slower)",
                                             value=defaults.preserve_gb, minimum=0, maximum=MAX_PRESERVE_GB,
                                             step=PRESERVE_STEP_GB, elem_id="fp-preserve")
                        # read-only; a GPU's plan needs the model's sizes (seconds the first time), so it
                        # is computed after the page has loaded and on every change, never while building it
                        planned = any(plans_memory(device) for device in service.devices())
                        plan_view = gr.Markdown(PLANNING if planned else NO_PLAN, elem_id="fp-plan")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="fp-generate")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="fp-cancel")
                        resume = gr.Button("Resume", elem_id="fp-resume")
                    message = gr.Markdown(elem_id="fp-message")
                with gr.Column(scale=1):
                    info = gr.Markdown("No job yet.", elem_id="fp-job")
                    bar = gr.HTML(progress_bar(None), elem_id="fp-progress")
                    preview = gr.Image(label=IDLE_PREVIEW, interactive=False, format="png", height=120,
                                       elem_id="fp-preview")
                    video = gr.Video(label="Video", interactive=False, height=360, elem_id="fp-video")
                    queue_table = gr.Dataframe(_table([], QUEUE_HEADERS), label="Queue", interactive=False, wrap=True,
                                               column_widths=QUEUE_WIDTHS, elem_id="fp-queue")
        with gr.Tab("History", elem_id="fp-history-tab"):
            history_table = gr.Dataframe(_table([], HISTORY_HEADERS), label="Finished jobs (click a row)",
                                         interactive=False, wrap=True, column_widths=HISTORY_WIDTHS,
                                         elem_id="fp-history")
            with gr.Row():
                # text, not a Number field: that would start at 0 ("no job 0"); empty until a row is picked
                picked = gr.Textbox(label="Job", value="", placeholder="click a row, or type a job number",
                                    max_lines=1, elem_id="fp-history-job")
                show = gr.Button("Show", elem_id="fp-history-show")
                use = gr.Button("Use these settings", elem_id="fp-use-settings")
                refresh = gr.Button("Refresh", elem_id="fp-history-refresh")
            history_message = gr.Markdown(elem_id="fp-history-message")
            with gr.Row():
                redo_section = gr.Number(label="Section (1 = the first in the video)", value=1, precision=0,
                                         minimum=1, elem_id="fp-redo-section")
                redo_seed = gr.Textbox(label="Seed (empty: the same)", value="", max_lines=1, elem_id="fp-redo-seed")
                redo_prompt = gr.Textbox(label="Prompt of that section (empty: the same)", value="", max_lines=1,
                                         elem_id="fp-redo-prompt")
                redo = gr.Button("Redo section", elem_id="fp-redo")
            with gr.Row():
                history_video = gr.Video(label="Video", interactive=False, elem_id="fp-history-video")
                history_settings = gr.JSON(label="Settings", elem_id="fp-history-settings")
            with gr.Row():
                mp4 = gr.File(label="…or take the settings from a framepack mp4", elem_id="fp-mp4")
                use_mp4 = gr.Button("Use settings from this video", elem_id="fp-use-mp4")

        by_name = {"image": start, "end_image": end, "prompt": prompt, "negative_prompt": negative, "seconds": seconds,
                   "seed": seed, "random_seed": random_seed, "steps": steps, "distilled_guidance": guidance,
                   "cfg": cfg, "sampler": sampler, "mode": mode, "model": model, "resolution": resolution, "crf": crf,
                   "cache": cache, "preserve_gb": preserve, "keyframe_images": keyframe_images,
                   "keyframe_times": keyframe_times, "color_match": color}
        extras = [by_name[name] for name in EXTRA_FIELDS]
        form = [by_name[name] for name in FORM_FIELDS]
        # the LoRA field travels beside the form, not in it (see on_submit): what "use these settings" fills
        filled = form + extras + ([lora_box] if lora_box is not None else [])
        private: dict[str, Any] = {"api_visibility": "private"}
        # The LoRA choice travels by session (PendingLoras): the click on Generate hands the LoRA field
        # over, then on_submit (the next step of the same click) takes it. The form handler and /submit
        # keep their arguments, so clients that know nothing of LoRAs call them as before.
        chosen_loras = PendingLoras()
        chosen_batch = PendingLoras()  # the Batch fields travel the same way (any value, by session)
        chosen_extras = PendingLoras()  # and the keyframe and colour fields (EXTRA_FIELDS)

        # ---- handlers -----------------------------------------------------------------------------------------
        # Every handler that takes what a client typed gets it raw (preprocess=False) and reads it through
        # the parsers of .form and the FileGate, as the API does.

        def on_batch(number: Any, lines: Any, request: gr.Request) -> None:
            chosen_batch.put(getattr(request, "session_hash", None), {"count": number, "prompts": lines})

        def on_extras(request: gr.Request, *values: Any) -> None:
            chosen_extras.put(getattr(request, "session_hash", None), dict(zip(EXTRA_FIELDS, values)))

        def on_loras(value: Any, request: gr.Request) -> None:
            chosen_loras.put(getattr(request, "session_hash", None), value)

        def on_add_lora(name: Any, current: Any) -> Any:
            if not isinstance(name, str) or not name:
                return gr.skip()
            text = current.strip() if isinstance(current, str) else ""
            return f"{text}, {name}:1" if text else f"{name}:1"

        def on_lora_files() -> tuple[Any, Any]:
            assert loras is not None
            return lora_listing(loras), gr.update(choices=loras.names(), value=None)

        def on_submit(request: gr.Request, *values: Any) -> tuple[str, Any]:
            session = getattr(request, "session_hash", None)
            try:
                fields = {**dict(zip(FORM_FIELDS, values)), **(chosen_batch.take(session) or {}),
                          **(chosen_extras.take(session) or {})}
                chosen = chosen_loras.take(session)
                records, notes = queue_submission(service, fields, names, gate.upload, lambda: chosen, loras)
            except (ValueError, OSError) as exc:
                return _error(public_text(one_line(exc), outputs)), gr.skip()
            return submitted_text(service, records, notes), records[0].id

        def on_cancel(job: Any, seen: dict[str, Any]) -> tuple[str, Any]:
            try:
                number = job_number(job if job is not None else seen.get("follow"))
                answer = service.cancel(number)
            except ValueError as exc:
                return _error(str(exc)), gr.skip()
            return answer, number if "cancelling" in answer else gr.skip()

        def on_resume(job: Any, seen: dict[str, Any]) -> str:
            try:
                return service.resume(job_number(job if job is not None else seen.get("follow")))
            except ValueError as exc:
                return _error(str(exc))

        def on_length(value: Any) -> str:
            return length_note(value)

        def on_plan(*values: Any) -> str:
            fields = dict(zip(PLAN_FIELDS, values))
            devices = service.devices()
            sizes = any(plans_memory(device) for device in devices)  # only a GPU's plan sizes the model
            try:
                settings = plan_settings(fields, names)
                preserve_value = preserve_gb(fields["preserve_gb"])
                # never beside a load (ui.memory says why); a page does not wait minutes for a 13B load
                if sizes and not service.loading.acquire(timeout=PLAN_WAIT_S):
                    return BUSY
                try:
                    text = plan_panel(settings, devices, preserve_value, shown_name.get(settings.model, "model"))
                finally:
                    if sizes:
                        service.loading.release()
            except ValueError as exc:  # the NoPlanError of a GPU is part of the panel; this is the form's
                return _error(public_text(one_line(exc), outputs))
            return public_text(text, outputs)

        def on_model(name: Any) -> tuple[Any, Any, Any]:
            # a model's own CFG, guidance and steps (a few-step student is made for its few steps)
            try:
                if name in names:
                    return (*field_updates(names[name]), gr.update(value=model_steps(names[name])))
            except ValueError:
                pass
            return gr.skip(), gr.skip(), gr.skip()

        def on_poll(job: Any, seen: dict[str, Any], stopping: Any) -> tuple[Any, ...]:
            # only submit writes `watched`; a page that submitted nothing follows the first running job
            # (remembered in `shown`, so that a poll in flight never overwrites a submission)
            if job is None:
                job = service.running() or seen.get("follow")
            try:
                view = service.view(job) if job is not None else None
            except ValueError:  # the job is gone from the store (another outputs directory)
                job, view = None, None
            now: dict[str, Any] = dict(seen, follow=job)

            def changed(key: str, value: Any) -> bool:
                if seen.get(key) == value:
                    return False
                now[key] = value
                return True

            line = job_line(view, outputs) if view else "No job yet: upload a start image, type a prompt, press Generate."
            info_update = line if changed("info", line) else gr.skip()
            bar_html = progress_bar(view)
            bar_update = bar_html if changed("bar", bar_html) else gr.skip()
            p = view.progress if view else None
            sampling = p is not None and p.phase == "sampling" and p.preview is not None
            preview_key = (job, p.preview_version if sampling else None)
            preview_update: Any = gr.skip()
            if changed("preview", preview_key):
                # the preview and its label belong to the running section only: cleared when it ends
                preview_update = (gr.update(value=p.preview, label=LIVE_PREVIEW) if sampling
                                  else gr.update(value=None, label=IDLE_PREVIEW))
            clip: Path | None = None
            status = view.record.status if view else None
            if view and status == "done" and view.record.out.is_file():
                clip = view.record.out
            elif p is not None and p.video is not None and p.video.is_file():
                clip = p.video
            video_key = (job, status, p.video_version if p else None, clip is not None)
            video_update: Any = gr.skip()
            if changed("video", video_key):
                # another job's video never stays under this one: no clip of its own clears the player
                label = "Video" if status == "done" or clip is None else "Video (provisional: the sections so far)"
                try:
                    value = gate.publish(video, clip) if clip is not None else None
                except ValueError:
                    value = None
                video_update = gr.update(value=value, label=label)
            rows = queue_rows(service)
            queue_update = _table(rows, QUEUE_HEADERS) if changed("queue", rows) else gr.skip()
            past = history_rows(service.history(), outputs)
            history_update = _table(past, HISTORY_HEADERS) if changed("history", past) else gr.skip()
            note_update, stopping_update = gr.skip(), gr.skip()
            if stopping is not None:  # the "cancelling" note stays until that job has stopped
                try:
                    stopped = service.view(stopping).record
                except ValueError:
                    stopped = None
                if stopped is None or stopped.status != "running":
                    note_update = f"Job {stopping} {stopped.status if stopped else 'is gone'}."
                    stopping_update = None
            return (info_update, bar_update, preview_update, video_update, queue_update, history_update, now,
                    note_update, stopping_update)

        def on_history() -> dict[str, Any]:
            return _table(history_rows(service.history(), outputs), HISTORY_HEADERS)

        def on_pick(evt: gr.SelectData) -> Any:
            row = evt.row_value
            return str(row[0]) if row else gr.skip()

        def on_show(job: Any) -> tuple[Any, Any, str]:
            try:
                record = service.view(job_number(job)).record
            except ValueError as exc:
                return None, None, _error(str(exc))
            clip = None
            if record.status == "done" and gate.made_here(record.out):
                clip = gate.publish(history_video, record.out)
            error = f" ({public_text(record.error, outputs)})" if record.error else ""
            return clip, public_settings(record.settings, outputs), f"Job {record.id}: {record.status}{error}"

        def on_redo(job: Any, section: Any, new_seed: Any, new_prompt: Any) -> str:
            try:
                request = redo_request(job, section, new_seed, new_prompt)
                record = queue_redo(service, request)
            except ValueError as exc:
                return _error(public_text(one_line(exc), outputs))
            return (f"Job {record.id} queued: job {request.job} with section {request.section} "
                    "made again (the sections not depending on it kept).")

        def fill_form(settings: Mapping[str, Any], source: str, record: JobRecord | None = None) -> tuple[Any, ...]:
            """Form values from settings; images only from a job of ours (``record``), never from an mp4."""
            values = form_from_settings(settings)
            notes = []
            if record is not None:
                for name, block in (("image", start), ("end_image", end)):
                    if (served := own_file(record, record.settings.get(name), block)) is not None:
                        values[name] = served
                values["keyframe_images"], values["keyframe_times"] = own_keyframes(record, keyframe_images)
            if values["image"] is None and (record is None or record.settings.get("image") is not None):
                notes.append("its start image is not kept: upload one" if record is None
                             else "its start image is gone: upload one")
            model_name = shown_name.get(values["model"]) or (values["model"] if values["model"] in names else None)
            if model_name is None:
                notes.append(f"model {Path(str(values['model'])).name!r} is not served here: kept the chosen one")
                values["model"] = gr.skip()
                values["cfg"] = gr.skip() if values["cfg"] is None else values["cfg"]
            else:
                values["model"] = model_name
                values["cfg"], values["distilled_guidance"] = field_updates(
                    names[model_name], values["cfg"], values["distilled_guidance"])
            for name in ("image", "end_image"):
                if values[name] is None and not (name == "image" and record is not None
                                                 and record.settings.get("image") is None):
                    values[name] = gr.skip() if name == "image" else None
            values["preserve_gb"] = gr.skip()  # this machine's GPU memory, not the video's: kept as it is
            note = f"Settings of {source} are in the Generate tab" + (f"; {'; '.join(notes)}." if notes else ".")
            lora_value = [loras_text(settings.get("loras"))] if lora_box is not None else []
            return (*[values[name] for name in (*FORM_FIELDS, *EXTRA_FIELDS)], *lora_value, note)

        def own_file(record: JobRecord, path: Any, block: Any) -> str | None:
            """A served copy of a file a job of ours recorded (relative paths are the job's), while it is there."""
            if not isinstance(path, str):
                return None
            where = Path(path) if Path(path).is_absolute() else record.job_dir / path
            return gate.publish(block, where) if gate.made_here(where) else None

        def own_keyframes(record: JobRecord, block: Any) -> tuple[list[str] | None, str]:
            """A job's keyframe images (served copies, while they are there) and their times."""
            images, times = [], []
            for k in record.settings.get("keyframes") or []:
                served = own_file(record, k.get("image"), block) if isinstance(k, dict) else None
                if served is not None:
                    images.append(served)
                    times.append(f"{k.get('seconds'):g}")
            return (images or None), ", ".join(times)

        def on_use(job: Any) -> tuple[Any, ...]:
            try:
                record = service.view(job_number(job)).record
            except ValueError as exc:
                return (*[gr.skip()] * len(filled), _error(str(exc)))
            return fill_form(record.settings, f"job {record.id}", record)

        def on_use_mp4(upload: Any) -> tuple[Any, ...]:
            try:
                path = gate.upload("video", upload)
                if path is None:
                    raise ValueError("upload a framepack mp4 first")
                name = Path(path).name
                try:
                    meta = read_metadata(path)
                except ValueError as exc:  # the reason names the upload by its name, not where it lies
                    raise ValueError(str(exc).replace(path, name)) from None
            except ValueError as exc:
                return (*[gr.skip()] * len(filled), _error(public_text(str(exc), outputs)))
            return fill_form(meta["framepack"], name)

        # ---- wiring ---------------------------------------------------------------------------------------------

        raw: dict[str, Any] = dict(private, preprocess=False)  # raw values: a broken payload reaches our checks
        # the Batch and LoRA fields are handed over first, in the same click (on_loras says why)
        submission = generate.click(checked(on_batch), [count, prompts_box], None, show_progress="hidden", **raw)
        submission = submission.then(checked(on_extras), extras, None, show_progress="hidden", **raw)
        if lora_box is not None:
            submission = submission.then(checked(on_loras), lora_box, None, show_progress="hidden", **raw)
        submission.then(checked(on_submit), form, [message, watched], show_progress="minimal", **raw)
        if lora_box is not None:
            lora_add.input(checked(on_add_lora), [lora_add, lora_box], lora_box, show_progress="hidden", **raw)
            app.load(checked(on_lora_files), None, [lora_list, lora_add], show_progress="hidden", **private)
        cancel.click(checked(on_cancel), [watched, shown], [message, cancelling], show_progress="hidden", **raw)
        resume.click(checked(on_resume), [watched, shown], message, show_progress="hidden", **raw)
        seconds.change(checked(on_length), seconds, length, show_progress="hidden", queue=False, **raw)
        model.input(checked(on_model), model, [cfg, guidance, steps], show_progress="hidden", **raw)
        plan_inputs = [by_name[name] for name in PLAN_FIELDS]
        gr.on([app.load, *(block.change for block in plan_inputs)], checked(on_plan), plan_inputs, plan_view,
              trigger_mode="always_last", show_progress="hidden", **raw)
        timer = gr.Timer(poll_s)
        timer.tick(checked(on_poll), [watched, shown, cancelling],
                   [info, bar, preview, video, queue_table, history_table, shown, message, cancelling],
                   show_progress="hidden", concurrency_limit=None, **raw)
        refresh.click(checked(on_history), None, history_table, **private)
        history_table.select(checked(on_pick), None, picked, **private)
        show.click(checked(on_show), picked, [history_video, history_settings, history_message], **raw)
        use.click(checked(on_use), picked, [*filled, history_message], **raw)
        redo.click(checked(on_redo), [picked, redo_section, redo_seed, redo_prompt], history_message, **raw)
        use_mp4.click(checked(on_use_mp4), mp4, [*filled, history_message], **raw)

        _api(service, names, defaults, gate, video, loras, chosen_loras)
    return app


def _api(service: JobService, names: dict[str, str], defaults: FormDefaults, gate: FileGate, cache: Any,
         folder: LoraFolder | None = None, chosen_loras: PendingLoras | None = None) -> None:
    """Named endpoints for gradio_client. Each reads its arguments through the parsers of .form (files
    through ``gate``) and answers bad ones with a gr.Error carrying the one-line reason."""
    checked = endpoint(service.outputs)
    first = next(iter(names))

    def public(view: JobView) -> dict:
        return view.to_dict(service.outputs)

    chosen_loras = chosen_loras or PendingLoras()

    def submit(request: gr.Request, image: gr.FileData | None = None, prompt: str = "", end_image: gr.FileData | None = None, negative_prompt: str = "",
               seconds: float = defaults.seconds, seed: int = defaults.seed, random_seed: bool = False,
               steps: int = defaults.steps, distilled_guidance: float = defaults.distilled_guidance,
               cfg: float | None = defaults.cfg, sampler: str = defaults.sampler, mode: str = defaults.mode,
               model: str = first, resolution: str = defaults.resolution, crf: int = defaults.crf,
               preserve: float = defaults.preserve_gb, cache: str = defaults.cache, loras: str = "",
               count: int = 1, prompts: str = "", keyframe_images: list[gr.FileData] | None = None,
               keyframe_times: str = "", color_match: bool = False) -> dict:
        """Queue a job; returns its status (job id, seed used, place in the queue). ``preserve``: GB
        of GPU memory the job's memory plan leaves free (CUDA workers); ``cache``: the step cache
        (none, model, teacache:0.15, ...: docs/caching.md); ``loras``: files of /loras by name with
        weights, "a.safetensors:0.8, b.safetensors" (empty: those this session chose last with
        /choose_loras, else none). A batch, each job queued on its own: ``count`` jobs with seeds
        S, S+1, ... and/or ``prompts``, one job per line (a prompt, or a JSON object of settings).
        The answer is the first job's status, with ``jobs`` (every job's id) and ``notes`` (where
        the jobs leave the model's world, e.g. words it never learned). No ``image``: text-to-video.
        ``keyframe_images`` (uploads) with ``keyframe_times`` ("1.2, 2.4": one per image, in order):
        images the video passes through (inverted mode). ``color_match``: colour drift correction
        (true: lab; or "lab", "histogram")."""
        form = dict(image=image, prompt=prompt, end_image=end_image, negative_prompt=negative_prompt,
                    seconds=seconds, seed=seed, random_seed=random_seed, steps=steps,
                    distilled_guidance=distilled_guidance, cfg=cfg, sampler=sampler, mode=mode, model=model,
                    resolution=resolution, crf=crf, cache=cache, preserve_gb=preserve, count=count, prompts=prompts,
                    keyframe_images=keyframe_images, keyframe_times=keyframe_times, color_match=color_match)
        def chosen() -> Any:  # the session's choice is used up once the jobs pass, even when loras= is given
            pending = chosen_loras.take(getattr(request, "session_hash", None))
            return loras if loras else pending

        records, notes = queue_submission(service, form, names, gate.upload, chosen, folder)
        return {**public(service.view(records[0].id)), "jobs": [r.id for r in records], "notes": notes}

    def lora_files() -> list:
        """The LoRA files this server offers (names for /choose_loras); empty without --lora-dir."""
        return [] if folder is None else folder.names()

    def choose_loras(loras: str, request: gr.Request) -> list:
        """LoRAs for this session's next /submit (gradio_client keeps one session per Client): files
        of /loras by name with weights, "a.safetensors:0.8, b.safetensors" (weight 1 when left out),
        or a list of [name, weight]. Checked now; returns the choice as the job will record it."""
        chosen = loras_from_form(loras, folder)
        chosen_loras.put(getattr(request, "session_hash", None), loras)
        return public_loras(chosen)

    def status(job: int) -> dict:
        """A job's status, settings and, while it runs, section/step/ETA; 'video' is set once done."""
        return public(service.view(job_number(job)))

    def cancel(job: int) -> str:
        """Cancel a queued job, or stop a running one within a step (it stays resumable)."""
        return service.cancel(job_number(job))

    def resume(job: int) -> str:
        """Queue a cancelled or failed job again; it continues from its last finished section."""
        return service.resume(job_number(job))

    def video(job: int) -> gr.FileData:
        """The finished video of a done job (gradio_client downloads it and returns a local path)."""
        record = service.view(job_number(job)).record
        if record.status != "done" or not gate.made_here(record.out):
            raise ValueError(f"job {record.id} is {record.status}: no video yet")
        return gr.FileData(path=gate.publish(cache, record.out), orig_name=record.out.name)

    def redo(job: int, section: int, seed: int | None = None, prompt: str = "") -> dict:
        """Queue a new job: finished job ``job`` with section ``section`` (1 = the first in the video)
        made again, with ``seed`` / ``prompt`` if given; the sections not depending on it are kept."""
        return public(service.view(queue_redo(service, redo_request(job, section, seed, prompt)).id))

    def history(limit: int = 50) -> list:
        """Finished jobs (done, failed, cancelled), newest first; at most ``limit`` (1 to 1000)."""
        return [public(service.view(r.id)) for r in service.history(history_limit(limit))]

    def queue() -> list:
        """The running jobs (one per busy worker), then the queued ones in order."""
        return [public(service.view(r.id)) for r in service.queue()]

    for fn in (submit, status, cancel, resume, video, history, queue, redo):
        gr.api(checked(fn), api_name=fn.__name__, concurrency_limit=None)
    gr.api(checked(lora_files), api_name="loras", concurrency_limit=None)
    gr.api(checked(choose_loras), api_name="choose_loras", concurrency_limit=None)


# ---- launching -----------------------------------------------------------------------------------------------


def file_inputs(app: gr.Blocks) -> dict[int, list[int]]:
    """For each of the page's handlers (by fn_index), the positions of its file inputs."""
    kinds = (gr.Image, gr.File, gr.Video)
    return {index: [i for i, block in enumerate(fn.inputs) if isinstance(block, kinds)]
            for index, fn in app.fns.items() if any(isinstance(block, kinds) for block in fn.inputs)}


def arities(app: gr.Blocks) -> dict[int | str, int]:
    """How many values each handler takes, by fn_index and by API name."""
    by_index: dict[int | str, int] = {index: len(fn.inputs) for index, fn in app.fns.items()}
    by_name = {fn.api_name: len(fn.inputs) for fn in app.fns.values() if isinstance(fn.api_name, str)}
    return {**by_index, **by_name}


def theme() -> gr.themes.Base:
    """The default look with system fonts: the page makes no request outside this server."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(service: JobService, models: Sequence[str], host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, share: bool = False, max_file_size: str = "50mb",
           poll_s: float = POLL_S, loras: LoraFolder | None = None) -> None:
    """Serve until interrupted; the running job is then put back in the queue (it resumes next start)."""
    gate = FileGate(service.outputs, lambda: app.upload_file_set)
    app = build_app(service, models, poll_s=poll_s, gate=gate, loras=loras)
    app.queue(default_concurrency_limit=4)
    extra: dict[str, Any] = {}
    if "_frontend" in inspect.signature(app.launch).parameters:
        # Gradio's start-up self-check gives up after one 3 s request for the page; on a busy CPU
        # the first render takes longer and the app would refuse to start
        extra["_frontend"] = False
    try:
        # outputs/ is never served as it is (it holds the job store and the job directories): the
        # app copies each video it shows into Gradio's cache (FileGate.publish) and serves that copy
        # a request naming a file that is not an upload is refused before Gradio copies that file
        guard = Middleware(FileReferenceGuard, gate=gate, file_slots=file_inputs(app), arity=arities(app))
        # show_error: what Gradio itself refuses (too few arguments) is answered with its reason, not
        # with "the upstream app has raised an exception"; our own handlers only raise gr.Error
        app.launch(server_name=host, server_port=port, auth=auth, share=share, blocked_paths=[str(service.outputs)],
                   max_file_size=max_file_size, theme=theme(), css=CSS, prevent_thread_lock=True, quiet=True,
                   app_kwargs={"middleware": [guard]}, show_error=True, **extra)
        log.warning("framepack ui: serving on %s (outputs in %s)", app.local_url, service.outputs)
        # the worker starts once the server is up: a job left over from the last run then loads
        # its model (and imports its libraries) without racing Gradio's own start-up imports
        service.start()
        app.block_thread()
    finally:
        service.stop(timeout=60)
        app.close()
