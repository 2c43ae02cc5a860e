"""Batches of jobs from one command: ``--count N`` (seeds S, S+1, ...) and ``--prompts FILE``.

Pure functions from what the user wrote to the list of jobs (settings as dicts, output paths), so
every problem is found, with its line, before a model loads or a file is written. A prompts file
has one job per line: a plain prompt, or a JSON object of settings (``{"prompt": "...", "seed": 5,
"seconds": 2.4}``) over the command's own options; blank lines and lines starting with ``#`` are
skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_JOBS = 1000  # a typo such as --count 100000 is refused rather than queued


@dataclass(frozen=True)
class BatchJob:
    settings: dict[str, Any]  # the command's options with this job's own over them
    out: Path
    label: str  # "line 3, seed 32", for messages


def read_prompts(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, settings of that line) for every job line of a prompts file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--prompts {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    return parse_prompts(text, f"--prompts {path}")


def parse_prompts(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, settings of that line) for every job line of ``text``; messages begin with
    ``name`` (the option and file, or the web app's field)."""
    lines: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name} line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(fields, dict):
                raise ValueError(f"{name} line {number}: a JSON line must be an object of settings")
        else:
            fields = {"prompt": line}
        lines.append((number, fields))
    if not lines:
        raise ValueError(f"{name} holds no prompt (blank lines and # comments are skipped)")
    return lines


def expand(base: dict[str, Any], lines: list[tuple[int, dict[str, Any]]] | None, count: int, out: Path,
           default_seed: int) -> list[BatchJob]:
    """Every job of the batch, in order: each line (or the command alone) ``count`` times with seeds
    S, S+1, ... from the line's seed, else the command's, else ``default_seed``. Outputs are ``out``
    with ``-lineK`` and ``-seedS`` added to its name where the batch varies them."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    entries = lines if lines is not None else [(0, {})]
    if len(entries) * count > MAX_JOBS:
        raise ValueError(f"the batch makes {len(entries) * count} jobs; at most {MAX_JOBS} at once")
    jobs: list[BatchJob] = []
    for number, fields in entries:
        first = fields.get("seed", base.get("seed", default_seed))
        if not isinstance(first, int) or isinstance(first, bool):
            raise ValueError(f"--prompts line {number}: seed must be an integer, got {first!r}")  # noqa: TRY004 (one-line CLI errors are ValueErrors)
        for i in range(count):
            settings = {**base, **fields, "seed": first + i}
            parts = ([f"line{number}"] if lines is not None else []) + ([f"seed{first + i}"] if count > 1 else [])
            jobs.append(BatchJob(settings, out.with_name("-".join([out.stem, *parts]) + out.suffix),
                                 ", ".join(p.replace("line", "line ").replace("seed", "seed ") for p in parts)))
    return jobs  # names differ by line number and seed, so no two jobs share an output
