"""Jobs that meet the real world: diverged weights, damaged or missing pieces, two processes, a full disk.

Runs the tiny random model at 64 px; CLI cases go through the real ``framepack`` entry point.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack import jobs, video
from framepack.jobs import JobDir
from framepack.pipeline import Cancelled, FramePackPipeline, SectionFinished
from framepack.video import read_frames, read_metadata, settings_from_video
from test_generate import FRAMEPACK, settings_for, tiny_model, write_image  # noqa: F401  (tiny_model: a fixture)

SECTIONS = 3
SECONDS = 3.6  # 3 sections of 36 frames
FRAMES = 36 * SECTIONS + 1


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> FramePackPipeline:
    return FramePackPipeline.from_model(str(tiny_model))


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("inputs") / "photo.png")


@pytest.fixture(scope="module")
def reference(pipeline, tiny_model, image, tmp_path_factory) -> JobDir:
    """One uninterrupted run: what every repaired job must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    job = JobDir.create(root / "job", settings_for(tiny_model, image, seconds=SECONDS, steps=2), root / "out.mp4")
    pipeline.run(job)
    return job


def copy_job(job: JobDir, root: Path) -> JobDir:
    """A copy of a job directory whose video goes to ``root/out.mp4``."""
    shutil.copytree(job.root, root / "job")
    state = json.loads((root / "job" / jobs.STATE).read_text())
    (root / "job" / jobs.STATE).write_text(json.dumps({**state, "out": str(root / "out.mp4")}))
    return JobDir.open(root / "job")


def partial_job(pipeline, tiny_model, image, root: Path, sections: int) -> JobDir:
    job = JobDir.create(root / "job", settings_for(tiny_model, image, seconds=SECONDS, steps=2), root / "out.mp4")
    done: list = []

    def on_event(event) -> None:
        if isinstance(event, SectionFinished):
            done.append(event)

    with pytest.raises(Cancelled):
        pipeline.run(job, on_event=on_event, should_stop=lambda: len(done) >= sections)
    assert job.finished == sections
    return job


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FRAMEPACK, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("framepack: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


# ---- point 8: diverged weights --------------------------------------------------------------------------


def test_nan_weights_fail_the_first_section_and_commit_nothing(tiny_model, image, tmp_path):
    model = tmp_path / "diverged"
    shutil.copytree(tiny_model, model)
    weights = next((model / "FramePackI2V_HY").glob("*.safetensors"))
    tensors = load_file(str(weights))
    tensors["proj_out.weight"][0, 0] = float("nan")  # one poisoned weight, as a diverged fine-tune leaves them
    save_file(tensors, str(weights))
    out = tmp_path / "video.mp4"
    result = cli("generate", "--model", str(model), "--image", str(image), "--prompt", "a red circle",
                 "--seconds", "2.4", "--steps", "2", "--resolution", "64", "--out", str(out))
    line = one_line_error(result)
    assert "section 1/2 produced non-finite latents (NaN/Inf)" in line and "diverged" in line
    job = JobDir.open(tmp_path / "video.job")
    assert job.finished == 0
    assert not out.exists()
    assert not list(job.root.glob("sections/*")) and not list(job.root.glob("video/*"))


def test_a_diverged_vae_fails_the_section_before_anything_is_written(pipeline, tiny_model, image, tmp_path):
    """Finite latents decoded to NaN pixels would be a black 'finished' video just the same."""
    job = JobDir.create(tmp_path / "job", settings_for(tiny_model, image, seconds=2.4, steps=1), tmp_path / "out.mp4")
    weight = next(p for name, p in pipeline.c.vae.vae.named_parameters() if name.startswith("decoder") and p.ndim > 1)
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("inf"))
    try:
        with pytest.raises(ValueError, match=r"section 1/2 produced non-finite pixels \(NaN/Inf\): the VAE weights"):
            pipeline.run(job)
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert JobDir.open(job.root).finished == 0
    assert not list(job.root.glob("sections/*")) and not list(job.root.glob("video/*"))


