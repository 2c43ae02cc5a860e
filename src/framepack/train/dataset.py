"""A user's folder of videos and images, encoded once for training (``framepack dataset prepare``).

Every video is resampled to the model's frame rate by presentation time
(:func:`framepack.video.resample`), and every clip is cut to a resolution bucket of generation
(:func:`framepack.images.nearest_bucket`, resized and centre-cropped as the start image is) and to a
length of ``1 + 4n`` frames (the causal VAE groups four frames per latent after the first), then
encoded by the model's own components as the pipeline encodes its inputs: VAE latents (scaled), the
caption's text embedding, and the first frame's image embedding where the model has an image
encoder.

The result is a folder::

    manifest.json            model, resolution, max_frames, fps, format version, complete (true at the end)
    index.jsonl              one line per sample: shard, key, caption, source, bucket (source_fps: a video's)
    shard-00000.safetensors  per-sample tensors "{key}.latents", ".text", ".mask", ".pooled" (".image")
    report.json              samples per bucket, and every file skipped with the reason

Shards and the index are written atomically (temporary file, then rename), and the index names only
finished shards, so an interrupted run leaves nothing that looks finished; running the same command
again encodes only the files no finished shard holds.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import components
from ..components import Encoders, TextEmbedding
from ..jobs import atomic_write
from ..planning import FPS, TEMPORAL_RATIO
from ..video import resampled_frames, to_pixels

log = logging.getLogger(__name__)

FORMAT = "framepack-dataset"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
REPORT = "report.json"
SHARD_BYTES = 256 * 2**20  # a shard is closed once its tensors reach this size (a few hundred MB at most)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# latent frames after the first: a clip keeps the largest of these that its length allows, so clips
# of similar lengths share a bucket; each step is at most 1.5x the one before, so less than a third
# of a clip is ever dropped
LENGTH_STEPS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# ---- reading a prepared dataset -------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedSample:
    latents: torch.Tensor  # (C, T, h, w) float32: scaled VAE latents of the clip (T = 1 for an image)
    text: torch.Tensor  # (L, D): the text encoder's embedding of the caption (padded)
    mask: torch.Tensor  # (L,) bool: the valid text tokens
    pooled: torch.Tensor  # (P,)
    image: torch.Tensor | None  # (N, D_img): image-encoder embedding of the first frame; None without one
    caption: str
    source: str  # the file's path relative to the dataset folder


class PreparedDataset:
    """A folder written by :func:`prepare`; samples are read from their shard when asked for."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise ValueError(f"{self.directory} is not a prepared dataset (no {MANIFEST}): "
                             "make one with framepack dataset prepare")
        if not manifest.get("complete"):
            raise ValueError(f"{self.directory} is an unfinished preparation: run the same framepack dataset "
                             "prepare command again to finish it")
        self.manifest = manifest
        self.model: str = manifest["model"]  # as given to prepare; a model directory by its absolute path
        self.entries = _read_index(self.directory)

    def __len__(self) -> int:
        return len(self.entries)

    def buckets(self) -> dict[str, list[int]]:
        """Bucket key ("HxWxT": pixels and latent frames) -> sample indices; a bucket's latents share a shape."""
        found: dict[str, list[int]] = {}
        for i, entry in enumerate(self.entries):
            found.setdefault(entry["bucket"], []).append(i)
        return found

    def sample(self, index: int) -> PreparedSample:
        from safetensors import safe_open

        entry = self.entries[index]
        key = entry["key"]
        with safe_open(str(self.directory / entry["shard"]), framework="pt") as shard:
            has_image = f"{key}.image" in set(shard.keys())
            image = shard.get_tensor(f"{key}.image") if has_image else None
            return PreparedSample(
                latents=shard.get_tensor(f"{key}.latents"), text=shard.get_tensor(f"{key}.text"),
                mask=shard.get_tensor(f"{key}.mask"), pooled=shard.get_tensor(f"{key}.pooled"), image=image,
                caption=entry["caption"], source=entry["source"],
            )


def _read_manifest(directory: Path) -> dict | None:
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a framepack dataset manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{directory} was prepared in format version {manifest.get('version')}; this framepack "
                         f"reads version {VERSION}: prepare it again")
    return manifest


def _read_index(directory: Path) -> list[dict]:
    path = directory / INDEX
    if not path.is_file():
        return []
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict) or not {"shard", "key", "caption", "source", "bucket"} <= set(entry):
            raise ValueError(f"{path} line {number} is not a sample entry: prepare the dataset again")
        entries.append(entry)
    return entries


