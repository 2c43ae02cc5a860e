"""Job directories: everything needed to continue a generation after a crash.

Layout::

    JOB/
      settings.json          the validated GenerationSettings (images: the copies, relative to JOB)
      job.json               written once: the output path and the input images' own file names
      inputs/start.png       copies of the input images, so a resume never depends on them
      inputs/end.png
      sections/0000.safetensors   latents of section 0 (generation order) + CPU RNG state after it
      video/segment-0000.mp4      frames that became final after section 0 (may be absent)
      video/pending-0000.npy      frames a later section will still blend into (after section 0)
      state.json             {"finished": k, "out": ...}: written last, so it is the commit point
      provisional.mp4        the video so far (in the job directory: never mistaken for a result)
      lock                   held (flock) by the process computing the job; names its pid

Every file is written to a temporary name, flushed to the disk and renamed, so a crash or a power
loss leaves either the old or the new version, never half a file, and a committed section is on
the disk before the state that counts it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .settings import GenerationSettings

log = logging.getLogger(__name__)

SETTINGS = "settings.json"
STATE = "state.json"
ORIGIN = "job.json"
INPUTS = "inputs"
LOCK = "lock"
INPUT_STEMS = {"image": "start", "end_image": "end", "extend": "extend"}  # inputs copied into JOB/inputs
_SECTION_NAME = re.compile(r"^(\d{4})\.safetensors$")


# ---- durable writes ------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the rename is then as durable as it gets
        pass
    finally:
        os.close(fd)


def no_space_error(path: Path) -> OSError:
    """The one-line error for a full disk: names the file and says why."""
    error = OSError(f"no space left on the device: could not write {path}")
    error.errno = errno.ENOSPC
    return error


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)``, fsync, rename over ``path``, fsync the directory.

    On any failure the temporary file is removed; a full disk raises an OSError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise no_space_error(path) from None
        raise
    _fsync_dir(path.parent)


def _write_with(writer: Callable[[IO[bytes]], None]) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            writer(f)
    return write


def write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, _write_with(lambda f: f.write(text.encode())))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].numpy().tobytes())
    return digest.hexdigest()


# ---- the lock ----------------------------------------------------------------------------------------------


class JobLock:
    """An exclusive, non-blocking flock on ``JOB/lock``: the kernel drops it when the process dies."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "unknown"
            f.close()
            raise ValueError(f"job {self.path.parent} is already being computed by another process (pid {pid})") from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


# ---- the job -------------------------------------------------------------------------------------------------


