"""Applying a memory plan to a loaded pipeline (runtime.apply) on CPU: placement must not change
the video. CPU only: the device moves are no-ops here; storage, block offload (to disk) and the
used-once wrappers run for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_hub import write_model_dir

from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.runtime.apply import CLIP, LLAMA, SIGLIP, TRANSFORMER, VAE, apply_plan, load_options
from framepack.runtime.placement import QuantizedLinear
from framepack.runtime.plan import Choice, ComponentPlan, Job, MemoryPlan
from framepack.settings import GenerationSettings
from framepack.video import read_frames

NAMES = (TRANSFORMER, LLAMA, CLIP, SIGLIP, VAE)
STORED = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"), mode="inverted")[0]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("image") / "start.png"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def plan_of(**choices: Choice) -> MemoryPlan:
    """A plan made by hand (the planner would not choose these for a tiny model): keyword per
    component, transformer=..., the rest resident bf16."""
    by_name = {TRANSFORMER: choices.get("transformer", Choice()),
               LLAMA: choices.get("llama", choices.get("text", Choice())),
               CLIP: choices.get("text", Choice()), SIGLIP: choices.get("image", Choice()), VAE: choices.get("vae", Choice())}
    components = tuple(ComponentPlan(name, 0, by_name[name], 0, 0) for name in NAMES)
    return MemoryPlan("tiny", Job(resolution=64, window=9), None, components, (), ())


def video(model: Path, image: Path, root: Path, plan: MemoryPlan | None) -> np.ndarray:
    """Frames of a 1-section, 2-step video made by a fresh pipeline, with ``plan`` applied if given."""
    pipeline = FramePackPipeline.from_model(str(model))
    settings = GenerationSettings(image=str(image), prompt="a red circle moves", model=str(model), seconds=1.0,
                                  steps=2, resolution=64, seed=3)
    job = JobDir.create(root / "job", settings, root / "out.mp4")
    if plan is None:
        pipeline.run(job)
        return read_frames(job.out)
    with apply_plan(pipeline, plan, "cpu", offload_dir=root / "offload") as placement:
        storage = plan.component(TRANSFORMER).choice.storage
        if storage != "bf16":
            stored = [m.weight.dtype for m in pipeline.c.transformer.modules() if isinstance(m, QuantizedLinear)]
            assert stored and set(stored) == {STORED[storage]}  # and not undone by a later cast
        pipeline.run(job)
        folders = list(placement.folders)
    assert all(not folder.exists() for folder in folders)  # close() removed the offload files
    return read_frames(job.out)


def test_fp8_disk_offload_and_used_once_encoders_equal_fp8_resident(tiny_model, image, tmp_path):
    fp8 = Choice("resident", "fp8")
    resident = video(tiny_model, image, tmp_path / "resident", plan_of(transformer=fp8))
    offloaded = plan_of(transformer=Choice("disk", "fp8"), text=Choice("phase"), image=Choice("phase"),
                        vae=Choice("phase"))
    placed = video(tiny_model, image, tmp_path / "placed", offloaded)
    assert placed.shape == resident.shape and placed.shape[0] > 1
    assert np.array_equal(placed, resident)


def test_llama_block_offload_to_disk_equals_resident(tiny_model, image, tmp_path):
    # the planner offers block offload to LLaMA too (its ``layers``): diffusers' hooks stream them
    resident = video(tiny_model, image, tmp_path / "resident", plan_of())
    offloaded = video(tiny_model, image, tmp_path / "llama", plan_of(llama=Choice("disk", "fp8")))
    fp8_resident = video(tiny_model, image, tmp_path / "llama8", plan_of(llama=Choice("resident", "fp8")))
    assert np.array_equal(offloaded, fp8_resident) and not np.array_equal(offloaded, resident)


def test_resident_plan_in_the_loaded_dtype_equals_no_plan(tiny_model, image, tmp_path):
    plain = video(tiny_model, image, tmp_path / "plain", None)
    planned = video(tiny_model, image, tmp_path / "planned", plan_of())
    assert np.array_equal(planned, plain)
    fp8 = video(tiny_model, image, tmp_path / "fp8", plan_of(transformer=Choice("resident", "fp8")))
    assert not np.array_equal(fp8, plain)  # the fp8 plan did change the weights: storage was applied


def test_a_plan_for_other_components_is_one_line(tiny_model):
    pipeline = FramePackPipeline.from_model(str(tiny_model))
    plan = MemoryPlan("x", Job(), None, (ComponentPlan(TRANSFORMER, 0, Choice(), 0, 0),), (), ())
    with pytest.raises(ValueError, match="the memory plan names"):
        apply_plan(pipeline, plan, torch.device("cpu"))


def test_int8_offload_to_cpu_equals_int8_phase_transformer(tiny_model, image, tmp_path):
    # the two other transformer placements: blocks streamed from host memory, and the whole model
    # moved on at its first step (pre-hook) and off before the VAE runs
    offloaded = video(tiny_model, image, tmp_path / "offload", plan_of(transformer=Choice("offload", "int8")))
    phase = video(tiny_model, image, tmp_path / "phase", plan_of(transformer=Choice("phase", "int8"),
                                                                 vae=Choice("phase")))
    assert np.array_equal(offloaded, phase)


def test_vae_tiles_as_planned_and_close_puts_the_encoders_back(tiny_model, tmp_path):
    pipeline = FramePackPipeline.from_model(str(tiny_model))
    originals = (pipeline.c.text, pipeline.c.image, pipeline.c.vae)
    plan = plan_of(text=Choice("phase"), vae=Choice("phase", tile=32))
    with apply_plan(pipeline, plan, "cpu", offload_dir=tmp_path):
        vae = pipeline.c.vae.vae  # through the wrapper: the diffusers model
        assert vae.use_tiling and vae.tile_sample_min_height == vae.tile_sample_min_width == 32
        assert vae.tile_sample_stride_height < 32  # tiles overlap, for the blend
        assert pipeline.c.text is not originals[0]  # wrapped: on the device only while encoding
        assert pipeline.c.text.crop_start == originals[0].crop_start  # the rest is the encoder's own
    assert (pipeline.c.text, pipeline.c.image, pipeline.c.vae) == originals


def test_a_plan_that_cannot_be_applied_leaves_no_offload_folder(tiny_model, tmp_path):
    pipeline = FramePackPipeline.from_model(str(tiny_model))
    text = pipeline.c.text
    plan = plan_of(transformer=Choice("disk"), text=Choice("offload"))  # block offload of CLIP (no blocks)
    with pytest.raises(ValueError, match="offloads the text encoder 2 \\(CLIP\\) block by block"):
        apply_plan(pipeline, plan, "cpu", offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [] and pipeline.c.text is text


def test_an_fp8_plan_loads_straight_into_fp8_and_makes_the_same_video(tiny_model, image, tmp_path):
    """What ``generate --memory`` does with an fp8 plan: the block weights are read into float8 from
    the file (no full-precision copy first), and placing the plan then gives the video of a model
    loaded in full precision and stored in fp8 afterwards: the same quantization either way."""
    from framepack.components import load_components, resolve_model
    from framepack.model.io import fp8_weight_names

    fp8 = plan_of(transformer=Choice("resident", "fp8"))
    assert load_options(fp8) == {"storage_dtype": torch.float8_e4m3fn, "mapped": False}
    assert load_options(plan_of(transformer=Choice("disk", "fp8")))["mapped"]  # streamed: left in the file
    assert load_options(plan_of()) == load_options(None) == {"storage_dtype": None, "mapped": False}
    components = load_components(resolve_model(str(tiny_model)), **load_options(fp8))
    weights = dict(components.transformer.named_parameters())
    names = fp8_weight_names(components.transformer)
    assert names and {weights[name].dtype for name in names} == {torch.float8_e4m3fn}
    job = JobDir.create(tmp_path / "job", GenerationSettings(
        image=str(image), prompt="a red circle moves", model=str(tiny_model), seconds=1.0, steps=2, resolution=64,
        seed=3), tmp_path / "out.mp4")
    pipeline = FramePackPipeline(components, "cpu")
    with apply_plan(pipeline, fp8, "cpu", offload_dir=tmp_path / "offload"):
        pipeline.run(job)
    assert np.array_equal(read_frames(job.out), video(tiny_model, image, tmp_path / "stored", fp8))
