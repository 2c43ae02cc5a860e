"""The ``framepack`` command line. Thin: parses arguments, calls the library, reports progress.

Every user error ends as one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

EXIT_USAGE = 2
EXIT_SIGNAL_BASE = 128  # a run stopped by signal N exits 128 + N: 130 for Ctrl-C, 143 for SIGTERM


# ---- argument types --------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _gigabytes(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 GB, got {text}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if math.isnan(value) or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# ---- messages -----------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"framepack: {message}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    _say(f"warning: {message}")


class _LogFormat(logging.Formatter):
    """INFO lines as they are; warnings and errors (ours and the library's) marked as such."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"framepack: {record.levelname.lower()}: {message}"


# ---- stopping: Ctrl-C and SIGTERM -------------------------------------------------------------------------


class _Interrupted(BaseException):
    """A stop by signal (BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, signum: int, job: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.job = signum, job


def _raise_interrupted(signum: int, frame) -> None:
    raise _Interrupted(signum)


class _StopRequest:
    """Set by the first SIGINT/SIGTERM during a run; the pipeline polls it after every step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """While a job runs, a signal asks the run thread to stop after the current step (the job stays
    consistent and the thread ends before we exit: exiting with it alive aborts the process in
    torch's threads); a second one stops at once (every committed section is already on disk)."""
    request = _StopRequest()

    def handler(signum: int, frame) -> None:
        if request.signum is not None:
            _say("stopped at once; finished sections are kept")
            os._exit(EXIT_SIGNAL_BASE + signum)
        request.signum = signum
        _say("stopping after the current step (press Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _job_kept(job: Path) -> Iterator[None]:
    """An interrupt from here on leaves a job directory to resume: say which."""
    try:
        yield
    except KeyboardInterrupt:
        raise _Interrupted(signal.SIGINT, job) from None
    except _Interrupted as exc:
        exc.job = exc.job or job
        raise


def _interrupted_message(job: Path | None, command: str) -> str:
    if job is None:
        return "interrupted before a job was started; nothing was written" if command in _MAKES_JOBS else "interrupted"
    return f"interrupted; finished sections are kept in {job} (resume with: framepack generate --resume {job})"


# ---- checks before anything loads ----------------------------------------------------------------------


def _check_writable(folder: Path, what: str) -> None:
    """``folder`` takes new files, or can be made where its nearest existing parent takes them."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):  # a real write: also catches read-only file systems
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {existing} ({exc.strerror or exc})") from None


def _check_out(out: Path, overwrite: bool) -> None:
    """Every problem with the output path, before the model loads."""
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must name an .mp4 file, got {out}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; name an .mp4 file")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        if not out.is_file():
            raise ValueError(f"--out {out} exists and is not a regular file")
    _check_writable(out.parent, "--out")


def _job_progress(job_dir: Path) -> tuple[int, int] | None:
    """(finished, total) sections of the job in ``job_dir``; None if there is none."""
    from .jobs import JobDir
    from .planning import section_count

    if not (job_dir / "state.json").exists():
        return None
    job = JobDir.open(job_dir)
    if job.settings.extend is not None:  # its finished sections count the video's too
        from .redo import model_plans

        return job.finished, len(model_plans(job.settings)[0])
    return job.finished, section_count(job.settings.seconds, job.settings.window)


def _check_job_dir(job_dir: Path, overwrite: bool) -> bool:
    """Whether ``job_dir`` holds a finished job that --overwrite replaces; raises for anything else."""
    if job_dir.exists() and not job_dir.is_dir():
        raise ValueError(f"job directory {job_dir} exists and is not a directory")
    progress = _job_progress(job_dir)
    if progress is not None:
        finished, total = progress
        if finished < total:
            raise ValueError(f"{job_dir} holds an unfinished job ({finished}/{total} sections): resume it with "
                             f"--resume {job_dir}, or choose another --out or --job-dir")
        if not overwrite:
            raise ValueError(f"{job_dir} already holds a finished job; pass --overwrite to replace it "
                             "with its video, or choose another --out or --job-dir")
    _check_writable(job_dir.parent, "--job-dir")
    return progress is not None


def _announce_length(settings, source) -> None:
    """The length the video really has (sections come in whole windows: 5 s makes 4.83 s) and the
    mode the loaded model (``source``) samples it in (its default may depend on the length)."""
    from .pipeline import job_mode
    from .planning import FPS, frame_count, latent_count, real_seconds, section_count

    sections = section_count(settings.seconds, settings.window)
    real = real_seconds(settings.seconds, settings.window)
    note = "" if abs(real - settings.seconds) < 0.005 else f"; {settings.seconds:g} s asked, rounded to whole sections"
    mode = job_mode(settings, source)
    why = f" (the model's default up to {source.forward_up_to:g} s)" if settings.mode is None and mode != source.mode else ""
    _say(f"video of {real:.2f} s ({frame_count(latent_count(sections, settings.window))} frames at {FPS} fps, "
         f"{sections} section{'s' if sections > 1 else ''}{note}), {mode} mode{why}")


def _warn_about_settings(settings) -> None:
    from .components import resolve_model

    if settings.image is None and settings.extend is None:
        _say("text-to-video: no --image, the video starts from a blank grey frame")
    if resolve_model(settings.model).cfg(settings.cfg) == 0:
        _warn("cfg 0 keeps only the unconditional (negative-prompt) prediction: the prompt has no effect "
              "(cfg 1 turns real CFG off)")


def _unused_segments(prompt: str, plans: list) -> list:
    """Timeline segments no section takes its prompt from (e.g. starting after the video ends)."""
    from .planning import TimedPrompt, parse_timeline, prompts_for_sections

    timeline = parse_timeline(prompt)
    # label each segment by its index to see which ones the sections pick
    labels = [TimedPrompt(seg.start, seg.end, str(i)) for i, seg in enumerate(timeline)]
    used = {int(label) for label in prompts_for_sections(labels, plans)}
    return [seg for i, seg in enumerate(timeline) if i not in used]


def _warn_about_plans(settings, plans: list) -> None:
    from .keyframes import snap_keyframes, snapped

    for anchor in snapped(snap_keyframes([k.seconds for k in settings.keyframes], len(plans), settings.window)):
        _warn(f"keyframe at {anchor.asked:g} s moved to {anchor.seconds:.2f} s, the nearest section boundary "
              "(keyframes sit where one section ends and the next begins)")
    if settings.section_prompts is not None:
        return  # section prompts replace the timeline's timing
    for seg in _unused_segments(settings.prompt, plans):
        _warn(f"prompt segment [{seg.start:g}s-{seg.end:g}s: {seg.text}] is used by no section of this video "
              "(each section takes the segment at its middle); check the times")


# ---- demo ------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from .demo import SectionStat, context_tokens, demo_settings, format_report
    from .video import read_frames

    settings = demo_settings(seconds=args.seconds, steps=args.steps, seed=args.seed, model=args.model,
                             cache=args.cache)
    out = Path(args.out) if args.out else Path("outputs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
    job_dir = out.with_name(out.stem + ".job")
    _check_out(out, args.overwrite)
    replace_job = _check_job_dir(job_dir, args.overwrite)
    pipeline = _open_pipeline(settings.model, args)
    _announce_length(settings, pipeline.c.source)
    plans = pipeline.plans(settings)
    job = _new_job(settings, out, job_dir, replace_job)
    with _job_kept(job.root):
        finished, total = _run_with_progress(pipeline, job)
    h, w = job.load_latents(0).shape[-2:]  # the latent size the run used
    stats = [SectionStat(e.step + 1, e.count, context_tokens(plans[e.step], h, w), e.seconds) for e in finished]
    print(format_report(stats, total, len(read_frames(job.out)), job.out))
    return 0


# ---- generate --------------------------------------------------------------------------------------------

# CLI option -> GenerationSettings field, for --from and overrides
_SETTING_FLAGS = {
    "image": "image", "end_image": "end_image", "prompt": "prompt", "section_prompt": "section_prompts",
    "negative_prompt": "negative_prompt", "seconds": "seconds", "seed": "seed", "steps": "steps",
    "sampler": "sampler", "distilled_guidance": "distilled_guidance", "cfg": "cfg",
    "guidance_rescale": "guidance_rescale", "shift": "shift", "mode": "mode", "resolution": "resolution",
    "window": "window", "crf": "crf", "model": "model", "cache": "cache", "extend": "extend", "keyframe": "keyframes",
    "color_match": "color_match",
}


def _complete_settings(base: dict):
    from .settings import GenerationSettings

    if not base.get("prompt"):
        raise ValueError("--prompt is required (or --from a framepack video)")
    base.setdefault("image", None)  # no --image: text-to-video (with --extend, a frame of that video)
    base.setdefault("model", _default_model())
    if base.get("steps") is None:  # the model's own: a few-step student is made for its few steps
        from .components import resolve_model

        base["steps"] = resolve_model(base["model"]).steps(None)
    return GenerationSettings.from_dict(base)


def _settings_base(args: argparse.Namespace) -> dict:
    """The settings the options give (over a --from video's), not yet checked."""
    base: dict = {}
    if args.from_video:
        from .video import settings_from_video

        # one line if the video carries no framepack settings (any other JSON included); the
        # inputs it records by file name are found beside it, unless --image / --end-image say
        base = settings_from_video(args.from_video, image=args.image, end_image=args.end_image)
        if args.keyframe is None and base.get("keyframes"):
            from .keyframes import find_recorded_keyframes

            base["keyframes"] = find_recorded_keyframes(Path(args.from_video), base["keyframes"])
    for flag, field in _SETTING_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            base[field] = tuple(value) if field in ("section_prompts", "keyframes") else value
    if base.get("keyframes"):  # absolute: a resume may run from another directory
        base["keyframes"] = tuple((k.seconds, str(Path(k.image).resolve())) for k in base["keyframes"])
    if args.extend is not None:  # the file as given now; its copy goes into the job directory
        from .extend import file_sha256

        base["extend"], base["extend_sha256"] = str(Path(args.extend).resolve()), file_sha256(args.extend)
    elif base.get("extend") is not None:
        raise ValueError(f"{args.from_video} extends the video {base['extend']}: give that video with --extend")
    return _with_loras(base, args)


def _with_loras(base: dict, args: argparse.Namespace) -> dict:
    """--lora FILE[:SCALE] (replacing a video's own), else the LoRAs a --from video records, found
    again beside it or in the current directory with the same sha256."""
    if args.lora is not None:
        from .lora import lora_choice

        return {**base, "loras": tuple(lora_choice(path, scale) for path, scale in args.lora)}
    if args.from_video and base.get("loras"):
        from .lora import find_recorded
        from .settings import lora_choices

        return {**base, "loras": find_recorded(Path(args.from_video), lora_choices(base["loras"]))}
    return base


def _keyframe_option(text: str):
    from .keyframes import parse_keyframe_option

    try:
        return parse_keyframe_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _lora_option(text: str) -> tuple[str, float]:
    from .lora import parse_lora_option

    try:
        return parse_lora_option(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _default_model() -> str:
    import torch

    # the embedded demo model wherever no CUDA GPU is present
    return "framepack-i2v" if torch.cuda.is_available() else "tiny"


def _device_and_dtype(args: argparse.Namespace):
    from .components import resolve_device, resolve_dtype

    device = resolve_device(args.device)  # a typo or a missing GPU: one line, before anything loads
    return device, resolve_dtype(args.dtype, device)


# options a resumed job takes from its own settings: giving them would silently do nothing
_RESUME_FIXED = {**{flag: "--" + flag.replace("_", "-") for flag in _SETTING_FLAGS},
                 "out": "--out", "job_dir": "--job-dir", "from_video": "--from", "lora": "--lora"}


def _resume_conflicts(args: argparse.Namespace) -> list[str]:
    """The options given with --resume that would change the result (--device, --dtype, -v do not)."""
    batch = (["--count"] if args.count != 1 else []) + (["--prompts"] if args.prompts else [])
    return [option for flag, option in _RESUME_FIXED.items() if getattr(args, flag) is not None] + batch


def _generate(args: argparse.Namespace) -> int:
    from .jobs import JobDir
    from .lora import load_choices

    if args.resume:
        conflicts = _resume_conflicts(args)
        if conflicts:
            raise ValueError(f"--resume continues a job with the settings it was started with; drop "
                             f"{', '.join(conflicts)} (or start a new job to change them)")
        # the lock before the model loads: a second --resume of the same job is refused at once
        job = JobDir.open(Path(args.resume)).acquire()
        plan = _check_memory(job.settings, args)
        _check_speed(args)
        with _job_kept(job.root):
            pipeline = _open_pipeline(job.settings.model, args, plan=plan)
            pipeline.use_loras(job.settings.loras)  # fused before the plan places the weights
            _speed_up(pipeline, args)
            with _placed(pipeline, plan, job.root.parent):
                _run_with_progress(pipeline, job)
        print(job.out)
        return 0

    # every check of every job before anything is loaded or written
    jobs = _planned_jobs(args)
    models = sorted({settings.model for settings, *_ in jobs})
    if len(models) > 1:
        raise ValueError(f"a batch runs on one loaded model; its jobs name {', '.join(models)}: run them separately")
    _device_and_dtype(args)
    plans = [_check_memory(settings, args) for settings, *_ in jobs]
    if any(plan != plans[0] for plan in plans):
        raise ValueError("the batch's jobs need different memory plans (sizes or lengths differ): run them separately")
    _check_speed(args)
    for settings, *_ in jobs:
        _warn_about_settings(settings)
    from .world_check import world_notes

    for note in world_notes([settings for settings, *_ in jobs]):  # once per batch; the demo model's world
        _warn(note)
    if len(jobs) > 1:
        _say(f"a batch of {len(jobs)} jobs")

    pipeline = _open_pipeline(models[0], args, plan=plans[0])
    pipeline.use_loras(jobs[0][0].loras)  # a LoRA that does not fit: one line, before any job exists
    for loras in {settings.loras for settings, *_ in jobs[1:]}:
        load_choices(loras, pipeline.c.transformer)  # the other jobs' LoRAs are checked now too
    _speed_up(pipeline, args)
    for number, (settings, out, job_dir, replace_job) in enumerate(jobs, start=1):
        pipeline.use_loras(settings.loras)
        if len(jobs) > 1:
            _say(f"job {number}/{len(jobs)}: seed {settings.seed}, prompt {settings.prompt!r}")
        _announce_length(settings, pipeline.c.source)  # after loading: a model that fails to load is the only line then
        _warn_about_plans(settings, pipeline.plans(settings))
        job = _new_job(settings, out, job_dir, replace_job)
        with _job_kept(job.root), _placed(pipeline, plans[0], job.root.parent):
            _run_with_progress(pipeline, job)
        print(job.out, flush=True)
    return 0


def _planned_jobs(args: argparse.Namespace) -> list[tuple]:
    """(settings, out, job directory, whether it replaces a finished job) of each job the command
    makes: one, or a batch (--count / --prompts: each job's video named after its line and seed,
    its directory beside it), every one checked; a batch job's problem names the job."""
    from .batch import expand, read_prompts
    from .images import load_image
    from .settings import DEFAULT_SEED

    batch = args.count != 1 or args.prompts is not None
    if batch and args.job_dir:
        raise ValueError("--job-dir names one job; a batch keeps each job's directory beside its video (<out>.job)")
    base = _settings_base(args)
    lines = read_prompts(Path(args.prompts)) if args.prompts else None
    stamp = time.strftime('%Y%m%d-%H%M%S')
    single_name = f"{stamp}-seed{base.get('seed', DEFAULT_SEED)}.mp4"
    out = Path(args.out) if args.out else Path("outputs") / (f"{stamp}.mp4" if batch else single_name)
    jobs = []
    for job in expand(base, lines, args.count, out, DEFAULT_SEED):
        try:
            settings = _complete_settings(job.settings)
            _check_out(job.out, args.overwrite)
            job_dir = Path(args.job_dir) if args.job_dir else job.out.with_name(job.out.stem + ".job")
            jobs.append((settings, job.out, job_dir, _check_job_dir(job_dir, args.overwrite)))
            for image in (settings.image, settings.end_image, *(k.image for k in settings.keyframes)):
                if image:
                    load_image(image)
            if settings.extend is not None:
                from .extend import check_video

                check_video(settings.extend, settings.window)
        except ValueError as exc:
            if not batch:
                raise
            raise ValueError(f"batch job {len(jobs) + 1} ({job.label}): {exc}") from None
    return jobs


def _check_speed(args: argparse.Namespace) -> None:
    """--attention and --compile: one line, before anything loads, if they cannot run here."""
    from .model.attention import missing_for
    from .runtime.compile import compile_problem

    device, _ = _device_and_dtype(args)
    problem = missing_for(args.attention, device) or (compile_problem(args.attention) if args.compile else None)
    if problem:
        raise ValueError(problem)


def _speed_up(pipeline, args: argparse.Namespace) -> None:
    """The attention kernel and torch.compile for this run: logged, not in the video's settings
    (compiled blocks and SDPA agree to float rounding; flash and sage do not, see docs/generation.md)."""
    from .model.attention import use_attention

    use_attention(pipeline.c.transformer, args.attention)
    if args.compile:
        from .runtime.compile import compile_blocks

        compile_blocks(pipeline.c.transformer, args.attention)
    _say(f"attention {args.attention}; torch.compile "
         + ("of the transformer blocks (the first section compiles them)" if args.compile else "off"))


@contextmanager
def _placed(pipeline, plan, offload_dir: Path) -> Iterator[None]:
    """The memory plan applied to the pipeline (runtime.apply) for the run; disk offload files
    (under ``offload_dir``) removed after it. No plan: the components stay where they loaded."""
    if plan is None:
        yield
        return
    from .runtime.apply import apply_plan

    with apply_plan(pipeline, plan, pipeline.device, offload_dir=offload_dir):
        yield


def _open_pipeline(model: str, args: argparse.Namespace, plan=None):
    """With a memory ``plan``: every component loads on the CPU (the plan then places them on the
    device), the transformer's block weights straight into fp8 when the plan stores it in fp8."""
    from tqdm import tqdm

    from .components import LOAD_STEPS, load_components, resolve_model
    from .memory import tune_allocator
    from .runtime.apply import load_options
    from .pipeline import FramePackPipeline

    device, dtype = _device_and_dtype(args)
    source = resolve_model(model)  # an unknown model fails here, before anything is loaded
    tune_allocator()  # flat peak memory over long videos (see framepack.memory)
    began = time.perf_counter()
    # our own progress (the libraries' bars are off while they load)
    bar = tqdm(total=len(LOAD_STEPS), desc="loading", unit="part", file=sys.stderr, dynamic_ncols=True, disable=None,
               bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]")

    def step(name: str) -> None:
        bar.update(LOAD_STEPS.index(name) - bar.n)
        bar.set_description(f"loading {name}")

    try:
        components = load_components(source, dtype=dtype, device=device if plan is None else "cpu",
                                     vae_tiling=getattr(args, "vae_tiling", False), on_step=step,
                                     stored_text=plan is None, **load_options(plan))
        bar.update(len(LOAD_STEPS) - bar.n)
    finally:
        bar.close()
    precision = str(dtype).removeprefix("torch.")
    decode = getattr(components.vae, "decode_dtype", dtype)  # the demo VAE picks its own (components.load_vae)
    if decode != dtype:
        precision += f"; VAE decodes in {str(decode).removeprefix('torch.')}"
    _say(f"model {model} on {device} ({precision}), loaded in {time.perf_counter() - began:.1f} s")
    return FramePackPipeline(components, device)


def _new_job(settings, out: Path, job_dir: Path, replace: bool):
    from .jobs import JobDir

    if replace:  # --overwrite: the finished job of the video being replaced goes with it
        shutil.rmtree(job_dir)
    job = JobDir.create(job_dir, settings, out)
    _say(f"job directory {job.root} (resume with: framepack generate --resume {job.root})")
    return job


def _run_with_progress(pipeline, job) -> tuple[list, float]:
    """Run the job with a progress bar; returns (SectionFinished events, total seconds)."""
    from tqdm import tqdm

    from .pipeline import Cancelled, Done

    plans = pipeline.plans(job.settings)
    source = pipeline.source_layout(job.settings)  # an extended video's sections are never sampled
    done = max(job.finished, source.sections if source is not None else 0)
    finished: list = []
    total = 0.0
    bar = tqdm(total=len(plans) * job.settings.steps, initial=done * job.settings.steps, unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=None)
    try:
        with _stop_on_signals() as stop:
            try:
                for event in pipeline.events(job, should_stop=stop):
                    _show(event, bar, finished)
                    if isinstance(event, Done):
                        total = event.seconds
            except Cancelled:
                # the run thread has ended (events() joined it) with the job consistent
                raise _Interrupted(stop.signum or signal.SIGINT, job.root) from None
    finally:
        bar.close()
    return finished, total


def _show(event, bar, finished: list) -> None:
    from .pipeline import Done, SectionFinished, SectionStarted, StepProgress

    if isinstance(event, SectionStarted):
        bar.set_description(f"section {event.step + 1}/{event.count}")
    elif isinstance(event, StepProgress):
        bar.update(1)
        bar.set_postfix_str(f"step {event.i + 1}/{event.n}")
    elif isinstance(event, SectionFinished):
        finished.append(event)
        logging.getLogger("framepack").info("section %d/%d took %.1f s", event.step + 1, event.count, event.seconds)
    elif isinstance(event, Done):
        bar.set_postfix_str(f"done in {event.seconds:.1f} s")


def _redo(args: argparse.Namespace) -> int:
    """A new job from JOB that makes section K (and what depends on it) again (framepack.redo)."""
    from .jobs import JobDir
    from .redo import branch_job, check_request, default_out, model_plans

    original = JobDir.open(Path(args.job))
    check_request(original.settings, args.section, args.prompt, args.seed)
    out = Path(args.out) if args.out else default_out(original, args.section)
    _check_out(out, False)
    job_dir = out.with_name(out.stem + ".job")
    _check_job_dir(job_dir, False)
    plans, given = model_plans(original.settings)  # from the configs: the branch is made before the model loads
    job = branch_job(original, plans, args.section, out, job_dir, seed=args.seed, prompt=args.prompt, given=given)
    _say(f"job directory {job.root}: {job.finished} section(s) kept from {original.root} "
         f"(resume with: framepack generate --resume {job.root})")
    with _job_kept(job.root):
        _run_with_progress(_open_pipeline(original.settings.model, args), job)
    print(job.out, flush=True)
    return 0


# ---- step caches ---------------------------------------------------------------------------------------


def _cache_option(text: str) -> str:
    from .cache import parse_cache

    try:
        return str(parse_cache(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _color_match_option(text: str) -> str:
    from .color_match import method_problem

    problem = method_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _calibrate_cache(args: argparse.Namespace) -> int:
    import tempfile

    from .cache import calibrate_magcache, manifest_path, write_manifest_ratios
    from .demo import demo_settings

    manifest = manifest_path(args.model)  # a model it cannot write into fails before anything loads
    # measured on the uncached video (demo_settings' default): the ratios describe every step
    settings = demo_settings(seconds=args.seconds, steps=args.steps, seed=args.seed, model=args.model)
    pipeline = _open_pipeline(args.model, args)
    with tempfile.TemporaryDirectory(prefix="framepack-calibrate-") as scratch:
        ratios = calibrate_magcache(pipeline, settings, Path(scratch))
    write_manifest_ratios(manifest, ratios, args.steps)
    print(f"wrote {len(ratios)} MagCache ratios (at {args.steps} steps) into {manifest}")
    return 0


# ---- eval ----------------------------------------------------------------------------------------------


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .train.evaluate import (
        EvalConfig,
        config_from_options,
        format_table,
        format_yardstick,
        run_eval,
        run_yardstick,
        save,
    )

    options = {name: getattr(args, name) for name in (
        "model", "split", "start", "start_frames", "caption_seconds", "long_videos", "long_offset", "shape_seconds",
        "persistence_seconds", "drift_seconds", "prompts", "seconds", "long_seconds", "steps", "cfg", "seed", "workdir")}
    config = config_from_options(args.yardstick, **options)
    direction = isinstance(config, EvalConfig)
    pipeline = _open_pipeline(args.model, args)
    total = config.prompts + 2 * config.long_videos if direction else config.videos()
    bar = tqdm(total=total, unit="video", file=sys.stderr, dynamic_ncols=True, disable=None)

    done = itertools.count(1)

    def progress(message: str) -> None:
        bar.update(1)
        n = next(done)
        if bar.disable:  # no terminal (a background run, a log file): a line per video instead of the bar
            print(f"framepack eval: video {n}/{total} {message}", file=sys.stderr, flush=True)
        else:
            logging.getLogger("framepack").info(message)

    try:
        result = run_eval(config, pipeline, progress) if direction else run_yardstick(config, pipeline, progress)
    finally:
        bar.close()
    if args.json:
        save(result, Path(args.json))
    print(format_table(result) if direction else format_yardstick(result))
    return 0


# ---- train ----------------------------------------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from . import trainer
    # registers the tasks "distill", "framepack", "lora", "finetune" and "vae"
    from .train import distill_task, framepack_task, user_task, vae_task  # noqa: F401

    config = trainer.TrainConfig.load(args.config)
    if args.output_dir:
        config = trainer.TrainConfig(**{**config.__dict__, "output_dir": args.output_dir})
    out = trainer.train(config, max_steps_this_run=args.max_steps)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch: once, not once per process
        print(out)
    return 0


# ---- dataset --------------------------------------------------------------------------------------------

SKIPPED_SHOWN = 20  # skipped files named in the summary; the dataset's report.json lists every one


def _dataset_prepare(args: argparse.Namespace) -> int:
    from .planning import FPS
    from .train.dataset import MANIFEST, REPORT, prepare

    device, dtype = _device_and_dtype(args)
    out = Path(args.out)
    try:
        report = prepare(Path(args.dir), out, args.model, resolution=args.resolution, max_frames=args.max_frames,
                         fps=FPS if args.fps is None else args.fps, device=device, dtype=dtype)
    except KeyboardInterrupt:
        started = (out / MANIFEST).is_file()
        _say(f"interrupted; finished shards are kept in {out}: run the same command again to continue" if started
             else "interrupted before anything was written")
        return EXIT_SIGNAL_BASE + signal.SIGINT
    for skipped in report.skipped[:SKIPPED_SHOWN]:
        _warn(f"skipped {skipped.file}: {skipped.reason}")
    if len(report.skipped) > SKIPPED_SHOWN:
        _warn(f"... and {len(report.skipped) - SKIPPED_SHOWN} more skipped files (all in {out / REPORT})")
    print(f"{report.samples} samples in {len(report.buckets)} buckets ({report.encoded} encoded by this run, "
          f"{len(report.skipped)} files skipped) in {out}")
    return 0


# ---- plan ------------------------------------------------------------------------------------------------


def _free_ram(ram: float | None) -> float:
    """The host budget in GB: as given, else what this machine has available (psutil)."""
    if ram is not None:
        return ram
    import psutil

    return psutil.virtual_memory().available / (1 << 30)


def _free_vram(vram: float | None) -> float:
    """The GPU budget in GB: as given, else the CUDA GPU's free memory."""
    if vram is not None:
        return vram
    import torch

    if not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here to measure: give --vram GB to plan for a GPU of that size, "
                         "or --cpu to plan a CPU run")
    return torch.cuda.mem_get_info()[0] / (1 << 30)


@contextmanager
def _libraries_quiet() -> Iterator[None]:
    """No library warnings while importing and sizing: the plan is the output (ours are raised)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _memory_budget(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return _gigabytes(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a number of GB > 0, got {text!r}") from None


def _check_memory(settings, args: argparse.Namespace):
    """The memory plan this run applies (logged), or None: see runtime.choose (CUDA: planned for
    the GPU's free memory or --memory; elsewhere only with --memory, as one pool). A budget no
    plan fits is refused with the smallest that works. On CUDA only the transformer's placement has
    run (docs/memory.md)."""
    from .runtime.choose import plan_for_run
    from .runtime.plan import format_plan

    device, _ = _device_and_dtype(args)
    with _libraries_quiet():
        plan = plan_for_run(settings, device, getattr(args, "memory", None))
    if plan is not None:
        logging.getLogger("framepack").info("memory plan (predicted peaks; applied to this run):\n%s",
                                            format_plan(plan))
    return plan


def _plan(args: argparse.Namespace) -> int:
    from .runtime.plan import Budget, Job, format_plan, plan_memory
    from .runtime.sizes import model_sizes

    if args.cpu:
        if args.vram is not None:
            raise ValueError("--cpu plans one pool of host memory (--ram); drop --vram")
        budget = Budget.shared(_free_ram(args.ram))
    else:
        budget = Budget.gb(_free_vram(args.vram), _free_ram(args.ram))
    with _libraries_quiet():  # transformers / diffusers announce optional backends at import
        sizes = model_sizes(args.model)  # an unknown model: one line
    cfg = args.cfg if args.cfg is not None else sizes.cfg
    job = Job(resolution=args.resolution or sizes.resolution, window=args.window, batch=1 if cfg == 1 else 2)
    print(format_plan(plan_memory(sizes, job, budget)))
    return 0


# ---- parser ---------------------------------------------------------------------------------------------


def _demo_manifest(name: str = "tiny") -> dict:
    """An embedded demo model's manifest (its defaults, for the help), read without importing torch."""
    try:
        return json.loads(resources.files("framepack").joinpath("assets", name, "framepack.json").read_text())
    except (OSError, ValueError):
        return {}


def build_parser() -> argparse.ArgumentParser:
    from .settings import DEFAULT_SEED  # light: no torch

    teacher, student = _demo_manifest(), _demo_manifest("tiny-fast")
    demo_cfg = teacher.get("cfg", 1.0)
    parser = _Parser(prog="framepack", description="FramePack: long videos, section by section, on a constant budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", help="make a video with the embedded demo model from the bundled start image "
                                            "and prompt (2.4-5.3 s for the whole command on 2 CPU cores)",
                               description="Make a 5 s video (4.83 s: 145 frames at 30 fps) from the bundled start image "
                               "and prompt with the embedded demo model's few-step student (tiny-fast: "
                               f"{student.get('steps', 4)} steps at cfg {student.get('cfg', 1.0):g}, CFG folded in); print "
                               "each section's context length and time. Measured over several runs on 2 CPU cores: "
                               "1.3-2.7 s of generation, 2.4-5.3 s for the whole command, warm. --model tiny runs its "
                               f"teacher ({teacher.get('steps', 25)} steps at its default cfg {demo_cfg:g}, with its "
                               "step cache): 3.4-4.9 s of generation.")
    demo.add_argument("--seconds", type=_number, default=5.0, help="video length in seconds (default 5, which makes 4.83 s)")
    demo.add_argument("--steps", type=_positive, help="sampling steps per section (default: the model's, 4 for "
                      "tiny-fast, 25 for tiny)")
    demo.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    demo.add_argument("--model", default="tiny-fast", help="model (default tiny-fast, the demo model's few-step "
                      "student; tiny: the demo model itself)")
    demo.add_argument("--cache", type=_cache_option, default="model", metavar="METHOD[:T]", help="step cache (default model: the model's own, "
                      f"{student.get('cache', 'none')} for tiny-fast, {teacher.get('cache', 'none')} for tiny; "
                      "none: every step exact; see generate --cache)")
    demo.add_argument("--out", help="output .mp4 (default outputs/demo-TIMESTAMP.mp4)")
    demo.add_argument("--overwrite", action="store_true", help="replace --out (and its finished job) if it exists")
    demo.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    demo.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                      help="weights dtype (default fp32: the demo model is small)")
    demo.set_defaults(run=_demo)

    gen = commands.add_parser(
        "generate",
        help="make a video from a start image and a prompt",
        description="Generate a video section by section. Every run keeps a job directory; "
        "if it stops, --resume JOB_DIR continues from the last finished section.",
    )
    src = gen.add_argument_group("what to make")
    src.add_argument("--model", help="tiny (the embedded CPU demo model, default without a CUDA GPU), "
                     "framepack-i2v, framepack-f1, or a directory with a framepack.json")
    src.add_argument("--image", help="start image (png, jpg, webp, ...); without it (and without --extend), "
                     "text-to-video from a blank grey frame (docs/generation.md: what it does on the demo model)")
    src.add_argument("--end-image", dest="end_image", help="optional end image (inverted mode only)")
    src.add_argument("--extend", metavar="VIDEO", help="continue this video (any mp4/webm/...): forward/vanilla mode after "
                     "its end, inverted mode before its start; --seconds is the new part; the output holds the original "
                     "too; --image defaults to one of its frames (docs/generation.md, Extend a video)")
    src.add_argument("--keyframe", action="append", type=_keyframe_option, metavar="TIME:IMAGE",
                     help="an image the video passes through at TIME seconds, snapped to the nearest section boundary "
                     "(every 1.2 s); repeat for several; inverted mode only")
    src.add_argument("--prompt", help="the prompt, or a timeline: '[0s-2s: a cat sits] [2s-5s: the cat jumps]'")
    src.add_argument("--section-prompt", dest="section_prompt", action="append",
                     help="one prompt per section in video order (repeat the option); overrides --prompt's timing")
    src.add_argument("--negative-prompt", dest="negative_prompt", help="negative prompt (used only with --cfg != 1)")
    src.add_argument("--seconds", type=_number, help="video length in seconds (default 5; at most 120); rounded to "
                     "whole sections: 5 makes 4.83 s (the real length is printed before the run)")
    src.add_argument("--seed", type=int, help=f"random seed (default {DEFAULT_SEED}); the same seed gives the same video")
    src.add_argument("--count", type=int, default=1, metavar="N",
                     help="make N videos, seeds S, S+1, ... (default 1); the outputs get -seedS in their names")
    src.add_argument("--prompts", metavar="FILE", help="one job per line: a prompt, or a JSON object of settings "
                     "over these options ({\"prompt\": ..., \"seed\": 5, \"seconds\": 2.4}); run one after another, "
                     "outputs named -lineK; # comments and blank lines skipped")
    src.add_argument("--lora", action="append", type=_lora_option, metavar="FILE[:SCALE]",
                     help="fuse a LoRA (.safetensors: ours, musubi-tuner's or diffusers' naming) at SCALE (default "
                     "1); repeat for several; recorded in the video by file name and sha256 (docs/lora.md)")
    samp = gen.add_argument_group("sampling")
    samp.add_argument("--steps", type=int, help="denoising steps per section (default: the model's own; 25 for "
                      "all but a few-step student such as tiny-fast, 4)")
    samp.add_argument("--sampler", choices=["unipc", "euler"], help="unipc (default; order-3 UniPC) or euler")
    samp.add_argument("--distilled-guidance", dest="distilled_guidance", type=_number,
                      help="distilled guidance scale fed to the model (default 10)")
    samp.add_argument("--cfg", type=_number, help="real classifier-free guidance scale; 1 = off, 0 = the prompt has "
                      f"no effect (default: the model's own: off for the 13B models, {demo_cfg:g} for the demo model)")
    samp.add_argument("--guidance-rescale", dest="guidance_rescale", type=_number,
                      help="guidance rescale in [0, 1] for real CFG (default 0)")
    samp.add_argument("--shift", type=_number, help="sigma shift; default: the model's own (3 for tiny), else from the token count (7 at 640)")
    samp.add_argument("--mode", choices=["inverted", "forward", "vanilla"],
                      help="section order: inverted anti-drifting (I2V models), forward (F1) or vanilla; "
                      "default: the model's own (tiny-fast: forward up to 10 s, inverted beyond)")
    samp.add_argument("--cache", type=_cache_option, metavar="METHOD[:T]",
                      help="step cache: none (default), model (the model's own choice), teacache[:T] (T default "
                           "0.15), magcache[:T] (needs calibrate-cache), fbcache[:T], taylorseer[:N]; see docs/caching.md")
    samp.add_argument("--window", type=int, help="latent frames per section (default 9 = 33 video frames)")
    out = gen.add_argument_group("output")
    out.add_argument("--resolution", type=int, help="target resolution bucket (default: the model's own, 640 for the 13B models, 128 for tiny)")
    out.add_argument("--crf", type=int, help="H.264 quality, 0 (lossless) .. 51; default 16")
    out.add_argument("--color-match", dest="color_match", nargs="?", const="lab", type=_color_match_option,
                     metavar="METHOD", help="colour drift correction: each section's frames get the start frame's "
                     "colours (the latents stay as sampled); lab (what the bare option means: mean and spread in "
                     "CIELAB), histogram, or none (default); needs a start image (docs/generation.md)")
    out.add_argument("--out", help="output mp4 (default outputs/<time>-seed<seed>.mp4); an existing file is "
                     "kept unless --overwrite")
    out.add_argument("--overwrite", action="store_true", help="replace --out (and its finished job) if it exists")
    out.add_argument("--job-dir", dest="job_dir", help="job directory (default <out>.job next to the video)")
    run = gen.add_argument_group("running")
    run.add_argument("--resume", metavar="JOB_DIR", help="continue an interrupted job from its last finished "
                     "section, with its own settings (only --device, --dtype, --vae-tiling, --memory, --compile, --attention and -v "
                     "may be given)")
    run.add_argument("--from", dest="from_video", metavar="VIDEO.mp4",
                     help="repeat the settings embedded in a framepack video (other options override them)")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weights dtype; auto = bf16 on CUDA, fp32 on CPU")
    run.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="decode the VAE in tiles (less memory)")
    run.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks (the first section "
                     "compiles them, then no recompilation; CPU numbers in docs/generation.md)")
    run.add_argument("--attention", choices=["sdpa", "flash", "sage"], default="sdpa",
                     help="attention kernel: sdpa (default, PyTorch), flash (flash-attn) or sage (SageAttention); the "
                     "last two on CUDA only, where their package is installed")
    run.add_argument("--memory", type=_memory_budget, default=None, metavar="auto|GB",
                     help="memory to plan for: auto (default: on CUDA the GPU's free memory; on CPU no plan, everything "
                     "resident) or a number of GB (on CPU: RAM for weights, activations and runtime together); the plan "
                     "(framepack plan) is applied: block offload to RAM or disk, fp8/int8 storage, encoders on the GPU "
                     "only while they run (logged with -v); a budget no plan fits is refused with the smallest that works")
    gen.set_defaults(run=_generate)

    ev = commands.add_parser("eval", help="evaluate a model on the synthetic world: caption control, shape fidelity, "
                                          "persistence, drift (docs/evaluation.md)")
    ev.add_argument("--model", default="tiny", help="model (default tiny, the embedded demo model)")
    ev.add_argument("--yardstick", choices=["caption", "direction"],
                    help="caption (default): every start frame with every caption, shape IoU, persistence vs the true "
                         "area, drift, on start frames independent of the motion; direction (the default when "
                         "--prompts, --seconds or --long-seconds is given): the first yardstick, on the first world "
                         "(the first-generation model's published table)")
    ev.add_argument("--split", choices=["validation", "test", "held-out"],
                    help="caption: validation (default; for choosing models and settings) or test (reported once per "
                         "shipped model); direction: held-out (default) or validation")
    ev.add_argument("--start", choices=["determined", "independent", "by-motion"],
                    help="caption: determined (default): start frames independent of the motion, one speed and "
                         "bounce heading, so the start frame and caption determine the clip; independent: the same "
                         "start frames with the speed and heading drawn; by-motion: the first world's")
    ev.add_argument("--start-frames", type=int, help="caption: start frames, each with every caption (default 10)")
    ev.add_argument("--caption-seconds", type=_number, help="caption: length of each caption video (default 2)")
    ev.add_argument("--long-videos", type=int, help="scenes for the long videos (default 4; direction: 6)")
    ev.add_argument("--long-offset", type=int, metavar="N",
                    help="caption: skip the split's first N long-video scenes, for a fresh batch (default 0)")
    ev.add_argument("--shape-seconds", help="caption: lengths for shape IoU, comma-separated (default 5,30)")
    ev.add_argument("--persistence-seconds", help="caption: lengths for persistence (default 30,60)")
    ev.add_argument("--drift-seconds", type=_number,
                    help="caption: the long videos of this length are also made with vanilla sampling, for drift "
                         "(default 30; 0: not)")
    ev.add_argument("--prompts", type=_positive, help="direction: held-out prompts (default 50)")
    ev.add_argument("--seconds", type=_number, help="direction: length of each direction video (default 2)")
    ev.add_argument("--long-seconds", type=_number, help="direction: length of each long video (default 30)")
    ev.add_argument("--steps", type=_positive, help="sampling steps per section (default: the model's own, 25 "
                    "for tiny)")
    ev.add_argument("--cfg", type=_number,
                    help="real classifier-free guidance against the empty prompt (default: the model's own)")
    ev.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    ev.add_argument("--workdir", help="keep every generated video in this directory (default: a temporary one)")
    ev.add_argument("--json", help="also write the per-video results to this JSON file")
    ev.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    ev.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    ev.set_defaults(run=_eval)

    tr = commands.add_parser("train", help="train or fine-tune from a JSON config (resumes from the latest checkpoint)")
    tr.add_argument("config", help="training config (JSON), e.g. configs/demo_vae.json")
    tr.add_argument("--output-dir", dest="output_dir", help="override the config's output_dir")
    tr.add_argument("--max-steps", dest="max_steps", type=_positive,
                    help="stop after this many steps in this run (a checkpoint is written); run again to continue")
    tr.set_defaults(run=_train)
    pl = commands.add_parser("plan", help="plan GPU and host memory for a model: where each component lives, in "
                                          "what format, and the predicted peak of each phase (offline, no weights)",
                             description="Choose, from the model's configs alone, each component's placement "
                             "(resident, on the GPU only while it runs, block offload from RAM or disk) and storage "
                             "(bf16, fp8, int8) and the VAE's tiling, so that the predicted peak VRAM and RAM of every "
                             "phase (encode, sample, decode) fit the budget with 10%% to spare. Exits 2 with the "
                             "smallest budget that works when none fits. Predictions, not measurements: see "
                             "docs/memory.md. GB = 2^30 bytes.")
    pl.add_argument("--model", default="framepack-i2v", help="framepack-i2v (default), framepack-f1, tiny, or a "
                    "model directory whose parts are local")
    pl.add_argument("--vram", type=_gigabytes, help="GPU memory budget in GB (default: free memory of the CUDA GPU)")
    pl.add_argument("--ram", type=_gigabytes, help="host memory budget in GB (default: available memory)")
    pl.add_argument("--cpu", action="store_true", help="plan a run on the CPU: weights, activations and runtime share "
                    "one pool, --ram GB (what generate --device cpu --memory GB applies)")
    pl.add_argument("--resolution", type=int, help="resolution bucket (default: the model's own, 640 for the 13B "
                    "models); the largest bucket's size is planned for")
    pl.add_argument("--window", type=int, default=9, help="latent frames per section (default 9)")
    pl.add_argument("--cfg", type=_number, help="real CFG scale; other than 1, both branches run in one batch of 2 "
                    "(default: the model's own)")
    pl.set_defaults(run=_plan)

    cc = commands.add_parser("calibrate-cache", help="measure a model's MagCache ratios on the bundled demo image and "
                             "write them into its framepack.json (what --cache magcache reads)")
    cc.add_argument("--model", default="tiny", help="tiny (default, the embedded demo model) or a model directory")
    cc.add_argument("--steps", type=_positive, default=25, help="sampling steps per section (default 25; other step "
                    "counts interpolate the ratios)")
    cc.add_argument("--seconds", type=_number, default=5.0, help="length of the calibration video (default 5)")
    cc.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    cc.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    cc.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16", "fp16"], help="weights dtype (default fp32)")
    cc.set_defaults(run=_calibrate_cache)

    ds = commands.add_parser("dataset", help="prepare a folder of captioned videos and images for training")
    ds_commands = ds.add_subparsers(dest="dataset_command", required=True, metavar="COMMAND", parser_class=_Parser)
    dp = ds_commands.add_parser(
        "prepare", help="encode a folder of captioned videos and images once: VAE latents and text/image "
        "embeddings in sharded safetensors (resumable)",
        description="Every video (.mp4 .webm .mov) and image (.png .jpg .jpeg .webp) under DIR with a caption (a "
        "same-name .txt, or a metadata.jsonl / metadata.csv at DIR's root) is resampled to 30 fps (--fps) by "
        "presentation time, cut to the resolution bucket "
        "generation would use and to 1+4n frames, and encoded by the model's own encoders. Files without a caption "
        "or unreadable are skipped and listed in OUT/report.json. Run the same command again to continue an "
        "interrupted run. See docs/training-your-videos.md.")
    dp.add_argument("dir", help="the folder of videos and images (searched recursively)")
    dp.add_argument("--model", required=True, help="the model whose encoders are used: tiny, framepack-i2v, "
                    "framepack-f1, or a model directory")
    dp.add_argument("--out", required=True, help="the prepared dataset's folder (new, empty, or an unfinished "
                    "preparation with the same options to continue)")
    dp.add_argument("--resolution", type=_positive, help="resolution bucket (default: the model's own, 640 for the "
                    "13B models)")
    dp.add_argument("--max-frames", dest="max_frames", type=_positive, help="use at most this many frames of each "
                    "video, counted after resampling to --fps (default: as many as its length allows)")
    dp.add_argument("--fps", type=_number, help="resample every video to this many frames per second, by "
                    "presentation time (default 30: FramePack's models are trained at 30 fps)")
    dp.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    dp.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="encoders' dtype (default auto: bf16 on CUDA, else fp32)")
    dp.set_defaults(run=_dataset_prepare)
    rd = commands.add_parser("redo", help="make one section of a job again (another seed or prompt, or the same) in a "
                             "new job that keeps every section not depending on it; the original job is untouched")
    rd.add_argument("job", metavar="JOB_DIR", help="the job directory (VIDEO.job beside its video)")
    rd.add_argument("--section", type=_positive, required=True,
                    help="the section to make again: 1 = the first in the video (time order, whatever order the mode "
                         "made them in)")
    rd.add_argument("--seed", type=int, help="seed of the sections made again (default: the job's own random state, so "
                    "without --prompt the same sections come out)")
    rd.add_argument("--prompt", help="that section's prompt (the other sections keep theirs)")
    rd.add_argument("--out", help="the new video (default <video>-redo<K>.mp4 beside the original; its job directory "
                    "beside it)")
    rd.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    rd.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="weights dtype; auto = bf16 on CUDA, fp32 on CPU")
    rd.set_defaults(run=_redo)
    for sub in (demo, gen, ev, tr, pl, cc, dp, rd):
        # -v after the command too (SUPPRESS: an absent flag must not reset one given before it)
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress at INFO level")
    from .ui import add_ui_command  # light: gradio is imported only when the app starts

    add_ui_command(commands)
    return parser


# commands whose SIGTERM ends like Ctrl-C (a message, a consistent job) instead of a silent kill
_GRACEFUL = ("demo", "generate", "eval", "redo")
_MAKES_JOBS = ("demo", "generate", "redo")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat("%(message)s"))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if args.command in _GRACEFUL else None
    try:
        return args.run(args)
    except (KeyboardInterrupt, _Interrupted) as exc:
        stop = exc if isinstance(exc, _Interrupted) else _Interrupted(signal.SIGINT)
        _say(_interrupted_message(stop.job, args.command))
        return EXIT_SIGNAL_BASE + stop.signum
    except (ValueError, OSError) as exc:
        _say(f"error: {exc}")
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
