"""FramePackPipeline: settings in, a stream of events and a finished mp4 out.

The loop per section: plan (pure) -> pack the context from saved latents -> sample -> save the
section atomically -> decode the new frames with the overlap the blend needs -> append to the
video. Memory and time per section are constant: latents live in the job directory (a few recent
sections are cached), finished frames are encoded once and left on disk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from .cache import CacheSpec, magcache_ratios, resolve_cache, section_cache
from .color_match import match_colors
from .components import Components, ModelSource, TextEmbedding, load_components, resolve_model, stack_embeddings
from .config import TransformerConfig
from .images import load_image, nearest_bucket, prepare_image, resize_and_crop
from .extend import prepare_source, source_layout, start_frame, with_source
from .jobs import JobDir
from .keyframes import SectionOverride, overrides_for, with_keyframes
from .lora import LoraFusion, load_choices, recorded_loras
from .memory import release_freed_memory
from .model import HistoryInput
from .packing import ContextSchedule
from .planning import (
    END,
    START,
    KeyframeSource,
    Mode,
    SectionPlan,
    decode_span,
    frame_count,
    parse_timeline,
    plan_sections,
    prompts_for_sections,
    section_count,
)
from .sampling import TIMESTEP_SCALE, Step, get_sampler, guided_velocity, sigma_schedule, velocity_denoiser
from .settings import GenerationSettings, LoraChoice
from .video import (
    Assembler,
    SpanDecoder,
    assembly_layout,
    concat_segments,
    embedded_settings,
    fit_latent_to_rgb,
    overlap_frames,
    preview_frames,
    segment_frames,
    to_frames,
    to_pixels,
    to_uint8,
    write_segment,
)

log = logging.getLogger(__name__)
# The provisional video shows the newest sections only (about 10 s at 30 fps): remuxing every
# segment after every section would make the per-section cost grow with the video's length.
PROVISIONAL_SECTIONS = 8
PENDING_PREVIEW = "pending-preview.mp4"  # the provisional video's not-yet-final frames (in JOB/video)
# Text-to-video starts from this blank frame (docs/generation.md, "Text-to-video": what was tried on the demo model)
BLANK_START_RGB = (128, 128, 128)  # mid grey: deterministic, and the demo model drew the caption's colours on it


# ---- events -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SectionStarted:
    step: int
    count: int
    prompt: str


@dataclass(frozen=True)
class StepProgress:
    step: int
    count: int
    i: int
    n: int
    preview: np.ndarray  # (T, h, w, 3) uint8: the current x0 prediction through a linear map


@dataclass(frozen=True)
class SectionFinished:
    step: int
    count: int
    seconds: float


@dataclass(frozen=True)
class VideoUpdated:
    path: Path
    final: bool


@dataclass(frozen=True)
class Done:
    path: Path
    seconds: float


Event = SectionStarted | StepProgress | SectionFinished | VideoUpdated | Done


class Cancelled(Exception):
    """Raised out of :meth:`FramePackPipeline.run` when ``should_stop`` turned true; the job is resumable."""


class NonFiniteSection(ValueError):
    """A section came out NaN/Inf (diverged weights); nothing of it was committed."""


# ---- conditioning -------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    start_latent: torch.Tensor  # (1, C, 1, h, w)
    end_latent: torch.Tensor | None
    image_embeds: torch.Tensor | None  # (1, N, E)
    rgb_map: torch.Tensor  # latent -> RGB preview map
    size: tuple[int, int]  # pixel (H, W)
    keyframe_latents: tuple[torch.Tensor, ...] = ()  # (1, C, 1, h, w) each, in the settings' order
    keyframe_embeds: tuple[torch.Tensor, ...] = ()  # (1, N, E) each, for models with an image encoder
    start_rgb: np.ndarray | None = None  # (H, W, 3) uint8: the start frame as encoded (what --color-match keeps)

    def section_embeds(self, override: SectionOverride) -> torch.Tensor | None:
        """The image embeddings of one section: the start image's, averaged with those of the
        keyframes at either end of the section."""
        if self.image_embeds is None or not override.blend:
            return self.image_embeds
        return torch.stack([self.image_embeds, *(self.keyframe_embeds[i] for i in override.blend)]).mean(dim=0)


@dataclass
class _Run:
    """What one run carries from section to section."""

    plans: list[SectionPlan]
    cond: Conditioning
    prompts: list[str]
    negative: TextEmbedding | None  # encoded only when cfg != 1
    cfg: float  # the real-CFG scale in force: the settings', else the model's own
    store: "LatentStore"
    generator: torch.Generator
    backwards: bool
    assembler: Assembler
    layout: list[tuple[int, int]]  # per step: (frames it makes final, frames left pending)
    decoder: SpanDecoder  # the VAE decode of each section's span, reusing frames where that is exact
    cache: CacheSpec  # the step cache in force ("model" resolved)
    mag_ratios: list[float] | None  # the model's calibrated MagCache ratios, when MagCache runs
    overrides: list[SectionOverride]  # per step: what keyframes change (framepack.keyframes)
    color_match: str = "none"  # framepack.color_match's method for the new sections' frames
    extended: int = 0  # the first steps, an extended video's own frames: never colour-matched

    def matched(self, plan: SectionPlan, clip: np.ndarray) -> np.ndarray:
        """A section's decoded frames (T, H, W, 3) as they are written: with ``--color-match``, in the
        start frame's colours. Only the pixels change: the latents the next sections see stay as sampled."""
        if self.color_match == "none" or plan.step < self.extended or self.cond.start_rgb is None:
            return clip
        return match_colors(clip, self.cond.start_rgb, self.color_match)

    def needed_segments(self, upto: int) -> list[int]:
        """Steps before ``upto`` that wrote a segment (the others made no frame final)."""
        return [step for step in range(upto) if self.layout[step][0] > 0]


