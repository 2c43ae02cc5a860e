"""Console entry points: every command imports, explains itself, and fails cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help(args):
    result = run(*args)
    assert result.returncode == 0
    assert "usage: framepack" in result.stdout


def test_bad_number_is_a_one_line_error():
    result = run("demo", "--sections", "0")
    assert result.returncode == 2
    assert "must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_context_stays_constant():
    from framepack.demo import run_random_weights_demo

    stats = run_random_weights_demo(sections=4, steps=1)
    assert [s.history_latents for s in stats] == [10, 19, 28, 37]
    # once 19 history latents exist, the packed context no longer grows
    assert stats[2].context_tokens == stats[3].context_tokens
    assert stats[0].context_tokens < stats[2].context_tokens