# ---- finding the files and their captions ----------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    file: str  # relative to the dataset folder
    reason: str


@dataclass(frozen=True)
class MediaFile:
    path: Path
    source: str  # relative to the dataset folder, with forward slashes
    caption: str
    video: bool


def read_metadata(root: Path) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (``{"file": ..., "caption": ...}`` per line) and/or
    ``metadata.csv`` (``file`` and ``caption`` columns) at the folder's root: relative path -> caption."""
    captions: dict[str, str] = {}
    jsonl, table = root / METADATA_FILES[0], root / METADATA_FILES[1]
    if jsonl.is_file():
        for number, line in enumerate(_utf8(jsonl).splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{jsonl} line {number} is not JSON") from None
            valid = isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("file", "caption"))
            if not valid:
                raise ValueError(f"{jsonl} line {number}: expected {{\"file\": ..., \"caption\": ...}} with strings")
            captions[_relative_name(entry["file"])] = entry["caption"]
    if table.is_file():
        reader = csv.DictReader(_utf8(table).splitlines(keepends=True))
        if not {"file", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{table} needs a header with the columns file and caption")
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise ValueError(f"{table} line {reader.line_num}: {exc}") from None
        captions.update({_relative_name(row["file"]): row["caption"] or "" for row in rows if row["file"]})
    return captions


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


def _relative_name(name: str) -> str:
    return Path(name.replace("\\", "/")).as_posix().removeprefix("./")


def find_media(root: Path) -> tuple[list[MediaFile], list[Skipped]]:
    """Every video and image under ``root`` (recursive, in path order) with its caption: a same-name
    ``.txt`` beside it, else its entry in the root's metadata. Files without a caption are skipped:
    a made-up caption would teach the model the wrong words."""
    metadata = read_metadata(root)
    found: list[MediaFile] = []
    skipped: list[Skipped] = []
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES)
    for path in paths:
        source = path.relative_to(root).as_posix()
        text = path.with_suffix(".txt")
        caption = text.read_text(encoding="utf-8", errors="replace") if text.is_file() else metadata.get(source)
        if caption is None:
            skipped.append(Skipped(source, "no caption (no .txt beside it, no metadata entry)"))
        elif not caption.strip():
            skipped.append(Skipped(source, "empty caption"))
        else:
            found.append(MediaFile(path, source, caption.strip(), path.suffix.lower() in VIDEO_SUFFIXES))
    listed = {p.relative_to(root).as_posix() for p in paths}
    skipped += [Skipped(name, "listed in the metadata but not found") for name in sorted(set(metadata) - listed)]
    return found, skipped


# ---- frames: the buckets generation uses -------------------------------------------------------------------


def clip_length(frames: int, max_frames: int | None = None) -> int:
    """Pixel frames kept of a clip of ``frames``: ``1 + 4n`` with n the largest of :data:`LENGTH_STEPS`
    that fits (and fits ``max_frames``)."""
    usable = frames if max_frames is None else min(frames, max_frames)
    if usable < 1:
        raise ValueError(f"a clip needs at least one frame (max_frames {max_frames})")
    return 1 + TEMPORAL_RATIO * max(n for n in LENGTH_STEPS if 1 + TEMPORAL_RATIO * n <= usable)


def bucket_key(height: int, width: int, latent_frames: int) -> str:
    return f"{height}x{width}x{latent_frames}"


def read_clip(file: MediaFile, resolution: int, max_frames: int | None, fps: float = FPS) -> np.ndarray:
    """(T, H, W, 3) uint8: the clip's first ``clip_length`` frames at ``fps``
    (:func:`~framepack.video.resample`), each resized and centre-cropped to the bucket nearest the
    clip's aspect (as generation prepares its start image). ValueError with a one-line reason for an
    unreadable file."""
    from ..images import load_image, nearest_bucket, prepare_image, resize_and_crop

    if not file.video:
        return prepare_image(load_image(file.path), resolution)[None]
    longest = 1 + TEMPORAL_RATIO * LENGTH_STEPS[-1]  # no clip keeps more: decode no more
    frames = []
    for frame in _decoded(file.path, fps, longest if max_frames is None else min(max_frames, longest)):
        if not frames:  # the whole clip goes to its first frame's bucket
            size = nearest_bucket(*frame.shape[:2], resolution)
        frames.append(resize_and_crop(frame, *size))
    if not frames:
        raise ValueError("no video frames in it")
    return np.stack(frames[: clip_length(len(frames), max_frames)])


