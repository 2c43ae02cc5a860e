"""Extend a video: ``generate --extend VIDEO.mp4`` continues any video, forward or backward.

Design: the video's frames become *finished sections* of the job, so the planner, the context
packing, the resume logic and the assembly of the mp4 all work unchanged.

- The job is planned as one longer video: ``S`` source sections (whole windows of the video,
  enough to fill the context schedule: three at the released 1x/2x/4x schedule of 19 latents)
  plus the sections asked for. In forward (F1) and vanilla mode the first ``S`` sections in time
  are the video's last ``S * 4 * window + 1`` frames and the new sections follow; in inverted mode
  sections are made from the end, so the video's first ``S * 4 * window + 1`` frames are the
  *future* (the last ``S`` sections) and the new sections come before them. Either way the
  source sections are generation steps ``0 .. S-1``: the first steps the pipeline would make.
- Before the first new section, the pipeline seeds the job (:func:`seed_job`): those frames,
  resized and cropped to the job's size as the start image is, are encoded by the VAE; each source
  section's latents are saved as if sampled (with the random state of a fresh generator for the
  job's seed, so the first new section draws what a plain job's first section draws), its frames
  are assembled exactly as a decoded section's would be, and the step counter is committed past
  them. Every later section then reads the video's latents through the planner's sources (1x, 2x,
  4x history in forward mode; the nearest future in inverted mode) like any finished section's.
- No seam: the first new section is decoded together with the neighbouring source window (the
  span the overlap blend needs) and blended over ``(window - 1) * 4 + 1`` frames with the
  video's own frames, as two generated sections are. :func:`seam` measures it.
- The output is the whole original (re-encoded at the job's size) plus the new frames: the frames
  no source section holds go into one more segment (``video/source.mp4``), before the sections in
  forward mode, after them in inverted mode. In inverted mode the video's first four frames fall
  on the one latent the layout cannot take from the video (a window's first latent stands for
  four frames, the video's first frame for one); they are made by the new section.
- The start image: ``--image`` if given; otherwise a frame of the video: the first frame of the
  part used as context in forward mode (it is that part's first latent, which the F1 layout
  anchors on), the video's first frame in inverted mode (the new frames then lead into it).
- The video is read at the models' 30 fps by presentation time (:func:`framepack.video.resample`:
  frame k is the one showing at k / 30 s), so a 60 fps or 24 fps video keeps its speed; a 30 fps
  video is read frame for frame. Counting (:func:`count_frames`, from the packets' timestamps) and
  decoding follow the same rule, so the plan and the frames agree.
- The video is copied into the job directory (``inputs/extend.*``) with its sha256 in the
  settings, so a resume uses the same frames and a changed copy is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from .planning import FPS, TEMPORAL_RATIO, SectionPlan, decode_span

log = logging.getLogger(__name__)

SOURCE_SEGMENT = "source.mp4"  # in JOB/video: the original's frames that no source section holds


# ---- reading the video ----------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    if not Path(path).is_file():
        raise ValueError(f"video to extend not found: {path}")
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def count_frames(path: str | Path) -> int:
    """Frames of the video's first video stream at :data:`~framepack.planning.FPS`, as
    :func:`read_video` gives them, counted from its packets' timestamps in display order (nothing
    decoded).

    One-line ValueError for a missing, unreadable, frameless or stream-less file, or a packet
    without a timestamp.
    """
    import av

    from .video import resample, timestamp

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"video to extend not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            packets = (packet for packet in container.demux(container.streams.video[0]) if packet.size)
            try:
                times = [timestamp(packet, FPS) for packet in packets]
            except ValueError as exc:  # a packet without a timestamp
                raise ValueError(f"cannot read the video to extend {path} ({_first_line(exc)})") from None
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the video to extend {path} ({_first_line(exc)})") from None
    if not times:
        raise ValueError(f"{path} holds no frames")
    # packets come in decoding order; the frames they make are shown in timestamp order
    return sum(1 for _ in resample(((time, time) for time in sorted(times)), FPS))


def _frames(path: str | Path) -> Iterator[np.ndarray]:
    """The video's frames at :data:`~framepack.planning.FPS` (:func:`framepack.video.resampled_frames`),
    (H, W, 3) uint8; one-line ValueError for what cannot be read."""
    import av

    from .video import resampled_frames

    try:
        yield from resampled_frames(path, FPS)
    except (av.FFmpegError, OSError, ValueError) as exc:  # ValueError: a frame without a timestamp
        raise ValueError(f"cannot read the video to extend {path} ({_first_line(exc)})") from None


def read_video(path: str | Path, height: int, width: int) -> np.ndarray:
    """Every frame at :data:`~framepack.planning.FPS` (:func:`_frames`), resized and centre-cropped to
    (height, width) as a start image is: (T, H, W, 3) uint8. Frames are resized one at a time, so a
    large video never sits in memory at its own size."""
    from .images import resize_and_crop

    frames: list[np.ndarray] = []
    previous = None
    for pixels in _frames(path):
        if pixels is not previous:  # a frame shown again (a lower source rate) is resized once
            previous, resized = pixels, resize_and_crop(pixels, height, width)
        frames.append(resized)
    if not frames:
        raise ValueError(f"{path} holds no frames")
    return np.stack(frames)


def start_frame(path: str | Path, layout: SourceLayout) -> np.ndarray:
    """The frame :meth:`SourceLayout.start_frame` names (an index into :func:`read_video`'s frames),
    at the video's own size: (H, W, 3) uint8."""
    with closing(_frames(path)) as frames:
        frame = next(islice(frames, layout.start_frame(), None), None)
    if frame is None:
        raise ValueError(f"{path} decodes to fewer frames than its packets count: re-encode it")
    return frame


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else exc.__class__.__name__


# ---- where the video goes in the plan: pure ------------------------------------------------------------


def min_frames(window: int) -> int:
    """A video must fill one section's window: ``4 * window + 1`` frames (37 at window 9)."""
    return TEMPORAL_RATIO * window + 1


def source_sections(frames: int, window: int, history: int) -> int:
    """Whole windows of the video taken as finished sections: enough to fill ``history`` context
    latents (the schedule's), fewer when the video is shorter. ValueError if it fills none."""
    if frames < min_frames(window):
        raise ValueError(f"the video to extend has {frames} frame{'s' if frames != 1 else ''}; extending needs at "
                         f"least {min_frames(window)} (one section's window)")
    return min((frames - 1) // (TEMPORAL_RATIO * window), math.ceil(history / window))


@dataclass(frozen=True)
class SourceLayout:
    """Where the video's frames sit in the job: the first ``sections`` generation steps."""

    frames: int  # in the video
    sections: int  # source sections
    window: int
    backwards: bool  # inverted mode: the video is the future

    @property
    def used(self) -> int:
        """Frames encoded into the source sections' latents (one latent of 1 frame, then 4 each)."""
        return TEMPORAL_RATIO * self.window * self.sections + 1

    @property
    def first_used(self) -> int:
        """Index in the video of the first frame encoded: the end part forward, the start backward."""
        return 0 if self.backwards else self.frames - self.used

    def outside(self) -> slice:
        """The video's frames no source section holds (they go into ``video/source.mp4``)."""
        return slice(self.used, self.frames) if self.backwards else slice(0, self.first_used)

    def start_frame(self) -> int:
        """The frame used as start image when none is given (see the module docstring)."""
        return self.first_used


def check_video(path: str | Path, window: int) -> None:
    """One line, before a model loads, for a video that cannot be extended (unreadable, no frames, too short)."""
    source_sections(count_frames(path), window, history=1)


def source_layout(path: str | Path, window: int, mode: str, history: int) -> SourceLayout:
    """The layout of the video at ``path`` in a job of this window, mode and context length."""
    frames = count_frames(path)
    return SourceLayout(frames, source_sections(frames, window, history), window, mode == "inverted")


def position_offset(plans: list[SectionPlan], sections: int) -> int:
    """Video position of the encoded frames' first latent (latent k of them sits at offset + k)."""
    return min(p for plan in plans[:sections] for p in plan.positions) - 1


def span_frames(span: tuple[int, ...] | list[int], offset: int) -> list[int]:
    """Frames (indices into the encoded frames) a decode of ``span`` makes, in order: a span's
    first latent makes one frame (its last), every other latent k its four, 4k-3 .. 4k."""
    head, *rest = (p - offset for p in span)
    frames = [TEMPORAL_RATIO * head]
    for k in rest:
        frames.extend(range(TEMPORAL_RATIO * k - TEMPORAL_RATIO + 1, TEMPORAL_RATIO * k + 1))
    return frames


# ---- seeding the job -----------------------------------------------------------------------------------


def seed_job(job, plans: list[SectionPlan], layout: SourceLayout, frames: np.ndarray,
             encode: Callable, rng_state, overlap: int) -> None:
    """Write the source sections of ``job`` (steps 0 .. S-1) and commit them.

    ``frames``: the whole video at the job's size, (T, H, W, 3) uint8; ``encode``: the VAE's
    (1, 3, T, H, W) in [-1, 1] -> (1, C, latents, h, w); ``rng_state``: what a fresh generator for
    the job's seed holds. Each section's latents, mp4 segment and (after the last) pending frames
    are what a sampled section leaves, so the pipeline continues as on a resume.
    """
    from .video import Assembler, to_pixels, to_uint8, write_segment

    if len(frames) != layout.frames:
        raise ValueError(f"{job.settings.extend} decodes to {len(frames)} frames at {FPS} fps, but its packets "
                         f"count {layout.frames}: re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)")
    used = frames[layout.first_used : layout.first_used + layout.used]
    latents = encode(to_pixels(used))  # (1, C, 1 + S * window, h, w)
    offset = position_offset(plans, layout.sections)
    assembler = Assembler(layout.backwards, overlap)
    for plan in plans[: layout.sections]:
        own = latents[:, :, [p - offset for p in plan.positions]]
        job.save_latents(plan.step, own, rng_state)
        # the frames a decode of the section's span would give, taken from the video itself
        final = assembler.add(used[span_frames(decode_span(plan), offset)].astype(np.float32), last=False)
        if len(final):
            write_segment(job.segment_path(plan.step), to_uint8(final), job.settings.crf)
            job.note(job.segment_path(plan.step))
    write_source_segment(job, frames, layout)
    job.save_pending(layout.sections - 1, assembler.pending)
    job.commit(layout.sections - 1)
    log.info("extending %s: %d of its %d frames are %d finished section(s)", job.settings.extend, layout.used,
             layout.frames, layout.sections)


def prepare_source(job, plans: list[SectionPlan], layout: SourceLayout, size: tuple[int, int], encode: Callable,
                   rng_state, overlap: int) -> None:
    """Before a run of an extending job: its copy of the video checked, its source sections written
    if they are not yet (a fresh job), the original's other frames written if their segment is lost."""
    check_copy(job)
    seeded = job.finished >= layout.sections
    # a branch (framepack.redo) that keeps exactly the video's sections carries no pending frames: the
    # pipeline would rebuild them from the latents, the video's own frames are what the job blended
    unblended = job.finished == layout.sections and not job.pending_path(layout.sections - 1).exists()
    outside = layout.outside()
    whole = outside.stop <= outside.start or job.intact(source_segment(job))
    if seeded and whole and not unblended:
        return
    frames = read_video(job.settings.extend, *size)
    if not seeded or unblended:
        seed_job(job, plans, layout, frames, encode, rng_state, overlap)
        return
    log.warning("%s is missing or damaged: written again from %s", source_segment(job), job.settings.extend)
    write_source_segment(job, frames, layout)
    job.write_state()


def source_segment(job) -> Path:
    return job.root / "video" / SOURCE_SEGMENT


def write_source_segment(job, frames: np.ndarray, layout: SourceLayout) -> None:
    from .video import write_segment

    outside = frames[layout.outside()]
    if len(outside):
        write_segment(source_segment(job), outside, job.settings.crf)
        job.note(source_segment(job))


def with_source(job, segments: list[Path], backwards: bool) -> list[Path]:
    """The final video's segments in time order, the original's frames outside the sections included."""
    path = source_segment(job)
    if not path.exists():
        return segments
    return segments + [path] if backwards else [path] + segments


def check_copy(job) -> None:
    """The job's copy of the video must be the one its settings name (sha256)."""
    recorded = job.settings.extend_sha256
    if recorded is not None and file_sha256(job.settings.extend) != recorded:
        raise ValueError(f"{job.settings.extend}, the job's copy of the video it extends, has changed (its sha256 "
                         "differs from the settings'): put the original back under this name and resume again")


# ---- the seam: measured ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seam:
    join: float  # mean abs difference between the frames on either side of the join (0..255)
    inside: tuple[float, ...]  # the same between consecutive frames inside the original clip
    new: tuple[float, ...] = ()  # and inside the new frames: a join above both is a seam, one within
    # the new part's range but above the original's is the new part's own flicker

    @property
    def within(self) -> bool:
        """The join is no larger than the largest difference inside the original."""
        return self.join <= max(self.inside)


def frame_differences(frames: np.ndarray) -> np.ndarray:
    """Mean abs difference between consecutive frames, (T-1,), on the 0..255 scale."""
    f = frames.astype(np.float32)
    return np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3))


def seam(original: np.ndarray, extended: np.ndarray, backwards: bool, overlap: int) -> Seam:
    """The frame differences across the join of ``extended`` (the original's frames plus the new
    ones, at the same size) against those inside ``original``. The join counts as the largest
    difference from the last new frame into the video and across the blended ``overlap`` frames
    (see the module docstring for where they lie), so a jump anywhere there counts; not the step
    between two of the video's own frames. The blend's outer end *is* the video's frame (its weight
    there is 1, :func:`framepack.video.soft_join`), so the step from it to the next frame of the
    video is the original's own."""
    inside = frame_differences(original)
    diffs = frame_differences(extended)
    new = len(extended) - len(original)
    blended = max(overlap - 1, 0)  # the blend's frames that are not the video's own
    if backwards:  # new frames, then the slot of the video's first latent (4 frames), then the blend
        region = diffs[new : new + TEMPORAL_RATIO + blended]
    else:  # the blend (the video's last frames into their reconstruction), then the first new frame
        region = diffs[len(original) - 1 - blended : len(original)]
    own = diffs[:new] if backwards else diffs[len(original) :]  # the differences on the new side of the region
    return Seam(float(region.max()), tuple(float(d) for d in inside), tuple(float(d) for d in own))
