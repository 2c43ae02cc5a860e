"""Redo (branch) one section of a job: a new job that keeps what does not depend on it.

A section depends on another when it reads one of the other's latents in its packed context
(the planner's sources), directly or through a section that does. Sections are made in generation
order and only read what already exists, so the sections to make again are section K itself and
every later one in generation order that reads, in its context, a section being made again:
:func:`regenerated_steps`, a pure function over the :class:`~framepack.planning.SectionPlan` list.
Which sections that keeps depends on the mode: forward (F1) makes sections in time order, so the
sections *before* K in the video are kept; inverted makes them from the end, so the sections
*after* K are kept, and redoing the first section of an inverted video keeps all the others.

Section numbers are 1-based in video (time) order: "section 2" is the second part of the video,
whatever the order it was made in.

The branch is an ordinary job directory: its kept sections (latents, random state, mp4 segments)
are hard links to the original's files (copies where links cannot be made; the pipeline never
writes into a file, it replaces it, so the original is never touched), its state counts them as
finished, and the pipeline continues it exactly like a resumed job. With the same seed and prompt
the random state saved after the last kept section makes the regenerated sections bit-identical;
``--seed S`` replaces that state by a generator seeded with S, ``--prompt P`` changes the prompt of
section K only (the others keep theirs, as section prompts). ``redo.json`` records where the
branch came from.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .extend import SOURCE_SEGMENT
from .jobs import ORIGIN, JobDir, write_json
from .planning import SectionPlan, parse_timeline, prompts_for_sections, section_count
from .settings import GenerationSettings

log = logging.getLogger(__name__)

RECORD = "redo.json"  # in the branch: the original job, the section redone, the seed and prompt used


# ---- which sections: pure --------------------------------------------------------------------------------


def video_order(plans: list[SectionPlan]) -> list[SectionPlan]:
    """The plans sorted by time in the video (generation order is reversed in inverted mode)."""
    return sorted(plans, key=lambda plan: plan.positions[0])


def regenerated_steps(plans: list[SectionPlan], section: int, given: int = 0) -> list[int]:
    """Generation steps to make again when section ``section`` (1-based, video order) is redone.

    A step is made again if it is that section's, or if it comes after it in generation order and
    reads, in its context, a position written by a step made again. Sorted; the others are kept.
    The first ``given`` steps (the frames of a video the job extends, framepack.extend) are never
    made again and not counted among the sections.
    """
    made = plans[given:]
    if not 1 <= section <= len(made):
        raise ValueError(f"section must be between 1 and {len(made)} (the video's sections, in time order), "
                         f"got {section}")
    target = video_order(made)[section - 1].step
    redone: set[int] = set()
    written: set[int] = set()  # video positions of the steps made again
    for plan in sorted(plans, key=lambda p: p.step):
        reads = {source for source in plan.context_sources() if isinstance(source, int)}
        if plan.step == target or (plan.step > target and reads & written):
            redone.add(plan.step)
            written.update(plan.positions)
    return sorted(redone)


def kept_prefix(plans: list[SectionPlan], redone: list[int]) -> int:
    """How many steps, from the first, a branch keeps: a job continues from a prefix in generation
    order, so a step made again ends it (any kept step after it would be made again as well)."""
    return min(redone, default=len(plans))


def branch_prompts(settings: GenerationSettings, plans: list[SectionPlan], section: int,
                   prompt: str) -> tuple[str, ...]:
    """Every made section's prompt in video order, section ``section``'s replaced by ``prompt``
    (``plans``: the sections the job makes, without an extended video's)."""
    timeline = list(settings.section_prompts) if settings.section_prompts else parse_timeline(settings.prompt)
    by_step = dict(zip((plan.step for plan in plans), prompts_for_sections(timeline, plans)))
    texts = [by_step[plan.step] for plan in video_order(plans)]
    texts[section - 1] = prompt
    return tuple(texts)


def check_request(settings: GenerationSettings, section: int, prompt: str | None, seed: int | None = None) -> None:
    """The problems a redo request can have before a model is loaded: one line each."""
    count = section_count(settings.seconds, settings.window)
    if not 1 <= section <= count:
        raise ValueError(f"--section must be between 1 and {count} (the job's sections, in time order), got {section}")
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty")
    if seed is not None:
        settings.replace(seed=seed)  # a seed out of range: the settings' own one-line error


def model_plans(settings: GenerationSettings) -> tuple[list[SectionPlan], int]:
    """The job's plans and how many of its first steps hold an extended video, from its settings
    and its model's configs alone (no weights: the web app branches a job before a worker loads
    anything). The transformer's config is its config.json where it is local, else the released
    models' (framepack-i2v and -f1 use it)."""
    from .components import resolve_model
    from .config import TransformerConfig, resolve_config
    from .pipeline import job_mode, job_source_layout, plan_job

    source = resolve_model(settings.model)
    local = Path(source.transformer)
    config = resolve_config(local) if (local / "config.json").is_file() else TransformerConfig()
    mode = job_mode(settings, source)
    layout = job_source_layout(settings, mode, config.schedule)
    return plan_job(settings, mode, config), 0 if layout is None else layout.sections


# ---- the branch on disk ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Branch:
    section: int  # 1-based, video order
    kept: int  # steps 0..kept-1 are linked from the original
    redone: tuple[int, ...]  # generation steps made again


def plan_branch(plans: list[SectionPlan], section: int, given: int = 0) -> Branch:
    redone = regenerated_steps(plans, section, given)
    return Branch(section, kept_prefix(plans, redone), tuple(redone))


def branch_job(original: JobDir, plans: list[SectionPlan], section: int, out: Path, root: Path,
               seed: int | None = None, prompt: str | None = None, given: int = 0) -> JobDir:
    """Make the branch's job directory at ``root`` (its video: ``out``); the original is only read.

    ``given``: the generation steps that hold a video the job extends (kept, never counted). The
    original must have finished every kept section; it is locked while it is read, so a run on it
    cannot change it under us.
    """
    check_request(original.settings, section, prompt, seed)
    branch = plan_branch(plans, section, given)
    with original.locked():
        if original.finished < branch.kept:
            raise ValueError(f"{original.root} has {original.finished} of {len(plans)} sections finished; redoing "
                             f"section {section} keeps {branch.kept}: resume it first "
                             f"(framepack generate --resume {original.root})")
        settings = original.settings
        if prompt is not None:
            settings = settings.replace(section_prompts=branch_prompts(settings, plans[given:], section, prompt))
        if seed is not None:
            settings = settings.replace(seed=seed)
        job = JobDir.create(root, settings, out)
        try:
            # the video records the original's input names, not those of its copies
            write_json(job.root / ORIGIN, {"out": str(job.out), **original.input_names})
            job.input_names = dict(original.input_names)
            _link_kept(original, job, branch.kept, seed)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    write_json(job.root / RECORD, {"from": str(original.root.resolve()), "section": section,
                                   "kept_steps": list(range(branch.kept)), "redone_steps": list(branch.redone),
                                   "seed": seed, "prompt": prompt})
    log.info("branch %s keeps generation steps %s, makes %s again", job.root, list(range(branch.kept)),
             list(branch.redone))
    return job


def _link_kept(original: JobDir, job: JobDir, kept: int, seed: int | None) -> None:
    """Sections and segments of steps 0..kept-1 into ``job``; then its state counts them (the commit).

    The pending frames after the last kept step are not carried (a finished job has dropped them):
    the pipeline rebuilds them from the kept latents, exactly as they were made.
    """
    for step in range(kept):
        _link(original.section_path(step), job.section_path(step))
        segment = original.segment_path(step)
        if segment.exists():
            _link_piece(original, job, segment)
    source = original.root / "video" / SOURCE_SEGMENT  # an extended video's frames outside its sections
    if source.exists():
        _link_piece(original, job, source)
    if kept and seed is not None:
        # the regenerated sections draw from the new seed: the state a resume starts from is replaced
        # (a new file in the branch; the link to the original's is broken by the rename, not written through)
        last = job.read_section(kept - 1)
        job.save_latents(kept - 1, last["latents"], torch.Generator("cpu").manual_seed(seed).get_state())
    job.finished = kept
    job.write_state()


def _link_piece(original: JobDir, job: JobDir, path: Path) -> None:
    """A video piece of the original into the branch, with its recorded checksum."""
    name = path.relative_to(original.root).as_posix()
    _link(path, job.root / name)
    if name in original.checksums:
        job.checksums[name] = original.checksums[name]


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy does as well
        shutil.copyfile(source, target)


def default_out(original: JobDir, section: int) -> Path:
    """``<video>-redo<K>.mp4`` beside the original video."""
    return original.out.with_name(f"{original.out.stem}-redo{section}.mp4")