# ---- point 11: missing pieces are rebuilt, damaged state is recovered -----------------------------------


def flip_a_byte(path: Path) -> None:
    """Damage that keeps the file's length and, for an mp4 or npy, its readability."""
    data = bytearray(path.read_bytes())
    at = len(data) * 3 // 4
    at += 3 - at % 4  # in an npy of float32 (data 4-aligned), the byte with the sign and exponent
    data[at] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [Path.unlink, flip_a_byte])
def test_a_missing_or_damaged_segment_is_rebuilt_from_the_latents(pipeline, reference, tmp_path, caplog, damage):
    job = copy_job(reference, tmp_path)
    present = sorted(job.root.glob("video/segment-*.mp4"))
    assert len(present) >= 2
    removed = present[len(present) // 2]
    damage(removed)
    with caplog.at_level("WARNING"):
        pipeline.run(job)
    named = [p.name for p in present if p.name in caplog.text]
    assert named == [removed.name]  # the intact segments were recognised as such
    frames = read_frames(job.out)
    assert frames.shape[0] == FRAMES
    assert np.array_equal(frames, read_frames(reference.out))
    assert removed.read_bytes() == (reference.root / "video" / removed.name).read_bytes()


@pytest.mark.parametrize("damage", [Path.unlink, flip_a_byte])
def test_a_missing_or_damaged_pending_edge_is_rebuilt_on_resume(pipeline, interrupted, reference, tmp_path, damage):
    job = copy_job(interrupted, tmp_path)
    pending = list(job.root.glob("video/pending-*.npy"))
    assert len(pending) == 1
    damage(pending[0])
    pipeline.run(job)
    assert np.array_equal(read_frames(job.out), read_frames(reference.out))


@pytest.mark.parametrize("torn_state", [False, True])
def test_a_finished_job_without_its_last_section_is_recovered(pipeline, reference, tmp_path, caplog, torn_state):
    job = copy_job(reference, tmp_path)
    job.section_path(SECTIONS - 1).unlink()
    (job.root / "video" / f"segment-{SECTIONS - 1:04d}.mp4").unlink(missing_ok=True)
    if torn_state:
        (job.root / jobs.STATE).write_text('{"finished": ')
    with caplog.at_level("WARNING"):
        repaired = JobDir.open(job.root)
        counted, recorded_out = repaired.finished, repaired.out
        repaired.out = tmp_path / "out.mp4"
        pipeline.run(repaired)
    if torn_state:  # rebuilt from the section files present, the video's place from job.json
        assert "state.json is damaged" in caplog.text
        assert counted == SECTIONS - 1 and recorded_out == reference.out
    else:
        assert f"{SECTIONS - 1:04d}.safetensors is missing: sections {SECTIONS}/{SECTIONS} onwards will be computed again" in caplog.text
    assert torch.equal(repaired.load_latents(SECTIONS - 1), reference.load_latents(SECTIONS - 1))
    assert np.array_equal(read_frames(repaired.out), read_frames(reference.out))
    assert JobDir.open(job.root).finished == SECTIONS  # state.json is whole again


def test_a_damaged_settings_file_is_named_with_the_way_out(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    (job.root / jobs.SETTINGS).write_text("{ not json")
    with pytest.raises(ValueError, match=r"settings.json is damaged .*start a new one"):
        JobDir.open(job.root)


def test_cli_resume_rebuilds_a_missing_segment(reference, tmp_path):
    job = copy_job(reference, tmp_path)
    segment = sorted(job.root.glob("video/segment-*.mp4"))[-1]
    segment.unlink()
    again = cli("generate", "--resume", str(job.root))
    assert again.returncode == 0, again.stderr
    assert f"{segment.name}; rebuilding from the saved latents" in again.stderr  # the user is told
    frames = read_frames(tmp_path / "out.mp4")
    assert frames.shape[0] == FRAMES and np.array_equal(frames, read_frames(reference.out))


# ---- point 5: --resume of damaged or foreign jobs -------------------------------------------------------


def _truncate(job: JobDir) -> str:
    path = job.section_path(0)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "0000.safetensors is damaged"


def _corrupt(job: JobDir) -> str:
    path = job.section_path(0)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit inside the latents: still a valid file
    path.write_bytes(bytes(data))
    return "0000.safetensors is damaged (its checksum does not match"


def _other_resolution(job: JobDir) -> str:
    settings = json.loads((job.root / jobs.SETTINGS).read_text())
    (job.root / jobs.SETTINGS).write_text(json.dumps({**settings, "resolution": 128}))
    return "made by another model or resolution"


def _other_model(job: JobDir) -> str:
    settings = json.loads((job.root / jobs.SETTINGS).read_text())
    (job.root / jobs.SETTINGS).write_text(json.dumps({**settings, "model": "tiny"}))
    return "a job cannot be continued with another model"


@pytest.fixture(scope="module")
def interrupted(pipeline, tiny_model, image, tmp_path_factory) -> JobDir:
    return partial_job(pipeline, tiny_model, image, tmp_path_factory.mktemp("interrupted"), sections=2)


@pytest.mark.parametrize("damage", [_truncate, _corrupt, _other_resolution, _other_model])
def test_cli_resume_of_a_damaged_or_foreign_job_names_the_problem(interrupted, tmp_path, damage):
    job = copy_job(interrupted, tmp_path)
    expected = damage(job)
    line = one_line_error(cli("generate", "--resume", str(job.root)))
    assert expected in line
    assert not (tmp_path / "out.mp4").exists()
    assert JobDir.open(job.root).finished == 2  # nothing was given up


# ---- point 12: one process per job; durable commits --------------------------------------------------------


def test_a_job_being_computed_is_refused_to_a_second_process(interrupted, tmp_path):
    job = copy_job(interrupted, tmp_path)
    job.acquire()
    try:
        result = cli("generate", "--resume", str(job.root))
        line = one_line_error(result)
        assert f"is already being computed by another process (pid {os.getpid()})" in line
        assert "loaded in" not in result.stderr  # refused before the model loads
        with pytest.raises(ValueError, match="already being computed"):  # the same goes within a process
            JobDir.open(job.root).acquire()
    finally:
        job.release()
    assert JobDir.open(job.root).finished == 2


def test_the_lock_dies_with_a_killed_process(interrupted, tmp_path):
    job = copy_job(interrupted, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from framepack.jobs import JobDir; job = JobDir.open(sys.argv[1]).acquire(); "
        "print('locked', flush=True); time.sleep(600)"), str(job.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            JobDir.open(job.root).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    JobDir.open(job.root).acquire().release()  # kill -9 left no stale lock


def test_every_commit_is_fsynced_before_its_rename(pipeline, tiny_model, image, tmp_path, monkeypatch):
    synced: set[str] = set()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    renamed: list[tuple[str, bool]] = []

    def replace(src, dst) -> None:
        renamed.append((str(dst), str(src) in synced))
        real_replace(src, dst)

    monkeypatch.setattr(jobs.os, "fsync", fsync)
    monkeypatch.setattr(jobs.os, "replace", replace)
    job = JobDir.create(tmp_path / "job", settings_for(tiny_model, image, seconds=2.4, steps=1), tmp_path / "out.mp4")
    pipeline.run(job)
    names = {Path(dst).name for dst, _ in renamed}
    assert {"state.json", "settings.json", "0000.safetensors", "0001.safetensors", "out.mp4"} <= names
    assert any(n.startswith("segment-") for n in names) and any(n.startswith("pending-") for n in names)
    assert all(was_synced for _, was_synced in renamed), [dst for dst, ok in renamed if not ok]
    assert str(job.root.resolve()) in synced and str((job.root / "sections").resolve()) in synced  # the renames too


# ---- point 13: a full disk ------------------------------------------------------------------------------------


needs_dev_full = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")


def fill_the_disk_at(path: Path) -> None:
    """Writes to ``path``'s temporary name fail with a real ENOSPC: it is made a link to /dev/full."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")


@needs_dev_full
def test_a_full_disk_names_the_file_and_leaves_no_tmp(pipeline, tiny_model, image, tmp_path):
    job = JobDir.create(tmp_path / "job", settings_for(tiny_model, image, seconds=SECONDS, steps=1), tmp_path / "out.mp4")
    fill_the_disk_at(job.section_path(1))
    with pytest.raises(OSError, match=r"^no space left on the device: could not write .*0001\.safetensors$") as caught:
        pipeline.run(job)
    assert caught.value.errno == errno.ENOSPC
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert JobDir.open(job.root).finished == 1 and not job.section_path(1).exists()


@needs_dev_full
@pytest.mark.parametrize("writer", ["segment", "concat", "pending", "section", "json", "fsync"])
def test_every_writer_reports_a_full_disk_the_same_way(tmp_path, monkeypatch, writer):
    """PyAV's, numpy's, safetensors' and our own writes, and an fsync that finds the disk full."""
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    video.write_segment(tmp_path / "a.mp4", frames)
    job = JobDir(tmp_path, settings_for("tiny", tmp_path / "a.png"), tmp_path / "out.mp4")
    target = {"pending": job.pending_path(0), "section": job.section_path(0)}.get(writer, tmp_path / "target")
    write = {
        "segment": lambda: video.write_segment(target, frames),
        "concat": lambda: video.concat_segments([tmp_path / "a.mp4"], target),
        "pending": lambda: job.save_pending(0, frames.astype(np.float32)),
        "section": lambda: job.save_latents(0, torch.zeros(1, 16, 9, 8, 8), torch.Generator().get_state()),
        "json": lambda: jobs.write_json(target, {"a": 1}),
        "fsync": lambda: jobs.write_json(target, {"a": 1}),
    }[writer]
    if writer == "fsync":  # delayed allocation: the write succeeded, the flush to the disk does not
        def fsync(fd: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(jobs.os, "fsync", fsync)
    else:
        fill_the_disk_at(target)
    with pytest.raises(OSError, match=f"^no space left on the device: could not write {target}$"):
        write()
    assert not target.exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


# ---- point 2 (the mp4 side): the video records the input's name, --from finds it again -----------------


def test_the_mp4_records_input_names_not_paths(reference, image, tmp_path, monkeypatch):
    recorded = read_metadata(reference.out)["framepack"]
    assert recorded["image"] == image.name == "photo.png"
    text = json.dumps(recorded)
    assert str(image.parent) not in text and str(reference.root) not in text and "/" not in recorded["image"]

    video_copy = tmp_path / "elsewhere" / "clip.mp4"
    video_copy.parent.mkdir()
    shutil.copyfile(reference.out, video_copy)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"made from the image 'photo.png', which is neither beside .* give it with --image"):
        settings_from_video(video_copy)
    assert settings_from_video(video_copy, image=str(image))["image"] == str(image)
    shutil.copyfile(image, tmp_path / "photo.png")  # the current directory
    assert Path(settings_from_video(video_copy)["image"]) == tmp_path / "photo.png"
    shutil.copyfile(image, video_copy.parent / "photo.png")  # beside the video comes first
    assert Path(settings_from_video(video_copy)["image"]) == video_copy.parent / "photo.png"


def test_a_job_without_its_copy_of_the_start_image_says_how_to_recover(interrupted, tmp_path):
    job = copy_job(interrupted, tmp_path)
    copy = next(job.root.glob("inputs/start.*"))
    copy.unlink()
    line = one_line_error(cli("generate", "--resume", str(job.root)))
    assert f"{copy}, the job's copy of its start image, is missing: put that image back" in line