class LatentStore:
    """Video latents by position, read from the job directory; a few recent sections cached."""

    def __init__(self, job: JobDir, plans: list[SectionPlan], start: torch.Tensor, end: torch.Tensor | None,
                 cache_sections: int = 4, keyframes: Sequence[torch.Tensor] = ()) -> None:
        self.job, self.start, self.end, self.keyframes = job, start, end, tuple(keyframes)
        self.owner = {pos: plan.step for plan in plans for pos in plan.positions}
        self.first = {plan.step: plan.positions[0] for plan in plans}
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.cache_sections = cache_sections

    def put(self, step: int, latents: torch.Tensor) -> None:
        self.cache[step] = latents
        self.cache.move_to_end(step)
        while len(self.cache) > self.cache_sections:
            self.cache.popitem(last=False)

    def section(self, step: int) -> torch.Tensor:
        if step not in self.cache:
            self.put(step, self.job.load_latents(step))
        return self.cache[step]

    def get(self, source) -> torch.Tensor:
        """(1, C, 1, h, w) latent for a plan source; zeros for None."""
        if source is None:
            return torch.zeros_like(self.start)
        if source == START or source == 0:
            return self.start
        if source == END:
            return self.end
        if isinstance(source, KeyframeSource):
            return self.keyframes[source.index]
        step = self.owner[source]
        k = source - self.first[step]
        return self.section(step)[:, :, k : k + 1]

    def gather(self, sources) -> torch.Tensor:
        return torch.cat([self.get(s) for s in sources], dim=2)


# ---- the pipeline -------------------------------------------------------------------------------------


