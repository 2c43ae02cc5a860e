"""The web app as the tests run it: a server process, and the tests' handle on it.

``python tests/ui_slow_server.py DELAY_S ARGS...`` is ``python -m framepack.ui ARGS...`` with every
transformer call held back by at least DELAY_S seconds. The browser tests watch jobs while they run
(the progress bar moving, a cancel, a kill mid-job). On the tiny random model a whole job can finish
between two polls of the page when the machine is idle, so the server gets a floor on the time per
denoising call instead of depending on the machine's load.

:class:`Server` starts that script on a free port (``tests/test_ui_browser.py``,
``tests/test_ui_security.py``).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path

START_TIMEOUT_S = 240  # importing torch and gradio on a busy machine
POLL_S = 0.25
STEP_DELAY_S = 0.15  # at least this per transformer call, so a job lasts long enough to watch


def hold_back(delay_s: float) -> None:
    from framepack.model.transformer import FramePackTransformer

    forward = FramePackTransformer.forward

    def slow_forward(self, *args, **kwargs):
        time.sleep(delay_s)
        return forward(self, *args, **kwargs)

    FramePackTransformer.forward = slow_forward


def free_port() -> int:
    """A port free now. The server binds it a moment later, from another process: under pytest-xdist
    worker i of n takes only ports with (port // 2) % n == i (Linux hands out odd ports to bind(0)), so
    that two workers never pick the same one (and a test never talks to the other worker's server)."""
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if (port // 2) % count == index:
            return port
    raise RuntimeError(f"no free port for xdist worker {index} of {count}")


class Server:
    """``framepack ui`` in a subprocess on a free port, its output in ``log``; ``env`` adds variables;
    ``devices`` (``cpu,cpu``) serves with one worker per device instead of the one CPU worker."""

    def __init__(self, outputs: Path, model: Path | str, log: Path, extra: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, verbose: bool = True, devices: str | None = None) -> None:
        self.outputs, self.model, self.log, self.extra = outputs, model, log, extra
        self.where = ("--device", "cpu") if devices is None else ("--devices", devices)
        self.env = env or {}
        self.verbose = verbose  # -v: log at INFO; without it, as `framepack ui` runs by default
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        command = [sys.executable, str(Path(__file__).resolve()), str(STEP_DELAY_S),
                   *(["-v"] if self.verbose else []), "--outputs", str(self.outputs), "--model", str(self.model), "--port", str(self.port),
                   "--poll-seconds", str(POLL_S), *self.where, *self.extra]
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **self.env}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return self._wait_until_serving()
        except BaseException:
            self.kill()
            raise

    def _wait_until_serving(self) -> "Server":
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def restart(self) -> "Server":
        """A new server process on the same outputs (and a new port)."""
        self.stop()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        return self.start()

    def kill(self) -> None:
        """As a crash would: no shutdown code runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def jobs(self) -> dict[int, dict]:
        """The job store, read directly (the test's view of what the server recorded)."""
        with closing(sqlite3.connect(self.outputs / "jobs.sqlite")) as db:
            db.row_factory = sqlite3.Row
            return {r["id"]: dict(r) for r in db.execute("SELECT * FROM jobs")}


if __name__ == "__main__":
    hold_back(float(sys.argv[1]))
    from framepack.ui.__main__ import main

    sys.exit(main(sys.argv[2:]))