def _decoded(path: Path, fps: float, limit: int | None) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of the file's first video stream resampled to ``fps``, at most ``limit``
    (:func:`~framepack.video.resampled_frames`); an unreadable file is a ValueError."""
    import av

    try:
        yield from resampled_frames(path, fps, limit)
    except av.FFmpegError as exc:
        raise ValueError(f"not a readable video ({exc.strerror or exc.__class__.__name__})") from None


def source_fps(path: Path) -> float | None:
    """The video's average frame rate as its container states it (None if it states none), rounded
    to 1/1000; read from the header, nothing decoded."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
    return None if rate is None else round(float(rate), 3)


# ---- encoding -------------------------------------------------------------------------------------------------


def load_encoders(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Encoders:
    """The model's text encoders, image encoder and VAE, loaded as generation loads them."""
    return components.load_encoders(components.resolve_model(model), dtype, device)


def encode_sample(encoders: Encoders, frames: np.ndarray, text: TextEmbedding) -> dict[str, torch.Tensor]:
    """One sample's tensors (without the key prefix), as the pipeline conditions on them."""
    tensors = {
        "latents": encoders.vae.encode(to_pixels(frames))[0].float().contiguous(),  # (C, T, h, w)
        # Copies: a repeated caption's embedding is encoded once and reused, and safetensors refuses
        # to save tensors that share memory.
        "text": text.states[0].float().clone(memory_format=torch.contiguous_format),
        "mask": text.mask[0].bool().clone(memory_format=torch.contiguous_format),
        "pooled": text.pooled[0].float().clone(memory_format=torch.contiguous_format),
    }
    if encoders.image is not None:
        tensors["image"] = encoders.image.encode(frames[0])[0].float().contiguous()  # the start frame's
    return tensors


# ---- writing --------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    out: Path
    samples: int  # in the dataset, from this run and earlier ones
    encoded: int  # by this run
    buckets: dict[str, int]
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"samples": self.samples, "buckets": self.buckets,
                "skipped": [{"file": s.file, "reason": s.reason} for s in self.skipped]}


