"""The web app's LoRA folder (``framepack ui --lora-dir DIR``): what clients may pick, by name only.

Every value a client sends is hostile: a LoRA is named by its file name in the folder, never by a
path. ``..``, separators, absolute paths, hidden files, anything but a regular ``.safetensors``
file directly in the folder, and a symlink that leads out of it are all refused with the same
message, which never says whether such a file exists. Pure functions and one small class; no Gradio.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..settings import MAX_LORAS, LoraChoice

LORA_SUFFIX = ".safetensors"
PENDING_SESSIONS = 1000  # sessions whose LoRA choice waits for their next submission
MAX_WEIGHT = 10.0  # |weight| a client may ask for: far beyond any useful LoRA scale
SHOWN_CHARS = 40


def _shown(value: Any) -> str:
    """A client's value quoted in a message: short, one line; of a path, only its last part."""
    if isinstance(value, str):
        value = value.replace("\\", "/").rstrip("/").rpartition("/")[2] or value
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


class LoraFolder:
    """The ``.safetensors`` files directly in one folder (subfolders are not looked into)."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"--lora-dir {root} is not a directory")
        self.root = root.resolve()

    def names(self) -> list[str]:
        """The files a client may pick, sorted."""
        return sorted(p.name for p in self.root.iterdir() if self._usable(p))

    def _usable(self, path: Path) -> bool:
        if path.name.startswith(".") or not path.name.endswith(LORA_SUFFIX):
            return False
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # a dangling or looping link
            return False
        return real.parent == self.root and real.is_file()  # a link may point within the folder, not out

    def path(self, name: Any) -> Path:
        """The file a client's name stands for; ValueError (one line, the same for every refusal)."""
        if (not isinstance(name, str) or not name or name != Path(name).name or "\\" in name or "\0" in name
                or name in (".", "..")):
            raise ValueError(f"unknown LoRA {_shown(name)}: pick one of the LoRA folder's files by name")
        path = self.root / name
        if not self._usable(path):
            raise ValueError(f"unknown LoRA {_shown(name)}: pick one of the LoRA folder's files by name")
        return path.resolve()


def _weight(name: str, value: Any) -> float:
    if value is None or value == "":
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"the weight of LoRA {_shown(name)} must be a number, got {_shown(value)}")
    try:
        weight = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"the weight of LoRA {_shown(name)} must be a number, got {_shown(value)}") from None
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise ValueError(f"the weight of LoRA {_shown(name)} must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, "
                         f"got {_shown(value)}")
    return weight


def _entries(value: Any) -> list[tuple[Any, Any]]:
    """(name, weight) pairs from the form's text ("a.safetensors:0.8, b.safetensors", one per line
    or comma) or the API's list (of such strings, [name, weight] pairs or {"name", "weight"})."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items: Sequence[Any] = [part for line in value.splitlines() for part in line.split(",")]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ValueError(f"LoRAs must be text such as 'name.safetensors:0.8, other.safetensors' or a list, "
                         f"got {_shown(value)}")
    pairs = []
    for item in items:
        if isinstance(item, str):
            text = item.strip()
            if not text:
                continue
            name, sep, weight = text.rpartition(":")
            pairs.append((name.strip(), weight.strip()) if sep else (text, None))
        elif isinstance(item, (list, tuple)) and len(item) in (1, 2):
            pairs.append((item[0], item[1] if len(item) == 2 else None))
        elif isinstance(item, dict) and set(item) <= {"name", "weight"} and "name" in item:
            pairs.append((item["name"], item.get("weight")))
        else:
            raise ValueError(f"not a LoRA choice: {_shown(item)} (give 'name.safetensors:weight')")
    return pairs


def loras_from_form(value: Any, folder: LoraFolder | None) -> tuple[LoraChoice, ...]:
    """A client's LoRA choice -> the settings' LoRAs (files of ``folder``, hashed now)."""
    from ..lora import lora_choice

    pairs = _entries(value)
    if not pairs:
        return ()
    if folder is None:
        raise ValueError("this server has no LoRA folder (start it with framepack ui --lora-dir DIR)")
    if len(pairs) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs at once, got {len(pairs)}")
    names = [name for name, _ in pairs]
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise ValueError(f"LoRA {_shown(repeated)} is chosen twice: give it once, with one weight")
    return tuple(lora_choice(folder.path(name), _weight(name, weight)) for name, weight in pairs)


def loras_text(settings_loras: Any) -> str:
    """Stored or recorded LoRAs -> the form's text, by file name ("a.safetensors:0.8, ..."); an
    ill-typed list (it may come from a client's mp4) gives an empty field."""
    from ..settings import lora_choices

    try:
        choices = lora_choices(settings_loras)
    except ValueError:
        return ""
    parts = []
    for choice in choices:
        if not isinstance(choice.path, str) or isinstance(choice.scale, bool) or not isinstance(choice.scale, (int, float)):
            continue
        name = Path(choice.path.replace("\\", "/")).name
        if name and "," not in name and "\n" not in name:
            parts.append(f"{name}:{choice.scale:g}")
    return ", ".join(parts)


def public_loras(settings_loras: Any) -> list[dict[str, Any]]:
    """A job's LoRAs as a client sees them: file names, not the server's paths (under "name": a
    dict with a "path" is a file to download for gradio_client)."""
    from ..lora import recorded_loras
    from ..settings import lora_choices

    try:
        recorded = recorded_loras(lora_choices(settings_loras))
    except (ValueError, TypeError):
        return []
    return [{"name": entry["path"], "scale": entry["scale"], "sha256": entry["sha256"]} for entry in recorded]


class PendingLoras:
    """Each session's LoRA choice, from the moment it is made until that session's next submission
    takes it (the page's Generate click hands its LoRA field over first; an API client calls
    /choose_loras before /submit). A session that never submits is forgotten after PENDING_SESSIONS
    newer ones; a submission without a choice has no LoRAs."""

    def __init__(self, limit: int = PENDING_SESSIONS) -> None:
        self._lock = threading.Lock()
        self._chosen: OrderedDict[str, Any] = OrderedDict()
        self._limit = limit

    def put(self, session: str | None, value: Any) -> None:
        if not session:
            return
        with self._lock:
            self._chosen[session] = value
            self._chosen.move_to_end(session)
            while len(self._chosen) > self._limit:
                self._chosen.popitem(last=False)

    def take(self, session: str | None) -> Any:
        if not session:
            return None
        with self._lock:
            return self._chosen.pop(session, None)
