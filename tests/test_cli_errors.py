"""Bad input through the real ``framepack`` entry point: one line on stderr, exit 2, no traceback,
nothing written; a stopped run exits 128 + the signal with its job resumable; what the CLI says
before it starts (the real length, warnings) and what it must not do (import torch for --help)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file

from framepack.components import asset
from framepack.planning import FPS, frame_count, latent_count, real_seconds, section_count
from framepack.settings import DEFAULT_SEED
from framepack.video import read_frames
from tiny_hub import write_model_dir
from ui_tiny_model import write_image

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
# the embedded demo model at a small resolution: a section takes a second or two on a CPU
FAST = ["--model", "tiny", "--resolution", "64", "--prompt", "a circle"]


def framepack(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, timeout=timeout)


def in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The same ``main`` without a new interpreter (for the many variants of a case whose exit
    through the real entry point is covered by a subprocess test next to it: time)."""
    from framepack.cli import main

    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> str:
    err = result.stderr
    assert result.returncode == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("framepack: error: "), lines
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def assert_nothing_written(folder: Path, before: set[Path] = frozenset()) -> None:
    """No video, no job directory, no temporary file: the folder holds what it held before."""
    assert set(folder.rglob("*")) == set(before), sorted(set(folder.rglob("*")) - set(before))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("image") / "start.png")


@pytest.fixture(scope="module")
def world_image(tmp_path_factory) -> Path:
    """A start frame of the demo model's own world: the model warns about none (framepack.world_check)."""
    from PIL import Image

    from framepack.train import world

    path = tmp_path_factory.mktemp("world_image") / "start.png"
    Image.fromarray(world.render(next(world.stream(3, "independent")), 1, size=64)[0]).save(path)
    return path


# ---- point 5: damaged components, one error-translating layer ----------------------------------------------


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory) -> Path:
    """The tiny hub (HunyuanVideo + flux_redux + FramePack layouts) behind one framepack.json."""
    return write_model_dir(tmp_path_factory.mktemp("hub_model"), mode="inverted", resolution=64)[0]


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _reshape_first_tensor(file: Path) -> None:
    tensors = load(file.read_bytes())  # read into memory: the file is rewritten below
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 5)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _pickle_instead(folder: Path) -> None:
    """The weights as a pickle pytorch_model.bin (what older checkpoints ship), no safetensors."""
    weights = folder / "model.safetensors"
    torch.save(load(weights.read_bytes()), folder / "pytorch_model.bin")
    weights.unlink()


def _pickle_renamed(file: Path) -> None:
    torch.save(load(file.read_bytes()), file)  # a pickle under the .safetensors name


H = "HunyuanVideo"
# (name, hub or demo layout, damage, component named in the message, the problem named)
DAMAGE = [
    ("vae truncated", "hub", lambda m: _truncate(m / H / "vae" / "diffusion_pytorch_model.safetensors"), "VAE", "truncated"),
    ("vae mis-shaped", "hub", lambda m: _reshape_first_tensor(m / H / "vae" / "diffusion_pytorch_model.safetensors"),
     "VAE", "shape"),
    ("text encoder truncated", "hub", lambda m: _truncate(m / H / "text_encoder" / "model.safetensors"),
     "text encoder (LLaMA)", "truncated"),
    ("text encoder mis-shaped", "hub", lambda m: _reshape_first_tensor(m / H / "text_encoder_2" / "model.safetensors"),
     "text encoder 2 (CLIP)", "wrong shape"),
    ("text encoder pickle .bin", "hub", lambda m: _pickle_instead(m / H / "text_encoder"),
     "text encoder (LLaMA)", "pickle"),
    ("pickle renamed .safetensors", "hub", lambda m: _pickle_renamed(m / H / "text_encoder" / "model.safetensors"),
     "text encoder (LLaMA)", "pickle"),
    ("image encoder pickle .bin", "hub", lambda m: _pickle_instead(m / "flux_redux_bfl" / "image_encoder"),
     "image encoder (SigLIP)", "pickle"),
    ("tokenizer missing", "hub", lambda m: shutil.rmtree(m / H / "tokenizer"), "tokenizer (LLaMA)", "does not exist"),
    ("small vae truncated", "demo", lambda m: _truncate(m / "vae" / "model.safetensors"), "VAE", "truncated"),
    ("small vae mis-shaped", "demo", lambda m: _reshape_first_tensor(m / "vae" / "model.safetensors"), "VAE", "size mismatch"),
    ("transformer mis-shaped", "demo", lambda m: _reshape_first_tensor(m / "transformer" / "diffusion_pytorch_model.safetensors"),
     "transformer", "wrong shape"),
]


