"""From section latents to an mp4 that grows section by section, without holding the video in RAM.

Each section is decoded together with the neighbouring section's latents (the overlap the blend
needs), blended linearly over ``overlap`` frames with what came before, and every frame that no
later section can change is encoded once into an H.264 segment on disk. The frames a later blend
will still touch (the *pending* edge: the head in inverted mode, the tail in forward mode) stay in
memory and in the job directory. Provisional and final videos are made by remuxing the segments
(packet copy, no re-encoding), so each frame is encoded exactly once and memory stays flat.

Videos read as input (``--extend``, ``dataset prepare``) are resampled to a frame rate by
presentation time (:func:`resample`).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import islice
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from .jobs import atomic_write
from .planning import FPS, TEMPORAL_RATIO

if TYPE_CHECKING:
    import av

DEFAULT_CRF = 16
METADATA_KEY = "comment"  # mp4 udta tag that carries the generation settings (JSON)
IMAGE_FIELDS = ("image", "end_image")  # settings that name an input file
# containers store timestamps in ticks of a time base, WebM and Matroska in whole milliseconds: a
# 30 fps frame due at 2/30 s = 66.67 ms is stamped 67 ms, and must still count as showing at 2/30 s
TIMESTAMP_ROUNDING = Fraction(1, 1000)  # seconds
T = TypeVar("T")


def overlap_frames(window: int) -> int:
    """Pixel frames of one window decoded on its own: ``(window - 1) * 4 + 1`` (33 for 9)."""
    return (window - 1) * TEMPORAL_RATIO + 1


def soft_join(earlier: np.ndarray, later: np.ndarray, overlap: int) -> np.ndarray:
    """Join two (T, H, W, 3) float clips whose last/first ``overlap`` frames show the same moment.

    Over the overlap the weight moves linearly from ``earlier`` (1) to ``later`` (0 -> 1).
    """
    if overlap == 0:
        return np.concatenate([earlier, later])
    if len(earlier) < overlap or len(later) < overlap:
        raise ValueError(f"clips of {len(earlier)} and {len(later)} frames cannot overlap by {overlap}")
    w = np.linspace(1.0, 0.0, overlap, dtype=np.float32)[:, None, None, None]
    blended = w * earlier[len(earlier) - overlap :] + (1.0 - w) * later[:overlap]
    return np.concatenate([earlier[: len(earlier) - overlap], blended, later[overlap:]])


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, 3, T, H, W) in [-1, 1], the VAE's input; :func:`to_frames` inverts it."""
    return torch.from_numpy(frames).float().permute(3, 0, 1, 2)[None] / 127.5 - 1


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> (T, H, W, 3) float32 in [0, 255]."""
    return ((pixels[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).numpy()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


@dataclass
class Assembler:
    """Joins decoded sections in arrival order; returns the frames that became final.

    ``backwards`` (inverted mode): sections arrive latest-first, each new clip comes *before* the
    pending head. Otherwise each new clip comes after the pending tail.
    """

    backwards: bool
    overlap: int
    pending: np.ndarray | None = None  # (T, H, W, 3) float32

    def add(self, clip: np.ndarray, last: bool) -> np.ndarray:
        if self.pending is None:
            joined = clip
        elif self.backwards:
            joined = soft_join(clip, self.pending, self.overlap)
        else:
            joined = soft_join(self.pending, clip, self.overlap)
        if last:
            self.pending = None
            return joined
        keep = min(self.overlap, len(joined))
        if self.backwards:
            self.pending, final = joined[:keep], joined[keep:]
        else:
            self.pending, final = joined[len(joined) - keep :], joined[: len(joined) - keep]
        return final


@dataclass
class SpanDecoder:
    """Decodes a section's span of latent positions to (T, H, W, 3) float frames, as :func:`to_frames`
    of one ``decode`` of the whole span would, but decoding each latent once where it can.

    With ``reuse`` (a VAE whose latents decode on their own, like the demo model's small VAE: the
    first latent of a span makes one frame by its own head, every other latent its own four frames
    whatever its neighbours) the frames of a latent decoded for the previous section are kept and the
    span's first latent is decoded with only the latents not seen yet: 10 latents a section instead
    of 18 at window 9. With ``context`` too (a decoder that also reads the latent before the one it
    decodes), each latent not seen yet is decoded right after the one before it in the span: in
    inverted mode that is the span's first latent, in forward mode a kept one, decoded again only as
    context (its frames are the kept ones): 11 latents a section. Without ``reuse`` (the causal
    HunyuanVideo VAE, whose frames depend on every latent before them) every span is decoded whole.
    """

    decode: Callable[[torch.Tensor], torch.Tensor]  # (1, C, T, h, w) latents -> (1, 3, frames, H, W) in [-1, 1]
    reuse: bool
    context: bool = False  # each latent's frames depend on the latent before it
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # position -> its frames, decoded not first in a span

    def __call__(self, span: Sequence[int], gather: Callable[[Sequence[int]], torch.Tensor]) -> np.ndarray:
        head, rest = span[0], list(span[1:])
        missing = {pos for pos in rest if pos not in self.kept}
        batch = decode_batch(span, missing, self.context)
        # a batch of one latent after the head takes another convolution path than a batch of several
        # (it differs in the last bits on CPU), so such a span is decoded whole, as it always was
        if not self.reuse or len(batch) < 3:
            self.kept = {}
            return to_frames(self.decode(gather(span)))
        frames = to_frames(self.decode(gather(batch)))
        made = {pos: group for pos, group in zip(batch[1:], np.split(frames[1:], len(batch) - 1)) if pos in missing}
        # the next section's span shares latents only with this one
        self.kept = {pos: self.kept[pos] if pos in self.kept else made[pos] for pos in rest}
        return np.concatenate([frames[:1], *(self.kept[pos] for pos in rest)])


def decode_batch(span: Sequence[int], missing: set[int], context: bool) -> list[int]:
    """The latents to decode for a span whose ``missing`` ones are not decoded yet: the span's first
    (its one frame), then each missing latent in order, with context preceded by the latent before
    it in the span unless that one is decoded just before it anyway."""
    batch = [span[0]]
    for before, pos in zip(span, span[1:]):
        if pos in missing:
            if context and batch[-1] != before:
                batch.append(before)
            batch.append(pos)
    return batch


def assembly_layout(clip_frames: list[int], backwards: bool, overlap: int) -> list[tuple[int, int]]:
    """(frames made final, frames pending) after each decoded clip of ``clip_frames`` frames.

    Runs the :class:`Assembler` itself on frames of zero pixels, so it cannot disagree with it:
    which segments a job must have and how long its pending edge is.
    """
    assembler = Assembler(backwards, overlap)
    layout = []
    for i, n in enumerate(clip_frames):
        final = assembler.add(np.zeros((n, 0, 0, 3), np.float32), last=i == len(clip_frames) - 1)
        layout.append((len(final), 0 if assembler.pending is None else len(assembler.pending)))
    return layout


# ---- mp4 ----------------------------------------------------------------------------------------------


def write_segment(path: Path, frames: np.ndarray, crf: int = DEFAULT_CRF, fps: int = FPS) -> None:
    """Encode (T, H, W, 3) uint8 as H.264 yuv420p (plays everywhere) atomically."""
    import av

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            # no macroblock-tree rate control: with it, x264 in PyAV 18's wheels encoded the same frames
            # to different pictures from run to run (measured: 4 results in 50 encodes; 1 without), and a
            # resumed job must reproduce the uninterrupted video exactly
            stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    atomic_write(path, encode)


def segment_frames(path: Path) -> int:
    """Frames in one of our segments, counted from its packets (no decoding); ValueError if unreadable."""
    import av

    try:
        with av.open(str(path)) as container:
            return sum(1 for packet in container.demux(container.streams.video[0]) if packet.dts is not None)
    except (av.FFmpegError, OSError, IndexError) as exc:
        raise ValueError(f"video segment {path} is unreadable ({exc})") from None


def concat_segments(segments: Iterable[Path], out: Path, metadata: dict | None = None) -> None:
    """Remux H.264 segments (same size and settings) into one mp4, atomically; no re-encoding.

    Every segment must exist and be readable: a missing one would silently shorten the video.
    """
    import av

    segments = list(segments)
    if not segments:
        raise ValueError("no video segments to join")
    for segment in segments:
        if not Path(segment).is_file():
            raise ValueError(f"video segment {segment} is missing")

    def remux(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4", options={"movflags": "use_metadata_tags+faststart"}) as dst:
            if metadata is not None:
                dst.metadata[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
            with _reading(segments[0]) as first:
                out_stream = dst.add_stream_from_template(first.streams.video[0])
            offset = 0
            for segment in segments:
                with _reading(segment) as src:
                    end = offset
                    for packet in src.demux(src.streams.video[0]):
                        if packet.dts is None:  # the demuxer's flush packet
                            continue
                        packet.pts += offset
                        packet.dts += offset
                        end = max(end, packet.pts + packet.duration)
                        packet.stream = out_stream
                        dst.mux(packet)
                    offset = end

    atomic_write(out, remux)


@contextmanager
def _reading(segment: Path):
    """Open a segment for demuxing; a damaged one is named in a ValueError."""
    import av

    try:
        container = av.open(str(segment))
    except (av.FFmpegError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise
        raise ValueError(f"video segment {segment} is unreadable ({exc})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"video segment {segment} is unreadable (no video stream)")
        yield container


def read_metadata(path: str | Path) -> dict:
    """The settings embedded by :func:`concat_segments`; ValueError if none or unreadable."""
    import av

    try:
        with av.open(str(path)) as container:
            text = container.metadata.get(METADATA_KEY)
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot read video {path}: {exc}") from None
    if not text:
        raise ValueError(f"{path} carries no framepack settings")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"{path} carries metadata that is not framepack settings") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("framepack"), dict):
        raise ValueError(f"{path} carries metadata that is not framepack settings")
    return meta


def embedded_settings(settings: dict, input_names: dict[str, str | None]) -> dict:
    """What a finished mp4 records: the settings, with each input image by its file name only
    (where it lived on the machine that made the video is nobody's business)."""
    recorded = dict(settings)
    for key in IMAGE_FIELDS:
        if recorded.get(key) is not None:
            recorded[key] = input_names.get(key) or Path(str(recorded[key])).name
    return {"framepack": recorded}


def settings_from_video(video: str | Path, image: str | None = None, end_image: str | None = None) -> dict:
    """The settings embedded in a framepack mp4, with its input images found again.

    An mp4 records each input image by file name only; it is looked for beside the video, then in
    the current directory. ``image`` / ``end_image`` (e.g. ``--image``) replace the recorded ones.
    ValueError with one line if the video carries no settings or an image cannot be found.
    """
    video = Path(video)
    settings = dict(read_metadata(video)["framepack"])
    given = {"image": image, "end_image": end_image}
    for key in IMAGE_FIELDS:
        if given[key] is not None:
            settings[key] = given[key]
        elif settings.get(key) is not None:
            settings[key] = str(_find_input(video, key, settings[key]))
    return settings


def _find_input(video: Path, key: str, recorded: Any) -> Path:
    option = "--" + key.replace("_", "-")
    if not isinstance(recorded, str) or not recorded.strip():
        raise ValueError(f"{video} records no usable {key.replace('_', ' ')}; give one with {option}")
    if Path(recorded).is_absolute() and Path(recorded).is_file():
        return Path(recorded)  # a video made before mp4s recorded names only, on this machine
    name = PurePath(recorded.replace("\\", "/")).name
    places = [video.parent / name, Path.cwd() / name]
    for place in places:
        if place.is_file():
            return place
    raise ValueError(f"{video} was made from the image {name!r}, which is neither beside the video nor in the "
                     f"current directory; give it with {option}")


def read_frames(path: str | Path) -> np.ndarray:
    """Decode a whole (small) video to (T, H, W, 3) uint8: for tests and evaluation."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ---- reading a video at a frame rate ------------------------------------------------------------------


def resample(timed: Iterable[tuple[Fraction, T]], fps: float) -> Iterator[T]:
    """Frames at ``fps`` by presentation time, from (seconds, frame) pairs in display order: output
    frame k is the frame showing at k / fps, the last one stamped at or before it (times counted from
    the first frame's; nothing blended), for every k / fps up to the last frame's time. A stamp up to
    :data:`TIMESTAMP_ROUNDING` late (at most a quarter of an output frame) counts as on time, so a
    video already at ``fps`` comes out frame for frame. Exact arithmetic: no frame is lost to a float
    landing just past an output time.
    """
    period = 1 / Fraction(fps)
    slack = min(TIMESTAMP_ROUNDING, period / 4)
    k = 0  # the next output frame
    shown: T | None = None  # the frame showing at the latest time seen
    start = last = Fraction(0)
    for time, frame in timed:
        if shown is None:
            start = time
        while shown is not None and k * period + slack < time - start:  # `shown` lasts until `time`
            yield shown
            k += 1
        shown, last = frame, time
    while shown is not None and k * period <= last - start + slack:
        yield shown
        k += 1


def timestamp(item: av.Packet | av.VideoFrame, fps: float) -> Fraction:
    """Seconds at which a PyAV packet or frame is shown, exactly (``item.time``, as a fraction);
    ValueError if it carries no timestamp: nothing to resample to ``fps`` by."""
    import av

    if item.pts is None or item.time_base is None:
        kind = "packet" if isinstance(item, av.Packet) else "frame"
        raise ValueError(f"a video {kind} without a timestamp: cannot resample it to {fps:g} fps")
    return item.pts * item.time_base


def resampled_frames(path: str | Path, fps: float, limit: int | None = None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of the file's first video stream resampled to ``fps`` (:func:`resample`,
    by PyAV's frame timestamps, so a variable frame rate is followed too), at most ``limit``. A frame
    shown more than once (a lower source rate) is the same array each time. PyAV's errors pass
    through; ValueError for a file without a video stream or a frame without a timestamp."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream in it")
        timed = ((timestamp(frame, fps), frame) for frame in container.decode(video=0))
        previous, pixels = None, None
        for frame in islice(resample(timed, fps), limit):
            if frame is not previous:  # a frame repeated is converted once
                previous, pixels = frame, frame.to_ndarray(format="rgb24")
            yield pixels


# ---- previews -------------------------------------------------------------------------------------------


def fit_latent_to_rgb(latent: torch.Tensor, image: np.ndarray) -> torch.Tensor:
    """Least-squares linear map (C + 1, 3) from latent channels (+ bias) to RGB in [-1, 1].

    The pipeline fits it per job on the start frame and its own latent (free, and matched to
    whichever VAE is in use) unless the VAE carries its own. latent: (1, C, T, h, w); image:
    (H, W, 3) or (T, H, W, 3) uint8 with H = 8h, the frames each latent should preview.
    """
    images = image[None] if image.ndim == 3 else image
    c, t, h, w = latent.shape[1:]
    target = torch.from_numpy(np.ascontiguousarray(images)).float().permute(0, 3, 1, 2) / 127.5 - 1
    target = torch.nn.functional.adaptive_avg_pool2d(target, (h, w)).permute(0, 2, 3, 1).reshape(-1, 3)
    features = latent[0].float().permute(1, 2, 3, 0).reshape(-1, c)  # (T h w, C), same order
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    return torch.linalg.lstsq(features, target).solution


def preview_frames(latents: torch.Tensor, rgb_map: torch.Tensor) -> np.ndarray:
    """(1, C, T, h, w) latents -> (T, h, w, 3) uint8 through the fitted linear map."""
    x = latents[0].float().permute(1, 2, 3, 0)  # (T, h, w, C)
    rgb = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1) @ rgb_map
    return to_uint8(((rgb.clamp(-1, 1) + 1) * 127.5).numpy())