@dataclass
class JobDir:
    root: Path
    settings: GenerationSettings
    out: Path
    finished: int = 0
    # the input images' own file names (the copies are inputs/start.*, inputs/end.*)
    input_names: dict[str, str | None] = field(default_factory=dict)
    state_rebuilt: bool = False  # state.json was missing or damaged: write it again before going on
    # sha256 of the segments and pending frames written (JOB-relative names): a damaged one is rebuilt
    checksums: dict[str, str] = field(default_factory=dict)
    _lock: JobLock | None = field(default=None, repr=False, compare=False)

    # ---- creation and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, settings: GenerationSettings, out: Path) -> "JobDir":
        root = Path(root)
        if (root / STATE).exists():
            raise ValueError(f"{root} already holds a job; resume it with --resume {root}")
        made_root = not root.exists()
        try:
            return cls._create(root, settings, Path(out).resolve())
        except BaseException:
            if made_root:  # nothing half-made is left that could be mistaken for a job
                shutil.rmtree(root, ignore_errors=True)
            raise

    @classmethod
    def _create(cls, root: Path, settings: GenerationSettings, out: Path) -> "JobDir":
        (root / "inputs").mkdir(parents=True, exist_ok=True)
        (root / "sections").mkdir(exist_ok=True)
        (root / "video").mkdir(exist_ok=True)

        def copy(source: str, stem: str, keep_name: bool = False) -> str:
            # a keyframe keeps its own file name (in a folder of its own): the video records it by that name
            target = Path(INPUTS) / (Path(stem) / Path(source).name if keep_name else stem + Path(source).suffix.lower())
            (root / target).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(root / target, lambda tmp: shutil.copyfile(source, tmp))
            return target.as_posix()

        given = {key: getattr(settings, key) for key in INPUT_STEMS}
        # relative: a job directory can be moved
        stored = settings.replace(**{key: None if path is None else copy(path, INPUT_STEMS[key])
                                     for key, path in given.items()},
                                  keyframes=tuple(k._replace(image=copy(k.image, f"keyframe-{i}", keep_name=True))
                                                  for i, k in enumerate(settings.keyframes, 1)))
        names = {key: None if path is None else Path(path).name for key, path in given.items()}
        write_json(root / ORIGIN, {"out": str(out), **names})
        write_json(root / SETTINGS, stored.to_dict())
        job = cls(root, _inputs_in(root, stored), out, 0, names)
        job.write_state()  # last: only now is it a job
        return job

    @classmethod
    def open(cls, root: Path) -> "JobDir":
        """Open a job; a missing or damaged state.json is rebuilt (in memory) from the section files."""
        root = Path(root)
        if not (root / SETTINGS).is_file():
            if root.is_dir() and (root / STATE).is_file():
                raise ValueError(f"{root / SETTINGS} is missing; a job cannot continue without its settings: "
                                 "start a new one (framepack generate --from its video, if there is one)")
            raise ValueError(f"{root} is not a framepack job directory (no {STATE} / {SETTINGS})")
        try:
            settings = _inputs_in(root, GenerationSettings.load(root / SETTINGS))
        except (ValueError, OSError, TypeError, AttributeError) as exc:
            reason = _first_line(exc).replace(f"{root / SETTINGS} ", "")
            raise ValueError(f"{root / SETTINGS} is damaged ({reason}); a job cannot continue without its settings: "
                             "start a new one (framepack generate --from its video, if there is one)") from None
        origin = _read_json(root / ORIGIN) or {}
        names = {key: _recorded_name(origin.get(key), getattr(settings, key)) for key in INPUT_STEMS}
        rebuilt = False
        try:
            state = json.loads((root / STATE).read_text())
            finished, out = int(state["finished"]), Path(state["out"])
            if finished < 0:
                raise ValueError(f"finished = {finished}")
            sums = state.get("checksums") or {}
            checksums = {k: v for k, v in sums.items() if isinstance(v, str)} if isinstance(sums, dict) else {}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            reason = "missing" if not (root / STATE).exists() else f"damaged ({exc.__class__.__name__}: {exc})"
            out = _recorded_out(root, origin)
            finished, rebuilt, checksums = len(_section_run(root)), True, {}
            log.warning("%s is %s: rebuilt from the %d section file(s) present; the video goes to %s",
                        root / STATE, reason, finished, out)
        return cls(root, settings, out, finished, names, rebuilt, checksums)

    def write_state(self) -> None:
        write_json(self.root / STATE, {"finished": self.finished, "out": str(self.out), "checksums": self.checksums})
        self.state_rebuilt = False

    def repair_state(self) -> None:
        """Write a state.json that :meth:`open` had to rebuild (call it holding the lock)."""
        if self.state_rebuilt:
            self.write_state()

    # ---- the lock --------------------------------------------------------------------------------------

    def acquire(self) -> "JobDir":
        """Take the job's lock (ValueError naming the holder's pid if another process has it)."""
        if self._lock is None:
            self._lock = JobLock(self.root)
        self._lock.acquire()
        return self

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()

    @contextmanager
    def locked(self) -> Iterator["JobDir"]:
        """Hold the lock for the block; a lock already held (``acquire``) is kept afterwards."""
        already = self._lock is not None and self._lock.held
        self.acquire()
        try:
            yield self
        finally:
            if not already:
                self.release()

    # ---- sections ------------------------------------------------------------------------------------

    def section_path(self, step: int) -> Path:
        return self.root / "sections" / f"{step:04d}.safetensors"

    def segment_path(self, step: int) -> Path:
        return self.root / "video" / f"segment-{step:04d}.mp4"

    def pending_path(self, step: int) -> Path:
        return self.root / "video" / f"pending-{step:04d}.npy"

    @property
    def provisional_path(self) -> Path:
        return self.root / "provisional.mp4"

    def save_latents(self, step: int, latents: torch.Tensor, rng_state: torch.Tensor) -> None:
        tensors = {"latents": latents.detach().float().cpu().contiguous(), "rng_state": rng_state.clone()}
        data = save(tensors, metadata={"sha256": _checksum(tensors), "model": self.settings.model})
        atomic_write(self.section_path(step), _write_with(lambda f: f.write(data)))

    def read_section(self, step: int) -> dict[str, Any]:
        """``{"latents", "rng_state", "model"}`` of a section; ValueError naming the file if it is damaged.

        A missing file raises FileNotFoundError (the caller may recompute it).
        """
        path = self.section_path(step)
        if not path.is_file():
            raise FileNotFoundError(f"section file {path} is missing")
        fix = f"delete it and resume again to recompute sections {step + 1} onwards"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"section file {path} is damaged ({_first_line(exc)}): {fix}") from None
        if set(tensors) != {"latents", "rng_state"}:
            raise ValueError(f"section file {path} is damaged (holds {', '.join(sorted(tensors)) or 'nothing'}): {fix}")
        if "sha256" in meta and meta["sha256"] != _checksum(tensors):
            raise ValueError(f"section file {path} is damaged (its checksum does not match its contents): {fix}")
        return {**tensors, "model": meta.get("model")}

    def load_latents(self, step: int) -> torch.Tensor:
        return self.read_section(step)["latents"]

    def rng_state(self, step: int) -> torch.Tensor:
        return self.read_section(step)["rng_state"]

    def save_pending(self, step: int, frames: np.ndarray | None) -> None:
        if frames is None:
            return
        path = self.pending_path(step)
        atomic_write(path, _write_with(lambda f: np.save(f, frames)))
        self.checksums[self._name(path)] = _array_checksum(frames)

    def load_pending(self) -> np.ndarray | None:
        """Pending frames after the last finished section (None before the first, or if missing or unreadable)."""
        if self.finished == 0:
            return None
        path = self.pending_path(self.finished - 1)
        try:
            frames = np.load(path) if path.exists() else None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("%s is unreadable (%s)", path, _first_line(exc))
            return None
        recorded = self.checksums.get(self._name(path))
        if frames is not None and recorded is not None and recorded != _array_checksum(frames):
            log.warning("%s is damaged (its checksum does not match its contents)", path)
            return None
        return frames

    def note(self, path: Path) -> None:
        """Record the checksum of a piece just written (it is saved with the next state)."""
        self.checksums[self._name(path)] = _file_checksum(path)

    def intact(self, path: Path) -> bool:
        """The piece is there and, if its checksum was recorded, unchanged."""
        if not path.is_file():
            return False
        recorded = self.checksums.get(self._name(path))
        return recorded is None or recorded == _file_checksum(path)

    def _name(self, path: Path) -> str:
        return Path(path).relative_to(self.root).as_posix()

    def commit(self, step: int) -> None:
        """Mark sections 0..step finished: the single write that makes them count."""
        self.finished = step + 1
        # pending frames of older sections are no longer needed by any resume
        older = [p for p in self.root.glob("video/pending-*.npy") if p != self.pending_path(step)]
        for old in older:
            self.checksums.pop(self._name(old), None)
        self.write_state()
        for old in older:
            old.unlink(missing_ok=True)

    def rollback(self, finished: int) -> None:
        """Count only sections 0..finished-1 as done (the later ones will be computed again)."""
        self.finished = finished
        self.write_state()

    def segments(self) -> list[Path]:
        """Segments written so far, in arrival (generation) order."""
        return [self.segment_path(s) for s in range(self.finished) if self.segment_path(s).exists()]