# the cases the issue names go through the real entry point; the others through main() in-process
ENTRY_POINT = {"vae truncated", "text encoder mis-shaped", "text encoder pickle .bin", "pickle renamed .safetensors",
               "small vae truncated"}


@pytest.mark.parametrize("name, layout, damage, component, problem", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_component_is_one_line_naming_it(name, layout, damage, component, problem, hub_model, world_image,
                                                   tmp_path, capsys):
    image = world_image  # a random image would add the demo world's warning line before the error
    model = tmp_path / "model"
    shutil.copytree(hub_model if layout == "hub" else asset("tiny"), model)
    damage(model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["generate", "--model", str(model), "--image", str(image), "--prompt", "a circle", "--seconds", "1",
            "--steps", "1", "--out", str(out_dir / "video.mp4")]
    result = framepack(*args) if name in ENTRY_POINT else in_process(capsys, *args)
    line = assert_one_line_error(result, f"cannot load the {component} from", problem)
    assert "Loading weights" not in result.stderr and str(model) in line
    assert_nothing_written(out_dir)


def test_one_line_keeps_the_gist_of_a_library_message():
    from framepack.components import one_line

    lead = RuntimeError("Error(s) in loading state_dict for X:\n\tsize mismatch for w: (3, 5) vs (3,)\n\tmore")
    assert one_line(lead) == "Error(s) in loading state_dict for X: size mismatch for w: (3, 5) vs (3,)"
    wordy = ValueError("Cannot load w because of its shape. " + "If you want to do something else, " * 20 + "pass flags.")
    assert one_line(wordy, limit=80) == "Cannot load w because of its shape."
    assert one_line(OSError()) == "OSError"


# ---- point 5: devices, before anything loads ----------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "banana", "cuda:99", "cuda"])
def test_a_device_that_is_not_here_is_one_line_before_loading(device, image, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = ["generate", *FAST, "--image", str(image), "--device", device, "--out", str(tmp_path / "v.mp4")]
    result = framepack(*args) if device in ("gpu", "cuda") else in_process(capsys, *args)
    assert "model tiny" not in result.stderr  # refused before loading
    assert_one_line_error(result, repr(device))
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("device", ["banana", "cuda:99"])
def test_the_web_app_checks_its_device_the_same_way(device, tmp_path, capsys):
    result = in_process(capsys, "ui", "--device", device, "--outputs", str(tmp_path / "outputs"))
    assert_one_line_error(result, repr(device))
    assert not (tmp_path / "outputs").exists()  # refused before the job store is made


# ---- point 5: --from a video whose comment is JSON but not framepack's object ------------------------------


@pytest.mark.parametrize("comment", ["[1, 2]", "5", '"framepack"', '{"framepack": 5}', '{"framepack": [1]}'])
def test_from_a_video_with_foreign_json_metadata(comment, tmp_path, capsys):
    import av
    import numpy as np

    video = tmp_path / "other.mp4"
    with av.open(str(video), "w") as container:
        container.metadata["comment"] = comment
        stream = container.add_stream("libx264", rate=30)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    before = set(tmp_path.rglob("*"))
    args = ["generate", "--from", str(video), "--out", str(tmp_path / "again.mp4")]
    result = framepack(*args) if comment == "[1, 2]" else in_process(capsys, *args)
    assert_one_line_error(result, str(video))
    assert_nothing_written(tmp_path, before)


# ---- point 7: --out, before the model loads ------------------------------------------------------------------


def test_out_problems_are_caught_before_the_model_loads(image, tmp_path, capsys):
    existing = tmp_path / "existing.mp4"
    existing.write_bytes(b"my holiday video")
    (tmp_path / "folder.mp4").mkdir()
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    cases = {
        "an existing file": (existing, "already exists; pass --overwrite"),
        "a directory": (tmp_path / "folder.mp4", "is a directory"),
        "not mp4": (tmp_path / "video.avi", "must name an .mp4"),
        "under a file": (not_a_dir / "video.mp4", "is not a directory"),
        "an unwritable place": (Path("/proc/framepack-test/video.mp4"), "cannot write in /proc"),
    }
    before = set(tmp_path.rglob("*"))
    for name, (out, message) in cases.items():
        args = ["generate", *FAST, "--image", str(image), "--out", str(out)]
        result = framepack(*args) if name == "an existing file" else in_process(capsys, *args)
        assert_one_line_error(result, message)
        assert "model tiny" not in result.stderr, name  # refused before loading
        assert_nothing_written(tmp_path, before)
    assert existing.read_bytes() == b"my holiday video"


# ---- point 10: settings checked before anything is created; --resume takes no settings ------------------------


def test_section_prompts_that_do_not_match_the_sections_write_nothing(image, tmp_path, capsys):
    seconds = 5.0
    count = section_count(seconds)
    args = ["generate", *FAST, "--image", str(image), "--seconds", str(seconds), "--out", str(tmp_path / "v.mp4")]
    for given in (2, count + 1):
        prompts = [f"--section-prompt=part {i}" for i in range(given)]
        result = framepack(*args, *prompts) if given == 2 else in_process(capsys, *args, *prompts)
        assert_one_line_error(result, f"{given} section prompts", f"{count} sections")
        assert_nothing_written(tmp_path)


# ---- points 6, 7, 10, 13, 15: real runs of the demo model ---------------------------------------------------


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([FRAMEPACK, "-v", *args], stderr=subprocess.PIPE, text=True)


def _read_until(process: subprocess.Popen, marker: str) -> str:
    """stderr up to and including the first line holding ``marker``."""
    seen = ""
    for line in process.stderr:
        seen += line
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} never came:\n{seen}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_stops_cleanly_and_the_job_resumes(signum, image, tmp_path):
    out = tmp_path / "video.mp4"
    seconds = 8.0
    process = _start(["generate", *FAST, "--image", str(image), "--seconds", str(seconds), "--steps", "3",
                      "--out", str(out)])
    try:
        seen = _read_until(process, "section 1/")  # mid-run: one section finished, more to come
        process.send_signal(signum)
        err = seen + process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        process.kill()
    job = tmp_path / "video.job"
    assert code == 128 + signum, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert f"interrupted; finished sections are kept in {job}" in err and f"--resume {job}" in err
    state = json.loads((job / "state.json").read_text())
    assert 1 <= state["finished"] < section_count(seconds)
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))

    # --resume: options that would change the video are refused by name; harmless ones are fine
    refused = framepack("generate", "--resume", str(job), "--seed", "5", "--model", "tiny", "--prompt", "x",
                        "--out", str(tmp_path / "other.mp4"))
    assert_one_line_error(refused, "--seed", "--model", "--prompt", "--out")
    # stopped again while the model loads: the job exists now, and the message says so
    again = _start(["generate", "--resume", str(job)])
    try:
        seen = _read_until(again, "loading transformer")
        again.send_signal(signum)
        err = seen + again.stderr.read()
        assert again.wait(timeout=120) == 128 + signum, err
    finally:
        again.kill()
    assert f"finished sections are kept in {job}" in err and "Traceback" not in err, err
    resumed = framepack("generate", "-v", "--resume", str(job), "--device", "cpu", "--dtype", "fp32")
    assert resumed.returncode == 0, resumed.stderr
    assert read_frames(out).shape[0] == frame_count(latent_count(section_count(seconds)))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_loading_mentions_no_job(signum, image, tmp_path):
    process = _start(["generate", *FAST, "--image", str(image), "--out", str(tmp_path / "video.mp4")])
    try:
        seen = _read_until(process, "loading transformer")  # -v: the model is loading
        process.send_signal(signum)
        err = seen + process.stderr.read()
        code = process.wait(timeout=120)
    finally:
        process.kill()
    assert code == 128 + signum, err
    assert "Traceback" not in err and "terminate called" not in err, err
    assert "interrupted" in err.splitlines()[-1]
    assert "job directory" not in err and "--resume" not in err  # there is none yet
    assert not list(tmp_path.rglob("*")), "nothing is written before the job starts"


