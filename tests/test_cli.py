"""Console entry points: every command imports, explains itself, and fails cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["generate", "--help"]])
def test_help(args):
    result = run(*args)
    assert result.returncode == 0
    assert "usage: framepack" in result.stdout


def test_bad_number_is_a_one_line_error():
    result = run("demo", "--steps", "0")
    assert result.returncode == 2
    assert "must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["inverted", "forward", "vanilla"])
def test_demo_context_tokens_are_constant_and_match_the_model(mode):
    """The demo's per-section token count: the same in every section, and what the embedders produce."""
    import torch

    from framepack import FramePackTransformer
    from framepack.demo import context_tokens
    from framepack.packing import RELEASED_SCHEDULE, context_bound
    from framepack.planning import plan_sections

    plans = plan_sections(7, mode, RELEASED_SCHEDULE, 9)
    anchor = 0 if mode == "vanilla" else 8 * 8  # vanilla packs no start-frame anchor (one 1x frame)
    bound = context_bound(RELEASED_SCHEDULE, 16, 16) - (8 * 8 - anchor)
    assert {context_tokens(p, 16, 16) for p in plans} == {bound}
    model = FramePackTransformer("tiny")
    plan = plans[-1]
    embedded = model.x_embedder(torch.zeros(1, 16, 9, 16, 16)).shape[1] + sum(
        model.clean_x_embedder(torch.zeros(1, 16, len(level.indices), 16, 16), level.kernel).shape[1]
        for level in plan.levels
    )
    assert context_tokens(plan, 16, 16) == embedded


# ---- bad input: one line, exit 2, no traceback, no video -------------------------------------------


def _png(path, mode="RGB", size=(32, 32)):
    from PIL import Image

    Image.new(mode, size).save(path)
    return path


@pytest.fixture
def good_image(tmp_path):
    return _png(tmp_path / "ok.png")


def _bad_cases(tmp_path, good_image):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "text.png").write_text("hello, I am not an image")
    _png(tmp_path / "huge.png", mode="1", size=(8000, 6000))
    g = ["--image", str(good_image), "--prompt", "a cat"]
    return {
        "missing image": (["--image", str(tmp_path / "nope.png"), "--prompt", "a cat"], "image not found"),
        "empty image": (["--image", str(tmp_path / "empty.png"), "--prompt", "a cat"], "empty"),
        "corrupt image": (["--image", str(tmp_path / "corrupt.png"), "--prompt", "a cat"], "not a readable image"),
        "not an image": (["--image", str(tmp_path / "text.png"), "--prompt", "a cat"], "not a readable image"),
        "too many pixels": (["--image", str(tmp_path / "huge.png"), "--prompt", "a cat"], "the limit is"),
        "zero seconds": (g + ["--seconds", "0"], "seconds must be > 0"),
        "too long": (g + ["--seconds", "1000"], "seconds must be > 0 and <= 120"),
        "zero steps": (g + ["--steps", "0"], "steps must be between 1"),
        "nan guidance": (g + ["--distilled-guidance", "nan"], "expected a finite number"),
        "negative guidance": (g + ["--distilled-guidance", "-1"], "distilled guidance must be"),
        "negative cfg": (g + ["--cfg", "-2"], "cfg must be"),
        "bad timeline": (["--image", str(good_image), "--prompt", "[0s-2s a cat"], "malformed prompt timeline"),
        "unknown model": (g + ["--model", "no-such-model"], "unknown model"),
        "missing model dir": (g + ["--model", str(tmp_path / "models" / "missing")], "no such directory"),
        "bad resume": (["--resume", str(tmp_path / "nojob")], "not a framepack job directory"),
        "bad from": (["--from", str(tmp_path / "text.png")], "no framepack settings"),
        "not mp4 out": (g + ["--model", "no-such-model", "--out", str(tmp_path / "x.avi")], "unknown model"),
    }


def test_bad_inputs_fail_cleanly(tmp_path, good_image, capsys):
    """In-process for speed; test_bad_number_is_a_one_line_error covers the real process exit."""
    from framepack.cli import main

    for name, (args, message) in _bad_cases(tmp_path, good_image).items():
        try:
            out = [] if "--resume" in args else ["--out", str(tmp_path / "out" / "video.mp4")]
            code = main(["generate", *args, *out])
        except SystemExit as exc:  # argparse rejects some values itself
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert "Traceback" not in err, name
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (name, lines)
    assert not list(tmp_path.rglob("*.mp4"))


@pytest.mark.parametrize("mode, size", [("CMYK", (20, 30)), ("RGBA", (20, 30)), ("P", (20, 30)), ("I;16", (20, 30)),
                                        ("LA", (5, 7)), ("L", (9, 9))])
def test_image_modes_are_converted(tmp_path, mode, size):
    from PIL import Image

    from framepack.images import load_image

    img = Image.new(mode, size)
    if mode == "I;16":
        img = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    rgb = load_image(path)
    assert rgb.shape == (size[1], size[0], 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert int(rgb[0, 0, 0]) == round(40000 / 65535 * 255)
    if mode == "RGBA":  # fully transparent black on white -> white
        assert int(rgb.min()) == 255