class FramePackPipeline:
    def __init__(self, components: Components, device: str | torch.device = "cpu") -> None:
        self.c = components
        self.device = torch.device(device)
        self._text_cache: dict[str, TextEmbedding] = {}
        self._loras: LoraFusion | None = None  # the LoRAs fused into the transformer (framepack.lora)

    @classmethod
    def from_model(cls, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   vae_tiling: bool = False) -> "FramePackPipeline":
        return cls(load_components(resolve_model(model), dtype=dtype, device=device, vae_tiling=vae_tiling), device)

    # ---- LoRAs -----------------------------------------------------------------------------------------

    def use_loras(self, loras: Sequence[LoraChoice]) -> None:
        """Fuse exactly these LoRAs into the transformer (those fused before are unfused first);
        a no-op when they are already the fused ones. One-line LoraError for a file that does not fit."""
        key = tuple(loras)
        if key == (self._loras.fused if self._loras is not None else ()):
            return
        if self._loras is None:
            self._loras = LoraFusion(self.c.transformer)
        if key:
            self._loras.fuse(load_choices(key, self.c.transformer), key)
        else:
            self._loras.unfuse()

    # ---- encoding, once per distinct input -----------------------------------------------------------

    def encode_text(self, prompt: str) -> TextEmbedding:
        if prompt not in self._text_cache:
            self._text_cache[prompt] = self.c.text.encode(prompt)
        return self._text_cache[prompt]

    def condition(self, settings: GenerationSettings) -> Conditioning:
        resolution = self.c.source.resolution(settings.resolution)
        if settings.image is None and settings.extend is not None:  # a frame of the video it extends
            start_rgb = prepare_image(start_frame(settings.extend, self.source_layout(settings)), resolution)
        elif settings.image is None:
            start_rgb = blank_start_frame(resolution)
        else:
            start_rgb = prepare_image(load_image(settings.image), resolution)
        height, width = start_rgb.shape[:2]
        start = self._encode_frame(start_rgb)
        end = embeds = None
        if settings.end_image is not None:
            end_rgb = resize_and_crop(load_image(settings.end_image), height, width)
            end = self._encode_frame(end_rgb)
        keyframes_rgb = [resize_and_crop(load_image(k.image), height, width) for k in settings.keyframes]
        keyframe_embeds: tuple[torch.Tensor, ...] = ()
        if self.c.image is not None:
            embeds = self.c.image.encode(start_rgb)
            if settings.end_image is not None:
                # the end frame shares the image conditioning equally with the start frame
                embeds = (embeds + self.c.image.encode(end_rgb)) / 2
            keyframe_embeds = tuple(self.c.image.encode(rgb) for rgb in keyframes_rgb)
        # a VAE may carry a map fitted on many frames; otherwise fit one on this start frame
        rgb_map = getattr(self.c.vae, "preview_map", None)
        rgb_map = rgb_map if rgb_map is not None else fit_latent_to_rgb(start, start_rgb)
        return Conditioning(start, end, embeds, rgb_map, (height, width),
                            tuple(self._encode_frame(rgb) for rgb in keyframes_rgb), keyframe_embeds, start_rgb)

    def _encode_frame(self, rgb: np.ndarray) -> torch.Tensor:
        return self.c.vae.encode(to_pixels(rgb[None]))  # one frame: (1, 3, 1, H, W)

    # ---- the run ----------------------------------------------------------------------------------------

    def source_layout(self, settings: GenerationSettings):
        """Where the frames of the video a job extends sit (framepack.extend); None for other jobs."""
        return job_source_layout(settings, job_mode(settings, self.c.source), self.c.transformer.config.schedule)

    def plans(self, settings: GenerationSettings) -> list[SectionPlan]:
        return plan_job(settings, job_mode(settings, self.c.source), self.c.transformer.config)

    def run(self, job: JobDir, on_event: Callable[[Event], None] = lambda e: None,
            should_stop: Callable[[], bool] = lambda: False) -> Path:
        """Generate (or continue) the job's video; returns the final mp4 path."""
        began = time.perf_counter()
        with job.locked():  # a second process on the same job is refused, not computing it twice
            return self._run(job, on_event, should_stop, began)

    def _run(self, job: JobDir, on_event: Callable[[Event], None], should_stop: Callable[[], bool],
             began: float) -> Path:
        run = self._prepare(job)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="framepack-video") as video_writer:
            # a section's writes (mp4 segment, pending frames, the commit, the provisional video) run
            # beside the next section's sampling, one section behind at most; .result() surfaces errors
            behind: Future | None = None
            try:
                for plan in run.plans[job.finished :]:
                    write = self._section(plan, job, run, on_event, should_stop)
                    if behind is not None:
                        behind.result()
                    behind = video_writer.submit(write)
            except BaseException:
                _settle(behind)  # a stopped run still commits the section it had finished
                raise
            if behind is not None:
                behind.result()

        segments = [job.segment_path(step) for step in run.needed_segments(len(run.plans))]
        job.out.parent.mkdir(parents=True, exist_ok=True)
        in_time = list(reversed(segments)) if run.backwards else segments
        concat_segments(with_source(job, in_time, run.backwards), job.out, self._metadata(job))
        job.provisional_path.unlink(missing_ok=True)
        (job.root / "video" / PENDING_PREVIEW).unlink(missing_ok=True)
        on_event(VideoUpdated(job.out, final=True))
        on_event(Done(job.out, time.perf_counter() - began))
        return job.out

    def _prepare(self, job: JobDir) -> "_Run":
        """Everything a run carries; on a resume, first checks (and where it can, repairs) the job."""
        settings = job.settings
        inputs = [("start", settings.image), ("end", settings.end_image)]
        inputs += [(f"{k.seconds:g} s keyframe", k.image) for k in settings.keyframes]
        for label, path in inputs:
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{path}, the job's copy of its {label} image, is missing: put that image back "
                                 "under this name and resume again")
        for folder in ("sections", "video"):
            (job.root / folder).mkdir(exist_ok=True)  # an emptied job has lost these too: its sections are recomputed
        plans = self.plans(settings)
        self.use_loras(settings.loras)
        cond = self.condition(settings)
        timeline = list(settings.section_prompts) if settings.section_prompts else parse_timeline(settings.prompt)
        layout = self.source_layout(settings)
        extended = layout.sections if layout is not None else 0
        backwards = plans[0].mode == "inverted"
        overlap = overlap_frames(settings.window)
        cfg = self.c.source.cfg(settings.cfg)
        cache = resolve_cache(settings.cache, self.c.source.extra)
        run = _Run(
            plans=plans,
            cond=cond,
            prompts=[""] * extended + prompts_for_sections(timeline, plans[extended:]),  # none for the video's
            negative=self.encode_text(settings.negative_prompt) if cfg != 1.0 else None,
            cfg=cfg,
            store=LatentStore(job, plans, cond.start_latent, cond.end_latent, keyframes=cond.keyframe_latents),
            generator=torch.Generator("cpu").manual_seed(settings.seed),
            backwards=backwards,
            assembler=Assembler(backwards, overlap),
            layout=assembly_layout([frame_count(len(decode_span(plan))) for plan in plans], backwards, overlap),
            decoder=_span_decoder(self.c.vae),
            cache=cache,
            mag_ratios=magcache_ratios(self.c.source.extra, settings.model) if cache.method == "magcache" else None,
            overrides=overrides_for(settings.keyframes, plans),
            color_match=settings.color_match,
            extended=extended,
        )
        job.repair_state()
        if layout is not None:  # before the first new section: the video's frames as finished sections
            prepare_source(job, plans, layout, cond.size, self.c.vae.encode, run.generator.get_state(), overlap)
        if job.finished > len(plans):
            raise ValueError(f"{job.root} counts {job.finished} finished sections, but its settings make {len(plans)}")
        if job.finished == len(plans) and not self._damaged_segments(job, run, job.finished):
            return run  # finished and whole: only the final video is (re)made
        self._check_sections(job, run)
        if job.finished:
            run.generator.set_state(job.rng_state(job.finished - 1))
        self._restore_assembly(job, run)
        return run

    def _check_sections(self, job: JobDir, run: "_Run") -> None:
        """Every finished section must be there, intact and of this model's shape.

        A missing one is computed again (with the ones after it: sampling is deterministic, so
        they come out the same); a damaged or foreign one is an error that names the file.
        """
        h, w = run.cond.start_latent.shape[-2:]
        channels = self.c.transformer.config.in_channels
        rng_size = run.generator.get_state().numel()
        for plan in run.plans[: job.finished]:
            path = job.section_path(plan.step)
            try:
                section = job.read_section(plan.step)
            except FileNotFoundError:
                log.warning("%s is missing: sections %d/%d onwards will be computed again", path, plan.step + 1,
                            plan.count)
                job.rollback(plan.step)
                return
            if section["model"] is not None and section["model"] != job.settings.model:
                raise ValueError(f"{path} was made by the model {section['model']!r}, not by this job's "
                                 f"{job.settings.model!r}: a job cannot be continued with another model")
            expected = (1, channels, len(plan.positions), h, w)
            if tuple(section["latents"].shape) != expected:
                raise ValueError(f"{path} holds latents of shape {tuple(section['latents'].shape)}, but this job's "
                                 f"model and resolution make {expected}: it was made by another model or resolution")
            if section["rng_state"].numel() != rng_size or section["rng_state"].dtype != torch.uint8:
                raise ValueError(f"section file {path} is damaged (its random state is not a CPU generator's): "
                                 f"delete it and resume again to recompute sections {plan.step + 1} onwards")
            run.store.put(plan.step, section["latents"])

    def _damaged_segments(self, job: JobDir, run: "_Run", upto: int) -> list[int]:
        """Steps before ``upto`` whose segment is missing, unreadable or of the wrong length."""
        damaged = []
        for step in run.needed_segments(upto):
            path = job.segment_path(step)
            try:
                ok = job.intact(path) and segment_frames(path) == run.layout[step][0]
            except ValueError:
                ok = False
            if not ok:
                damaged.append(step)
        return damaged

    def _restore_assembly(self, job: JobDir, run: "_Run") -> None:
        """The pending frames and segments of the finished sections: read back, or rebuilt from the latents."""
        done = job.finished
        pending = job.load_pending() if done else None
        want = run.layout[done - 1][1] if done else 0
        pending_ok = (want == 0 and pending is None) or (
            pending is not None and pending.shape[0] == want and pending.shape[1:3] == run.cond.size)
        damaged = self._damaged_segments(job, run, done)
        if pending_ok and not damaged:
            run.assembler.pending = pending
            return
        # pending frames never kept (a branch of framepack.redo) are rebuilt without alarm
        lost = not pending_ok and (job.pending_path(done - 1).exists()
                                   or job.pending_path(done - 1).relative_to(job.root).as_posix() in job.checksums)
        what = [str(job.segment_path(step)) for step in damaged] + ([str(job.pending_path(done - 1))] if lost else [])
        if what:
            log.warning("missing or unreadable: %s; rebuilding from the saved latents", ", ".join(what))
        # the same decode and blend as when the sections were made, so the pieces come out the same
        assembler = Assembler(run.backwards, run.assembler.overlap)
        for plan in run.plans[:done]:
            clip = run.matched(plan, to_frames(self.c.vae.decode(run.store.gather(decode_span(plan)))))
            final = assembler.add(clip, last=plan.is_last)
            if plan.step in damaged:
                write_segment(job.segment_path(plan.step), to_uint8(final), job.settings.crf)
                job.note(job.segment_path(plan.step))
            release_freed_memory()
        if done and done < len(run.plans):
            job.save_pending(done - 1, assembler.pending)
        job.write_state()  # the rebuilt pieces' checksums
        run.assembler.pending = assembler.pending

    def _section(self, plan: SectionPlan, job: JobDir, run: "_Run", on_event: Callable[[Event], None],
                 should_stop: Callable[[], bool]) -> Callable[[], None]:
        settings = job.settings
        cond = replace(run.cond, image_embeds=run.cond.section_embeds(run.overrides[plan.step]))
        t0 = time.perf_counter()
        on_event(SectionStarted(plan.step, plan.count, run.prompts[plan.step]))
        h, w = cond.start_latent.shape[-2:]
        # one CPU generator, one draw per section in generation order: a seed means what it means
        # in the reference, whatever the device
        noise = torch.randn((1, self.c.transformer.config.in_channels, settings.window, h, w),
                            generator=run.generator, dtype=torch.float32)
        sigmas = sigma_schedule(settings.steps, tokens=settings.window * h * w // 4,
                                shift=self.c.source.shift(settings.shift))

        def progress(step: Step) -> None:
            _check_finite(step.x0, plan, "latents")  # fail at the first step, not after all of them
            on_event(StepProgress(plan.step, plan.count, step.i, step.n, preview_frames(step.x0.cpu(), cond.rgb_map)))
            if should_stop():
                raise Cancelled(f"stopped during section {plan.step + 1}/{plan.count}; resume with the job directory")

        sampler = get_sampler(settings.sampler)
        # one step cache per section: its state never crosses from one section to the next
        with section_cache(self.c.transformer, run.cache, settings.steps, run.mag_ratios) as cache:
            denoise = self._denoiser(plan, run.store, cond, self.encode_text(run.prompts[plan.step]), run.negative,
                                     run.cfg, settings, cache)
            latents = sampler(denoise, noise.to(self.device), sigmas.to(self.device), callback=progress).float().cpu()
        _check_finite(latents, plan, "latents")
        run.store.put(plan.step, latents)

        clip = run.decoder(decode_span(plan), run.store.gather)
        _check_finite(clip, plan, "pixels")  # both checked before anything of the section is written
        job.save_latents(plan.step, latents, run.generator.get_state())
        final = run.assembler.add(run.matched(plan, clip), last=plan.is_last)
        # freed heap back to the OS once a section (not also before the decode: the pages it returns
        # are faulted back at once; the peak stays flat over a long video either way)
        release_freed_memory()
        on_event(SectionFinished(plan.step, plan.count, time.perf_counter() - t0))
        return partial(self._write_section, plan, job, final, run.assembler.pending, run.backwards, on_event)

    def _write_section(self, plan: SectionPlan, job: JobDir, final: np.ndarray, pending: np.ndarray | None,
                       backwards: bool, on_event: Callable[[Event], None]) -> None:
        """What a section leaves on disk, in the video thread: its frames that no later section
        changes (an mp4 segment), the frames a later blend still needs, then the commit that makes it
        count; then, unless it is the last, the provisional video. A run killed before the commit
        computes the section again on resume (its latents and RNG state make it the same section)."""
        if len(final):
            write_segment(job.segment_path(plan.step), to_uint8(final), job.settings.crf)
            job.note(job.segment_path(plan.step))
        job.save_pending(plan.step, pending)
        job.commit(plan.step)
        if not plan.is_last:
            self._provisional(job, job.segments()[-PROVISIONAL_SECTIONS:], pending, backwards, on_event)

    def events(self, job: JobDir, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """The same run as a stream: iterate events while it works in a background thread.

        An exception in the run (including :class:`Cancelled`) is re-raised by the iterator.
        """
        q: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.run(job, on_event=q.put, should_stop=should_stop)
            except BaseException as exc:  # handed to the consumer, re-raised there
                failure.append(exc)
            finally:
                q.put(None)

        thread = threading.Thread(target=work, name="framepack-run", daemon=True)
        thread.start()
        while (event := q.get()) is not None:
            yield event
        thread.join()
        if failure:
            raise failure[0]

    # ---- pieces ------------------------------------------------------------------------------------------

    def _denoiser(self, plan: SectionPlan, store: LatentStore, cond: Conditioning, text: TextEmbedding,
                  negative: TextEmbedding | None, cfg: float, settings: GenerationSettings, cache=None):
        model, device = self.c.transformer, self.device
        history = [
            HistoryInput(level.kernel, store.gather(level.sources).to(device), torch.tensor(level.indices, device=device))
            for level in plan.levels
        ]
        window = torch.tensor(plan.window_indices, device=device)
        embeds = None if cond.image_embeds is None else cond.image_embeds.to(device)
        prompts = [text] if negative is None else [text, negative]
        batch = len(prompts)
        # conditional and unconditional branches share one batched forward (different text
        # lengths are handled by the model's key mask)
        states, mask, pooled = (t.to(device) for t in stack_embeddings(prompts))
        guidance = torch.full((batch,), settings.distilled_guidance * TIMESTEP_SCALE, device=device)
        if model.dtype != torch.float32:
            guidance = guidance.to(model.dtype).float()  # the reference feeds bf16 timesteps (10.0 -> 9984)
        expand = [HistoryInput(h.kernel, h.latents.expand(batch, -1, -1, -1, -1), h.indices) for h in history]
        # both CFG branches are one batch, so a step cache makes one decision for both; the memo
        # keeps what the history alone decides (its tokens, the RoPE tables) for all of the section's steps
        per_section = {"memo": {}} if cache is None else {"memo": {}, "cache": cache}

        def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            t = (sigma * TIMESTEP_SCALE).expand(batch)
            if model.dtype != torch.float32:
                t = t.to(model.dtype).float()
            with torch.no_grad():
                v = model(x.expand(batch, -1, -1, -1, -1), t, states, mask, pooled,
                          None if embeds is None else embeds.expand(batch, -1, -1), window, expand,
                          guidance if model.config.guidance_embeds else None, **per_section).float()
            return guided_velocity(v[:1], v[1:] if batch > 1 else None, cfg, settings.guidance_rescale)

        return velocity_denoiser(velocity)

    @staticmethod
    def _provisional(job: JobDir, segments: list[Path], pending: np.ndarray | None, backwards: bool,
                     on_event: Callable[[Event], None]) -> None:
        """The newest part of the video: recent segments plus the frames a later blend will still touch."""
        parts = list(reversed(segments)) if backwards else list(segments)
        if pending is not None and len(pending):
            preview = job.root / "video" / PENDING_PREVIEW
            write_segment(preview, to_uint8(pending), job.settings.crf)
            parts = [preview] + parts if backwards else parts + [preview]
        concat_segments(parts, job.provisional_path)
        on_event(VideoUpdated(job.provisional_path, final=False))

    @staticmethod
    def _metadata(job: JobDir) -> dict:
        meta = embedded_settings(job.settings.to_dict(), job.input_names)
        meta["framepack"]["loras"] = recorded_loras(job.settings.loras)  # by file name, as the images
        meta["framepack"]["keyframes"] = [{"seconds": k.seconds, "image": Path(k.image).name} for k in job.settings.keyframes]
        if job.settings.extend is not None:  # by file name, as the images
            meta["framepack"]["extend"] = job.input_names.get("extend") or Path(job.settings.extend).name
        return meta


def job_mode(settings: GenerationSettings, source: ModelSource) -> Mode:
    """The section order a job samples in: the request, else the model's default for a job like it.
    Derived, not stored: a resumed job plans the same sections as long as its model is the same."""
    plain = settings.end_image is None and not settings.keyframes and settings.extend is None
    return source.sampling_mode(settings.mode, settings.seconds, plain)


def job_source_layout(settings: GenerationSettings, mode: Mode, schedule: ContextSchedule):
    """Where the frames of the video a job extends sit (framepack.extend); None for other jobs."""
    if settings.extend is None:
        return None
    return source_layout(settings.extend, settings.window, mode, schedule.frames)


def plan_job(settings: GenerationSettings, mode: Mode, config: TransformerConfig) -> list[SectionPlan]:
    """The sections of a job, in generation order, in this mode (:func:`job_mode`) for a model of
    this config (its context schedule and inverted gaps; no weights needed: framepack.redo plans a
    job's branch from its settings alone)."""
    schedule = config.schedule
    count = section_count(settings.seconds, settings.window)
    layout = job_source_layout(settings, mode, schedule)
    count += layout.sections if layout is not None else 0  # an extended video's frames: finished sections
    plans = plan_sections(count, mode, schedule, settings.window, end_image=settings.end_image is not None,
                          max_padding=config.max_inverted_padding)
    return with_keyframes(plans, overrides_for(settings.keyframes, plans))  # refused outside inverted mode


def blank_start_frame(resolution: int) -> np.ndarray:
    """Text-to-video's start frame: a square-bucket frame of :data:`BLANK_START_RGB`, (H, W, 3) uint8."""
    height, width = nearest_bucket(1, 1, resolution)
    return np.broadcast_to(np.array(BLANK_START_RGB, dtype=np.uint8), (height, width, 3)).copy()


def _settle(writes: Future | None) -> None:
    """Wait for a section's writes while another exception ends the run; theirs is logged, not raised."""
    if writes is not None and (error := writes.exception()) is not None:
        log.warning("writing the last finished section failed as well: %s", error)


def _span_decoder(vae) -> SpanDecoder:
    reuse = _decodes_latents_alone(vae)
    return SpanDecoder(vae.decode, reuse=reuse, context=reuse and bool(vae.config.decoder_context))


def _decodes_latents_alone(vae) -> bool:
    """Whether each latent decodes to the same frames whatever its neighbours in the span (then
    :class:`SpanDecoder` reuses them, minding a decoder that reads the previous latent too): the demo
    model's small VAE, on the CPU, where that is tested bit for bit. Not on CUDA, where cuDNN may
    pick another kernel for another batch size."""
    from .small_vae import SmallVideoAutoencoder

    return isinstance(vae, SmallVideoAutoencoder) and next(vae.parameters()).device.type == "cpu"


def _check_finite(values: torch.Tensor | np.ndarray, plan: SectionPlan, what: str) -> None:
    finite = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not finite:
        part = "model" if what == "latents" else "VAE"
        raise NonFiniteSection(f"section {plan.step + 1}/{plan.count} produced non-finite {what} (NaN/Inf): "
                               f"the {part} weights may be diverged")
