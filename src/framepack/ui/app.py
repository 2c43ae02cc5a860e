"""The Gradio web app: a form, a live view of the running job, a queue and a history.

Every page polls (``gr.Timer``) one cheap snapshot of the worker instead of holding a generator
open, so a closed tab, a second user or a server restart never disturbs a job. The same back end
is exposed as named API endpoints (``/submit``, ``/status``, ``/cancel``, ``/resume``,
``/video``, ``/history``, ``/queue``) for ``gradio_client``.
"""

from __future__ import annotations

import html
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from ..sampling import SAMPLERS
from ..settings import MAX_SECONDS
from ..video import read_metadata
from .form import AUTO, MODES, RESOLUTIONS, FormDefaults, file_path, form_from_settings, settings_from_form
from .service import JobService, JobView
from .store import JobRecord

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a page asks for progress
PROMPT_CHARS = 60  # prompt shown in tables
FORM_FIELDS: tuple[str, ...] = ("image", "end_image", "prompt", "negative_prompt", "seconds", "seed", "random_seed",
                                "steps", "distilled_guidance", "cfg", "sampler", "mode", "model", "resolution", "crf")
QUEUE_HEADERS = ["job", "status", "place", "prompt", "seconds", "seed"]
HISTORY_HEADERS = ["job", "status", "finished", "prompt", "seconds", "seed", "steps", "model", "video / error"]
CSS = """
#fp-progress progress { width: 100%; height: 1.2em; }
#fp-message p, #fp-history-message p { margin: 0; }
.fp-error { color: #b91c1c; font-weight: 600; }
"""


# ---- small views ---------------------------------------------------------------------------------------------


def _short(text: str, limit: int = PROMPT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _error(message: str) -> str:
    return f'<span class="fp-error">⚠ {html.escape(message)}</span>'


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA …"
    seconds = round(seconds)
    return f"ETA {seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"ETA {seconds} s"


def job_line(view: JobView) -> str:
    r = view.record
    parts = [f"**Job {r.id}**", r.status, f"seed {r.seed}"]
    if view.queue_place is not None:
        parts.append(f"place {view.queue_place} in the queue")
    if r.status == "done":
        parts.append(f"video: `{r.out.name}`")
    if r.status == "cancelled":
        parts.append("resumable: press Resume")
    line = " · ".join(parts)
    return line + ("\n\n" + _error(r.error) if r.error else "")


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
        rows.append([r.id, r.status, place, prompt, r.settings.get("seconds"), r.seed])
    return rows


def history_rows(records: Sequence[JobRecord]) -> list[list[Any]]:
    return [[r.id, r.status, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated)),
             _short(str(r.settings.get("prompt", ""))), r.settings.get("seconds"), r.seed, r.settings.get("steps"),
             Path(str(r.settings.get("model", ""))).name, r.out.name if r.status == "done" else (r.error or "")]
            for r in records]


def _table(rows: list[list[Any]], headers: list[str]) -> dict[str, Any]:
    return {"data": rows, "headers": headers}


def _job_id(value: Any) -> int:
    if value is None or value == "":
        raise ValueError("no job selected: submit one or pick one in the history")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"not a job number: {value!r}") from None
    if number != int(number):
        raise ValueError(f"not a job number: {value!r}")
    return int(number)


# ---- the app ---------------------------------------------------------------------------------------------------


def _default_cfg(defaults: FormDefaults, model: str) -> float:
    """What the CFG field shows on a fresh page: the default model's own scale (a Number field
    cannot stay empty: Gradio shows and submits 0, unconditional generation)."""
    from ..components import resolve_model

    return defaults.cfg if defaults.cfg is not None else resolve_model(model).cfg(None)