def test_a_run_says_its_length_and_warns_and_out_needs_overwrite(image, tmp_path):
    """The real length before the run; warnings for cfg 0, an unused timeline segment and a
    truncated prompt; no library progress bars; an existing --out kept unless --overwrite."""
    out = tmp_path / "video.mp4"
    seconds = 1.0
    long_prompt = " ".join(["circle"] * 400)
    args = ["generate", "--model", "tiny", "--resolution", "64", "--image", str(image), "--seconds", str(seconds),
            "--steps", "1", "--cfg", "0", "--out", str(out),
            "--prompt", f"[0s-1s: {long_prompt}] [30s-40s: a segment after the end]"]
    first = framepack(*args)
    assert first.returncode == 0, first.stderr
    err = first.stderr
    assert f"video of {real_seconds(seconds):.2f} s ({frame_count(latent_count(section_count(seconds)))} frames at {FPS} fps" in err
    assert "whole sections), forward mode (the model's default up to 5 s)\n" in err  # tiny: forward up to 5 s
    assert read_frames(out).shape[0] == frame_count(latent_count(section_count(seconds)))
    assert "warning: cfg 0" in err and "the prompt has no effect" in err
    assert "warning: prompt segment [30s-40s: a segment after the end] is used by no section" in err
    assert "too long for the LLaMA text encoder" in err
    assert "Loading weights" not in err and "Traceback" not in err
    made = out.stat().st_mtime_ns

    again = framepack(*args)
    assert_one_line_error(again, "already exists", "--overwrite")
    assert out.stat().st_mtime_ns == made
    replaced = framepack(*args, "--seed", "4", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert out.stat().st_mtime_ns != made
    assert json.loads((tmp_path / "video.job" / "settings.json").read_text())["seed"] == 4
    assert not list(tmp_path.rglob("*.tmp"))


# ---- points 14, 17: help ------------------------------------------------------------------------------------


CHECK_IMPORTS = """
import sys
from framepack.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "diffusers", "gradio") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["generate", "--help"], ["eval", "--help"],
                                  ["ui", "--help"], ["train", "--help"], ["generate", "--steps", "x"],
                                  ["demo", "--no-such-option"], []])
def test_help_and_argument_errors_import_no_torch(args):
    result = subprocess.run([sys.executable, "-c", CHECK_IMPORTS, *args], capture_output=True, text=True, timeout=60)
    assert result.stderr.strip().splitlines()[-1] == "[]", result.stderr


def test_help_states_the_demo_models_own_defaults():
    manifest = json.loads((asset("tiny") / "framepack.json").read_text())
    student = json.loads((asset("tiny-fast") / "framepack.json").read_text())
    demo_help = framepack("demo", "--help").stdout
    generate_help = " ".join(framepack("generate", "--help").stdout.split())
    assert f"default cfg {manifest['cfg']:g}" in " ".join(demo_help.split())  # the teacher's
    assert f"tiny-fast: {student['steps']} steps at cfg {student['cfg']:g}" in " ".join(demo_help.split())
    assert f"{manifest['cfg']:g} for the demo model" in generate_help
    assert f"default {DEFAULT_SEED}" in " ".join(demo_help.split()) and f"default {DEFAULT_SEED}" in generate_help

    from framepack.cli import build_parser
    from framepack.demo import demo_settings

    assert build_parser().parse_args(["demo"]).seed == DEFAULT_SEED == demo_settings().seed


def test_an_interruption_inside_a_loader_stays_an_interruption():
    """A signal's exception that breaks a library's cleanup (torch: 'pop from empty mode stack') is
    reported as the interruption, not as a component that cannot load."""
    from framepack.components import loading

    class Stop(BaseException):
        pass

    with pytest.raises(Stop):
        with loading("transformer", "somewhere"):
            try:
                raise Stop()
            finally:
                raise RuntimeError("trying to pop from empty mode stack")