@dataclass
class _ShardWriter:
    """Collects samples; each full shard is written atomically, then the index is rewritten to name it."""

    out: Path
    entries: list[dict]  # the index: finished shards only
    shard_bytes: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    pending: list[dict] = field(default_factory=list)

    def add(self, tensors: dict[str, torch.Tensor], entry: dict) -> None:
        key = str(len(self.entries) + len(self.pending))
        self.tensors.update({f"{key}.{name}": t for name, t in tensors.items()})
        self.pending.append({**entry, "key": key})
        if sum(t.numel() * t.element_size() for t in self.tensors.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{len({e['shard'] for e in self.entries}):05d}.safetensors"
        atomic_write(self.out / name, lambda tmp: save_file(self.tensors, str(tmp)))
        self.entries += [{**e, "shard": name} for e in self.pending]
        lines = "".join(json.dumps(e) + "\n" for e in self.entries)
        atomic_write(self.out / INDEX, lambda tmp: tmp.write_text(lines))
        self.tensors, self.pending = {}, []


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _finished_entries(out: Path) -> list[dict]:
    """The index of an earlier run, less any entry whose shard is gone (those files are encoded again)."""
    entries = _read_index(out)
    missing = sorted({e["shard"] for e in entries if not (out / e["shard"]).is_file()})
    if missing:
        first = min(i for i, e in enumerate(entries) if e["shard"] in missing)
        log.warning("shard %s of %s is missing: encoding its samples and those after it again", missing[0], out)
        entries = entries[:first]
    return entries


def model_name(model: str) -> str:
    """How the manifest names the model: a named model as it is, a model directory by its absolute
    path (training may run from another folder than the preparation did)."""
    from ..components import EMBEDDED_MODELS, NAMED_MODELS

    if model in NAMED_MODELS or model in EMBEDDED_MODELS or not Path(model).expanduser().exists():
        return model
    return str(Path(model).expanduser().resolve())


def _encode_files(files: list[MediaFile], encoders: Encoders, writer: _ShardWriter, resolution: int,
                  max_frames: int | None, fps: float, progress: bool,
                  on_sample: Callable[[str], None]) -> list[Skipped]:
    """Read, encode and hand to ``writer`` each file in turn (a progress bar over files); returns
    the files that could not be read."""
    from tqdm import tqdm

    skipped = []
    texts: dict[str, TextEmbedding] = {}  # captions repeat: each is encoded once
    for file in tqdm(files, desc="preparing", unit="file", disable=None if progress else True):
        try:
            frames = read_clip(file, resolution, max_frames, fps)
        except (ValueError, OSError) as exc:
            skipped.append(Skipped(file.source, str(exc).replace(str(file.path), file.source)))
            continue
        if file.caption not in texts:
            texts[file.caption] = encoders.text.encode(file.caption)
        with torch.inference_mode():
            tensors = encode_sample(encoders, frames, texts[file.caption])
        bucket = bucket_key(frames.shape[1], frames.shape[2], tensors["latents"].shape[1])
        entry = {"caption": file.caption, "source": file.source, "bucket": bucket}
        if file.video:  # the rate it was resampled from
            entry["source_fps"] = source_fps(file.path)
        writer.add(tensors, entry)
        on_sample(file.source)
    return skipped


def check_out(out: Path, settings: dict) -> None:
    """``out`` is new, empty, or an earlier preparation with the same settings (which is continued)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    manifest = _read_manifest(out) if out.is_dir() else None
    if manifest is None:
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} is a directory with other files in it; choose a new or empty one")
        return
    differ = [k for k, v in settings.items() if manifest.get(k) != v]
    if differ:
        was = ", ".join(f"{k} {manifest.get(k)!r}" for k in differ)
        raise ValueError(f"{out} was prepared with other settings ({was}); choose another --out")


def prepare(source: Path, out: Path, model: str, *, resolution: int | None = None, max_frames: int | None = None,
            fps: float = FPS, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            progress: bool = True, shard_bytes: int = SHARD_BYTES,
            on_sample: Callable[[str], None] = lambda source: None) -> PrepareReport:
    """Encode every captioned video and image under ``source`` into a prepared dataset at ``out``.

    Videos are resampled to ``fps`` frames per second (:func:`~framepack.video.resample`; FramePack's
    models are trained at 30), and ``max_frames`` counts frames at that rate. Everything is checked
    before anything is written or loaded (ValueError, one line). Rerunning with the same arguments
    continues an interrupted run. ``on_sample`` is called with each file's relative path once its
    sample is encoded.
    """
    from ..components import resolve_model
    from ..images import buckets as resolution_buckets

    source, out = Path(source), Path(out)
    if not source.is_dir():
        raise ValueError(f"{source} is not a directory" if source.exists() else f"{source} does not exist")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps:g}")
    resolution = resolve_model(model).resolution(resolution)  # an unknown model: one line, here
    resolution_buckets(resolution)  # a resolution too small for any bucket: one line, here
    files, skipped = find_media(source)
    if not files:
        raise ValueError(f"no usable files in {source}: no video ({', '.join(VIDEO_SUFFIXES)}) or image "
                         f"({', '.join(IMAGE_SUFFIXES)}) with a caption (a same-name .txt or a metadata.jsonl/csv)")
    settings = {"model": model_name(model), "resolution": resolution, "max_frames": max_frames,
                "fps": int(fps) if float(fps).is_integer() else float(fps), "source": str(source.resolve())}
    check_out(out, settings)

    entries = _finished_entries(out) if out.is_dir() else []
    done = {e["source"] for e in entries}
    todo = [f for f in files if f.source not in done]
    encoders = load_encoders(model, device, dtype) if todo else None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MANIFEST, {"format": FORMAT, "version": VERSION, **settings, "complete": False})
    (out / REPORT).unlink(missing_ok=True)  # a report describes a finished preparation only
    writer = _ShardWriter(out, list(entries), shard_bytes)
    unreadable = [] if encoders is None else _encode_files(todo, encoders, writer, resolution, max_frames, fps,
                                                           progress, on_sample)
    writer.flush()
    if not writer.entries:  # nothing to keep: leave no folder that looks like a dataset
        (out / MANIFEST).unlink()
        if created:
            out.rmdir()
        raise ValueError(f"no file in {source} could be read, e.g. {unreadable[0].file}: {unreadable[0].reason}")
    skipped += unreadable
    counts: dict[str, int] = {}
    for entry in writer.entries:
        counts[entry["bucket"]] = counts.get(entry["bucket"], 0) + 1
    skipped.sort(key=lambda s: s.file)
    report = PrepareReport(out, len(writer.entries), len(writer.entries) - len(entries), counts, skipped)
    _write_json(out / REPORT, report.to_json())
    _write_json(out / MANIFEST, {"format": FORMAT, "version": VERSION, **settings, "complete": True,
                                 "samples": report.samples})
    return report