def build_app(service: JobService, models: Sequence[str], defaults: FormDefaults = FormDefaults(),
              poll_s: float = POLL_S) -> gr.Blocks:
    """The page and its API; ``service`` must be started by the caller (see :func:`launch`)."""
    models = tuple(models)
    if not models:
        raise ValueError("the app needs at least one model")

    with gr.Blocks(title="FramePack", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        watched = gr.State(None)  # the job this page follows
        shown = gr.State({})  # what the page shows now, so a poll only sends what changed
        gr.Markdown("## FramePack\nA start image and a prompt in, a video out, section by section. "
                    "Jobs wait in a queue that survives restarts.")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        start = gr.Image(label="Start image", type="filepath", sources=["upload", "clipboard"],
                                         height=240, elem_id="fp-start")
                        end = gr.Image(label="End image (optional)", type="filepath", sources=["upload", "clipboard"],
                                       height=240, elem_id="fp-end")
                    prompt = gr.Textbox(label="Prompt", lines=3, value=defaults.prompt, elem_id="fp-prompt",
                                        placeholder="a prompt, or a timeline: "
                                                    "[0s-2s: a cat sits] [2s-5s: the cat jumps]")
                    seconds = gr.Slider(1, MAX_SECONDS, value=defaults.seconds, step=0.1, label="Length (seconds)",
                                        elem_id="fp-seconds")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=defaults.seed, precision=0, elem_id="fp-seed")
                        random_seed = gr.Checkbox(label="Random seed (the one used is shown with the job)",
                                                  value=defaults.random_seed, elem_id="fp-random-seed")
                    with gr.Accordion("Advanced", open=False, elem_id="fp-advanced"):
                        model = gr.Dropdown(list(models), value=models[0], label="Model", elem_id="fp-model")
                        negative = gr.Textbox(label="Negative prompt (used when CFG > 1)",
                                              value=defaults.negative_prompt, elem_id="fp-negative")
                        with gr.Row():
                            steps = gr.Number(label="Steps per section", value=defaults.steps, precision=0,
                                              elem_id="fp-steps")
                            sampler = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label="Sampler",
                                                  elem_id="fp-sampler")
                        with gr.Row():
                            guidance = gr.Number(label="Distilled guidance", value=defaults.distilled_guidance,
                                                 elem_id="fp-guidance")
                            cfg = gr.Number(label="CFG (1 = off)", value=_default_cfg(defaults, models[0]),
                                            elem_id="fp-cfg")
                        with gr.Row():
                            mode = gr.Dropdown([("model's own", AUTO)] + [(m, m) for m in MODES if m != AUTO],
                                               value=defaults.mode, label="Mode", elem_id="fp-mode")
                            resolution = gr.Dropdown([("model's own", AUTO)] + [(str(r), str(r)) for r in RESOLUTIONS],
                                                     value=defaults.resolution, label="Resolution",
                                                     elem_id="fp-resolution")
                        crf = gr.Slider(0, 51, value=defaults.crf, step=1, elem_id="fp-crf",
                                        label="MP4 quality (CRF: 0 lossless, lower is better)")
                    with gr.Row():
                        generate = gr.Button("Generate", variant="primary", elem_id="fp-generate")
                        cancel = gr.Button("Cancel", variant="stop", elem_id="fp-cancel")
                        resume = gr.Button("Resume", elem_id="fp-resume")
                    message = gr.Markdown(elem_id="fp-message")
                with gr.Column(scale=1):
                    info = gr.Markdown("No job yet.", elem_id="fp-job")
                    bar = gr.HTML(progress_bar(None), elem_id="fp-progress")
                    preview = gr.Image(label="Section being denoised", interactive=False, format="png",
                                       height=120, elem_id="fp-preview")
                    video = gr.Video(label="Video (provisional until the job is done)", interactive=False,
                                     height=360, elem_id="fp-video")
                    queue_table = gr.Dataframe(_table([], QUEUE_HEADERS), label="Queue", interactive=False,
                                               elem_id="fp-queue")
        with gr.Tab("History", elem_id="fp-history-tab"):
            history_table = gr.Dataframe(_table([], HISTORY_HEADERS), label="Finished jobs (click a row)",
                                         interactive=False, elem_id="fp-history")
            with gr.Row():
                picked = gr.Number(label="Job", precision=0, elem_id="fp-history-job")
                show = gr.Button("Show", elem_id="fp-history-show")
                use = gr.Button("Use these settings", elem_id="fp-use-settings")
                refresh = gr.Button("Refresh", elem_id="fp-history-refresh")
            history_message = gr.Markdown(elem_id="fp-history-message")
            with gr.Row():
                history_video = gr.Video(label="Video", interactive=False, elem_id="fp-history-video")
                history_settings = gr.JSON(label="Settings", elem_id="fp-history-settings")
            with gr.Row():
                mp4 = gr.File(label="…or take the settings from a framepack mp4", elem_id="fp-mp4")
                use_mp4 = gr.Button("Use settings from this video", elem_id="fp-use-mp4")

        by_name = {"image": start, "end_image": end, "prompt": prompt, "negative_prompt": negative, "seconds": seconds,
                   "seed": seed, "random_seed": random_seed, "steps": steps, "distilled_guidance": guidance,
                   "cfg": cfg, "sampler": sampler, "mode": mode, "model": model, "resolution": resolution, "crf": crf}
        form = [by_name[name] for name in FORM_FIELDS]
        private: dict[str, Any] = {"api_visibility": "private"}

        # ---- handlers -----------------------------------------------------------------------------------------

        def on_submit(*values: Any) -> tuple[str, Any]:
            try:
                settings = settings_from_form(dict(zip(FORM_FIELDS, values)), models)
                record = service.submit(settings)
            except (ValueError, OSError) as exc:
                return _error(str(exc)), gr.skip()
            place = service.store.queue_place(record.id)
            where = f"place {place} in the queue" if place else "starting"
            return f"Job {record.id} submitted (seed {record.seed}, {where}).", record.id

        def on_cancel(job: Any, seen: dict[str, Any]) -> str:
            try:
                return service.cancel(_job_id(job if job is not None else seen.get("follow")))
            except ValueError as exc:
                return _error(str(exc))

        def on_resume(job: Any, seen: dict[str, Any]) -> str:
            try:
                return service.resume(_job_id(job if job is not None else seen.get("follow")))
            except ValueError as exc:
                return _error(str(exc))

        def on_poll(job: Any, seen: dict[str, Any]) -> tuple[Any, ...]:
            # only submit writes `watched`; a page that submitted nothing follows the running job
            # (remembered in `shown`, so that a poll in flight never overwrites a submission)
            if job is None:
                job = service.running() or seen.get("follow")
            try:
                view = service.view(job) if job is not None else None
            except ValueError:  # the job is gone from the store (another outputs directory)
                job, view = None, None
            now: dict[str, Any] = dict(seen, follow=job)
            updates: dict[str, Any] = {}

            def changed(key: str, value: Any) -> bool:
                if seen.get(key) == value:
                    return False
                now[key] = value
                return True

            line = job_line(view) if view else "No job yet: upload a start image, type a prompt, press Generate."
            updates["info"] = line if changed("info", line) else gr.skip()
            bar_html = progress_bar(view)
            updates["bar"] = bar_html if changed("bar", bar_html) else gr.skip()
            p = view.progress if view else None
            preview_key = (job, p.preview_version) if p is not None and p.preview is not None else (job, None)
            if changed("preview", preview_key):
                updates["preview"] = p.preview if preview_key[1] is not None else gr.skip()
            else:
                updates["preview"] = gr.skip()
            clip: Path | None = None
            if view and view.record.status == "done" and view.record.out.is_file():
                clip = view.record.out
            elif p is not None and p.video is not None and p.video.is_file():
                clip = p.video
            video_key = (job, view.record.status if view else None, p.video_version if p else None)
            if clip is not None and changed("video", video_key):
                updates["video"] = str(clip)
            else:
                updates["video"] = gr.skip()
            rows = queue_rows(service)
            updates["queue"] = _table(rows, QUEUE_HEADERS) if changed("queue", rows) else gr.skip()
            past = history_rows(service.history())
            updates["history"] = _table(past, HISTORY_HEADERS) if changed("history", past) else gr.skip()
            return (updates["info"], updates["bar"], updates["preview"], updates["video"], updates["queue"],
                    updates["history"], now)

        def on_history() -> dict[str, Any]:
            return _table(history_rows(service.history()), HISTORY_HEADERS)

        def on_pick(evt: gr.SelectData) -> Any:
            row = evt.row_value
            return row[0] if row else gr.skip()

        def on_show(job: Any) -> tuple[Any, Any, str]:
            try:
                record = service.view(_job_id(job)).record
            except ValueError as exc:
                return None, None, _error(str(exc))
            clip = str(record.out) if record.status == "done" and record.out.is_file() else None
            note = f"Job {record.id}: {record.status}" + (f" ({record.error})" if record.error else "")
            return clip, record.settings, note

        def fill_form(settings: dict[str, Any], source: str) -> tuple[Any, ...]:
            values = form_from_settings(settings)
            notes = []
            if values["image"] is None:
                notes.append("its start image is gone: upload one")
            if values["model"] not in models:
                notes.append(f"model {values['model']!r} is not served here: kept {models[0]!r}")
                values["model"] = gr.skip()
            for name in ("image", "end_image"):
                if values[name] is None:
                    values[name] = gr.skip() if name == "image" else None
            note = f"Settings of {source} are in the Generate tab" + (f"; {'; '.join(notes)}." if notes else ".")
            return (*[values[name] for name in FORM_FIELDS], note)

        def on_use(job: Any) -> tuple[Any, ...]:
            try:
                record = service.view(_job_id(job)).record
            except ValueError as exc:
                return (*[gr.skip()] * len(FORM_FIELDS), _error(str(exc)))
            return fill_form(record.settings, f"job {record.id}")

        def on_use_mp4(upload: Any) -> tuple[Any, ...]:
            path = file_path(upload)
            try:
                if path is None:
                    raise ValueError("upload a framepack mp4 first")
                meta = read_metadata(path)
                if not isinstance(meta, dict) or not isinstance(meta.get("framepack"), dict):
                    raise ValueError(f"{Path(path).name} carries no framepack settings")
            except ValueError as exc:
                reason = str(exc).replace(str(path), Path(str(path)).name)  # no server paths on the page
                return (*[gr.skip()] * len(FORM_FIELDS), _error(reason))
            return fill_form(meta["framepack"], Path(path).name)

        # ---- wiring ---------------------------------------------------------------------------------------------

        # raw values (preprocess=False): a broken upload reaches our checks and gets an inline message
        generate.click(on_submit, form, [message, watched], preprocess=False, show_progress="minimal", **private)
        cancel.click(on_cancel, [watched, shown], message, show_progress="hidden", **private)
        resume.click(on_resume, [watched, shown], message, show_progress="hidden", **private)
        timer = gr.Timer(poll_s)
        timer.tick(on_poll, [watched, shown], [info, bar, preview, video, queue_table, history_table, shown],
                   show_progress="hidden", concurrency_limit=None, **private)
        refresh.click(on_history, None, history_table, **private)
        history_table.select(on_pick, None, picked, **private)
        show.click(on_show, picked, [history_video, history_settings, history_message], **private)
        use.click(on_use, picked, [*form, history_message], **private)
        use_mp4.click(on_use_mp4, mp4, [*form, history_message], preprocess=False, **private)

        _api(service, models, defaults)
    return app


