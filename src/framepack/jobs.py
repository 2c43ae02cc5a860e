"""Job directories: everything needed to continue a generation after a crash.

Layout::

    JOB/
      settings.json          the validated GenerationSettings (image paths point at the copies)
      inputs/start.png       copies of the input images, so a resume never depends on them
      inputs/end.png
      sections/0000.safetensors   latents of section 0 (generation order) + CPU RNG state after it
      video/segment-0000.mp4      frames that became final after section 0 (may be absent)
      video/pending-0000.npy      frames a later section will still blend into (after section 0)
      state.json             {"finished": k, "out": ...}: written last, so it is the commit point
      provisional.mp4        the video so far (in the job directory: never mistaken for a result)

Every file is written to a temporary name and renamed, so a crash leaves either the old or the
new version, never half a file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .settings import GenerationSettings

SETTINGS = "settings.json"
STATE = "state.json"


def _atomic_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class JobDir:
    root: Path
    settings: GenerationSettings
    out: Path
    finished: int = 0

    # ---- creation and opening ------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, settings: GenerationSettings, out: Path) -> "JobDir":
        root = Path(root)
        if (root / STATE).exists():
            raise ValueError(f"{root} already holds a job; resume it with --resume {root}")
        (root / "inputs").mkdir(parents=True, exist_ok=True)
        (root / "sections").mkdir(exist_ok=True)
        (root / "video").mkdir(exist_ok=True)
        start = root / "inputs" / ("start" + Path(settings.image).suffix.lower())
        shutil.copyfile(settings.image, start)
        end = None
        if settings.end_image is not None:
            end = root / "inputs" / ("end" + Path(settings.end_image).suffix.lower())
            shutil.copyfile(settings.end_image, end)
        stored = settings.replace(image=str(start.resolve()), end_image=None if end is None else str(end.resolve()))
        stored.save(root / SETTINGS)
        job = cls(root, stored, Path(out).resolve(), 0)
        job._write_state()
        return job

    @classmethod
    def open(cls, root: Path) -> "JobDir":
        root = Path(root)
        if not (root / STATE).is_file() or not (root / SETTINGS).is_file():
            raise ValueError(f"{root} is not a framepack job directory (no {STATE} / {SETTINGS})")
        try:
            state = json.loads((root / STATE).read_text())
            finished, out = int(state["finished"]), Path(state["out"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{root / STATE} is damaged ({exc})") from None
        return cls(root, GenerationSettings.load(root / SETTINGS), out, finished)

    def _write_state(self) -> None:
        _atomic_json(self.root / STATE, {"finished": self.finished, "out": str(self.out)})

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
        path = self.section_path(step)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"latents": latents.detach().float().cpu().contiguous(), "rng_state": rng_state.clone()}, str(tmp))
        os.replace(tmp, path)

    def load_latents(self, step: int) -> torch.Tensor:
        return load_file(str(self.section_path(step)))["latents"]

    def rng_state(self, step: int) -> torch.Tensor:
        return load_file(str(self.section_path(step)))["rng_state"]

    def save_pending(self, step: int, frames: np.ndarray | None) -> None:
        if frames is None:
            return
        path = self.pending_path(step)
        tmp = path.with_name(path.stem + ".tmp.npy")
        np.save(tmp, frames)
        os.replace(tmp, path)

    def load_pending(self) -> np.ndarray | None:
        """Pending frames after the last finished section (None before the first)."""
        if self.finished == 0:
            return None
        path = self.pending_path(self.finished - 1)
        return np.load(path) if path.exists() else None

    def commit(self, step: int) -> None:
        """Mark sections 0..step finished: the single write that makes them count."""
        self.finished = step + 1
        self._write_state()
        # pending frames of older sections are no longer needed by any resume
        for old in self.root.glob("video/pending-*.npy"):
            if old != self.pending_path(step):
                old.unlink(missing_ok=True)

    def segments(self) -> list[Path]:
        """Segments written so far, in arrival (generation) order."""
        return [self.segment_path(s) for s in range(self.finished) if self.segment_path(s).exists()]