# ---- helpers ---------------------------------------------------------------------------------------------


def _inputs_in(root: Path, settings: GenerationSettings) -> GenerationSettings:
    """The settings with the input images at this job directory's own copies (absolute paths).

    settings.json names them relative to the job; jobs written before that named them absolutely,
    in an ``inputs`` folder: they are taken from this job's, so a moved or copied job uses its own.
    """
    def own(path: str | None) -> str | None:
        if path is None:
            return None
        stored = Path(path)
        if not stored.is_absolute() or stored.parent.name == INPUTS:
            return str((root / INPUTS / stored.name).resolve())
        return path

    keyframes = tuple(k if Path(k.image).is_absolute() else k._replace(image=str((root / k.image).resolve()))
                      for k in settings.keyframes)
    return settings.replace(**{key: own(getattr(settings, key)) for key in INPUT_STEMS}, keyframes=keyframes)


def _file_checksum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _array_checksum(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _recorded_name(recorded: object, copy: str | None) -> str | None:
    """An input's own file name from job.json; jobs made before it have only the copy's name."""
    if copy is None:
        return None
    return recorded if isinstance(recorded, str) else Path(copy).name


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _section_run(root: Path) -> list[int]:
    """Steps 0, 1, ... whose section files are present, up to the first gap."""
    present = {int(m.group(1)) for p in (root / "sections").glob("*.safetensors") if (m := _SECTION_NAME.match(p.name))}
    run: list[int] = []
    while len(run) in present:
        run.append(len(run))
    return run


def _recorded_out(root: Path, origin: dict) -> Path:
    """Where the video goes when state.json cannot say: job.json, else the CLI's ``VIDEO.job`` naming."""
    if isinstance(origin.get("out"), str):
        return Path(origin["out"])
    if root.name.endswith(".job") and len(root.name) > len(".job"):
        return (root.parent / (root.name[: -len(".job")] + ".mp4")).resolve()
    raise ValueError(f"{root / STATE} is damaged and the job does not record where its video goes: "
                     f"write {{\"finished\": 0, \"out\": \"VIDEO.mp4\"}} into it and resume again")