def _api(service: JobService, models: tuple[str, ...], defaults: FormDefaults) -> None:
    """Named endpoints for gradio_client; errors come back as gr.Error with the one-line reason."""

    def submit(image: gr.FileData, prompt: str, end_image: gr.FileData | None = None, negative_prompt: str = "",
               seconds: float = defaults.seconds, seed: int = defaults.seed, random_seed: bool = False,
               steps: int = defaults.steps, distilled_guidance: float = defaults.distilled_guidance,
               cfg: float | None = defaults.cfg, sampler: str = defaults.sampler, mode: str = defaults.mode,
               model: str = models[0], resolution: str = defaults.resolution, crf: int = defaults.crf) -> dict:
        """Queue a job; returns its status (job id, seed used, place in the queue)."""
        form = dict(image=image, prompt=prompt, end_image=end_image, negative_prompt=negative_prompt,
                    seconds=seconds, seed=seed, random_seed=random_seed, steps=steps,
                    distilled_guidance=distilled_guidance, cfg=cfg, sampler=sampler, mode=mode, model=model,
                    resolution=resolution, crf=crf)
        try:
            record = service.submit(settings_from_form(form, models))
        except (ValueError, OSError) as exc:
            raise gr.Error(str(exc)) from None
        return service.view(record.id).to_dict()

    def status(job: int) -> dict:
        """A job's status, settings and, while it runs, section/step/ETA; 'video' is set once done."""
        try:
            return service.view(_job_id(job)).to_dict()
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def cancel(job: int) -> str:
        """Cancel a queued job, or stop a running one within a step (it stays resumable)."""
        try:
            return service.cancel(_job_id(job))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def resume(job: int) -> str:
        """Queue a cancelled or failed job again; it continues from its last finished section."""
        try:
            return service.resume(_job_id(job))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def video(job: int) -> gr.FileData:
        """The finished video of a done job (gradio_client downloads it and returns a local path)."""
        try:
            record = service.view(_job_id(job)).record
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        if record.status != "done" or not record.out.is_file():
            raise gr.Error(f"job {record.id} is {record.status}: no video yet")
        return gr.FileData(path=str(record.out), orig_name=record.out.name)

    def history(limit: int = 50) -> list:
        """Finished jobs (done, failed, cancelled), newest first."""
        return [service.view(r.id).to_dict() for r in service.history(max(1, min(int(limit), 1000)))]

    def queue() -> list:
        """The running job, then the queued ones in order."""
        return [service.view(r.id).to_dict() for r in service.queue()]

    for fn in (submit, status, cancel, resume, video, history, queue):
        gr.api(fn, api_name=fn.__name__, concurrency_limit=None)


