import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py: the diffusers bridge

# Under pytest-xdist (`make test` runs `-n auto`: one worker per core) each worker keeps to one thread,
# and so do the processes its tests start (they inherit OMP_NUM_THREADS): torch's default of one
# thread per core in every worker would oversubscribe the cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    # Gradio's upload cache is one folder per machine (/tmp/gradio), its files named by their content,
    # and a web app that shuts down deletes every file it put there: a server of another worker (or of
    # another test run) would lose the same start image under its feet. Each test process gets its own
    # (the servers the tests start inherit it); tests that set their own keep theirs. An xdist controller
    # runs no tests, and its workers inherit its environment: it sets none.
    controller = not XDIST_WORKER and getattr(config.option, "numprocesses", None)
    if "GRADIO_TEMP_DIR" not in os.environ and not controller:
        config._framepack_gradio_dir = tempfile.mkdtemp(prefix=f"framepack-tests-gradio-{XDIST_WORKER or 'main'}-")
        os.environ["GRADIO_TEMP_DIR"] = config._framepack_gradio_dir


def pytest_unconfigure(config):
    folder = getattr(config, "_framepack_gradio_dir", None)
    if folder is not None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
