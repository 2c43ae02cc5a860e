"""The web app's job store: one SQLite file in the outputs directory, so the queue outlives the server.

A job's life::

    queued -> running -> done | failed | cancelled
      ^          |                  |         |
      |          +-- (restart) -----+         |
      +---------------- resume ---------------+

Every change of status is one ``UPDATE ... WHERE status IN (...)``: two threads (or two server
processes) can never both claim a job, and a cancel racing a finish leaves exactly one result.
The frames themselves live in each job's :class:`~framepack.jobs.JobDir`, which is what makes an
interrupted job continue from its last finished section.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Status = Literal["queued", "running", "cancelled", "done", "failed"]
STATUSES: tuple[Status, ...] = ("queued", "running", "cancelled", "done", "failed")
FINISHED: tuple[Status, ...] = ("cancelled", "done", "failed")
STORE_NAME = "jobs.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    created  REAL    NOT NULL,
    updated  REAL    NOT NULL,
    position INTEGER NOT NULL,           -- queue order: the lowest queued position runs next
    status   TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'cancelled', 'done', 'failed')),
    settings TEXT    NOT NULL,           -- GenerationSettings as JSON (image paths in the job dir)
    job_dir  TEXT    NOT NULL,
    out      TEXT    NOT NULL,
    seed     INTEGER NOT NULL,
    error    TEXT,
    preserve_gb REAL                     -- GPU memory the worker leaves free of its plan (NULL: the default)
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, position);
"""


@dataclass(frozen=True)
class JobRecord:
    id: int
    created: float  # unix time
    updated: float
    position: int
    status: Status
    settings: dict[str, Any]
    job_dir: Path
    out: Path
    seed: int
    error: str | None
    # a property of the run, not of the video (so not in ``settings``, nor in the mp4): None for jobs
    # queued before the app had the control, or by a caller that did not say
    preserve_gb: float | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "JobRecord":
        return cls(row["id"], row["created"], row["updated"], row["position"], row["status"],
                   json.loads(row["settings"]), Path(row["job_dir"]), Path(row["out"]), row["seed"], row["error"],
                   row["preserve_gb"])


class JobStore:
    """Jobs in ``outputs/jobs.sqlite``; safe to use from several threads (one connection per call)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the worker's writes
            db.executescript(_SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "preserve_gb" not in columns:  # a store made before the column existed: its jobs keep NULL
                db.execute("ALTER TABLE jobs ADD COLUMN preserve_gb REAL")
        finally:
            db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction, taken up front (BEGIN IMMEDIATE) so read-then-write is atomic."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # ---- writes -----------------------------------------------------------------------------------------

    def add(self, settings: dict[str, Any], job_dir: Path, out: Path, seed: int,
            preserve_gb: float | None = None) -> JobRecord:
        """Append a queued job at the end of the queue."""
        now = time.time()
        with self._transaction() as db:
            position = db.execute("SELECT COALESCE(MAX(position), 0) + 1 FROM jobs").fetchone()[0]
            cursor = db.execute(
                "INSERT INTO jobs (created, updated, position, status, settings, job_dir, out, seed, preserve_gb) "
                "VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
                (now, now, position, json.dumps(settings, sort_keys=True), str(job_dir), str(out), seed, preserve_gb),
            )
            job_id = cursor.lastrowid
        return self._require(job_id)

    def claim_next(self) -> JobRecord | None:
        """The first queued job, now marked running; None when the queue is empty."""
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY position LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', updated = ?, error = NULL WHERE id = ?",
                       (time.time(), row["id"]))
        return self._require(row["id"])

    def _move(self, job_id: int, sources: Sequence[Status], target: Status, error: str | None = None,
              to_back: bool = False) -> bool:
        """Change the status if it is one of ``sources``; False (and nothing changed) otherwise."""
        marks = ", ".join("?" for _ in sources)
        with self._transaction() as db:
            position_sql = ", position = (SELECT MAX(position) + 1 FROM jobs)" if to_back else ""
            cursor = db.execute(
                f"UPDATE jobs SET status = ?, updated = ?, error = ?{position_sql} "
                f"WHERE id = ? AND status IN ({marks})",
                (target, time.time(), error, job_id, *sources),
            )
            return cursor.rowcount == 1

    def finish(self, job_id: int) -> bool:
        return self._move(job_id, ("running",), "done")

    def fail(self, job_id: int, error: str) -> bool:
        return self._move(job_id, ("running",), "failed", error=error)

    def mark_cancelled(self, job_id: int) -> bool:
        """A running job stopped by its user (its job directory keeps the finished sections)."""
        return self._move(job_id, ("running",), "cancelled")

    def cancel_queued(self, job_id: int) -> bool:
        """Take a job that has not started out of the queue."""
        return self._move(job_id, ("queued",), "cancelled")

    def resume(self, job_id: int) -> bool:
        """Put a cancelled or failed job back, at the end of the queue."""
        return self._move(job_id, ("cancelled", "failed"), "queued", to_back=True)

    def requeue(self, job_id: int) -> bool:
        """A running job interrupted by a shutdown: queued again at its old place (it goes first)."""
        return self._move(job_id, ("running",), "queued")

    def requeue_interrupted(self) -> list[int]:
        """On start: jobs left 'running' by a killed server go back to the queue, keeping their place."""
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute("SELECT id FROM jobs WHERE status = 'running' ORDER BY position")]
            db.execute("UPDATE jobs SET status = 'queued', updated = ? WHERE status = 'running'", (time.time(),))
        return ids

    # ---- reads ----------------------------------------------------------------------------------------------

    def get(self, job_id: int) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_row(row)

    def _require(self, job_id: int | None) -> JobRecord:
        record = None if job_id is None else self.get(job_id)
        if record is None:
            raise LookupError(f"job {job_id} vanished from {self.path}")
        return record

    def jobs(self, statuses: Sequence[Status] = STATUSES, newest_first: bool = False,
             limit: int | None = None) -> list[JobRecord]:
        """Jobs with one of ``statuses``: in queue order, or newest (last changed) first."""
        marks = ", ".join("?" for _ in statuses)
        order = "updated DESC, id DESC" if newest_first else "position"
        sql = f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY {order}"
        params: list[Any] = list(statuses)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._transaction() as db:
            return [JobRecord.from_row(r) for r in db.execute(sql, params)]

    def queue_place(self, job_id: int) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None if the job is not queued."""
        with self._transaction() as db:
            row = db.execute("SELECT position, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row["status"] != "queued":
                return None
            ahead = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND position < ?",
                               (row["position"],)).fetchone()[0]
        return ahead + 1