# ---- launching -----------------------------------------------------------------------------------------------


def theme() -> gr.themes.Base:
    """The default look with system fonts: the page makes no request outside this server."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def launch(service: JobService, models: Sequence[str], host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, share: bool = False, max_file_size: str = "50mb",
           poll_s: float = POLL_S) -> None:
    """Serve until interrupted; the running job is then put back in the queue (it resumes next start)."""
    app = build_app(service, models, poll_s=poll_s)
    app.queue(default_concurrency_limit=4)
    extra: dict[str, Any] = {}
    if "_frontend" in inspect.signature(app.launch).parameters:
        # Gradio's start-up self-check gives up after one 3 s request for the page; on a busy CPU
        # the first render takes longer and the app would refuse to start
        extra["_frontend"] = False
    try:
        app.launch(server_name=host, server_port=port, auth=auth, share=share, allowed_paths=[str(service.outputs)],
                   max_file_size=max_file_size, theme=theme(), css=CSS, prevent_thread_lock=True, quiet=True,
                   **extra)
        log.warning("framepack ui: serving on %s (outputs in %s)", app.local_url, service.outputs)
        # the worker starts once the server is up: a job left over from the last run then loads
        # its model (and imports its libraries) without racing Gradio's own start-up imports
        service.start()
        app.block_thread()
    finally:
        service.stop(timeout=60)
        app.close()
