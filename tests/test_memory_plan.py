"""The memory planner (issue 16, points 1 and 3): on the 13B meta model, every plan's predicted
peaks fit its budget and its parameter bytes are the meta model's; more memory never gives a
worse plan; an impossible budget names the smallest one that works, and that one plans.

Everything here is a prediction checked for consistency, on CPU: nothing is measured on a GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from framepack.model import FramePackTransformer
from framepack.runtime.plan import (
    NO_CUDA,
    GiB,
    Budget,
    Choice,
    Job,
    NoPlanError,
    candidates,
    plan_memory,
    transformer_tokens,
    usable,
    vae_decode_work,
    weight_bytes,
)
from framepack.runtime.sizes import model_sizes

VRAM_BUDGETS = (6, 8, 12, 16, 24, 48, 80)
RAM_BUDGETS = (16, 32, 64)
MANIFEST = Path(__file__).parent / "data" / "framepack_13b_state_dict.json"


@pytest.fixture(scope="module")
def sizes():
    return model_sizes("framepack-i2v")


@pytest.fixture(scope="module")
def found(sizes):
    return candidates(sizes, Job(640, 9, 1))


# ---- sizes --------------------------------------------------------------------------------------------


def test_transformer_size_is_the_released_checkpoints(sizes):
    manifest = json.loads(MANIFEST.read_text())
    assert sizes.transformer.params == manifest["num_parameters"]
    assert len(sizes.transformer.blocks) == 20 + 40  # dual- and single-stream blocks, the offload unit


def test_encoder_and_vae_sizes_match_their_published_sizes(sizes):
    """Published parameter counts (to 2%): LLaMA-3-8B without lm_head 7.50e9, CLIP-L text 123e6,
    SigLIP so400m vision 428e6, HunyuanVideo VAE 246e6."""
    published = {"text encoder (LLaMA)": 7.50e9, "text encoder 2 (CLIP)": 123e6, "image encoder (SigLIP)": 428e6,
                 "VAE": 246e6}
    counted = {c.name: c.params for c in (*sizes.encoders, sizes.vae)}
    assert counted.keys() == published.keys()
    for name, params in published.items():
        assert counted[name] == pytest.approx(params, rel=0.02), name


@pytest.mark.parametrize("storage", ["bf16", "fp8", "int8"])
def test_plan_bytes_are_what_the_storage_mechanism_stores(sizes, storage):
    """The bytes the planner counts for a storage mode are those runtime.placement.store_weights
    really leaves in the 13B transformer (built on the meta device: no memory used)."""
    from framepack.runtime.placement import store_weights, stored_bytes

    with torch.device("meta"):
        model = FramePackTransformer("hunyuan-13b")
    store_weights(model, storage)
    assert weight_bytes(sizes.transformer, storage) == stored_bytes(model)


# ---- plans on the 13B meta model ---------------------------------------------------------------------


@pytest.mark.parametrize("vram", VRAM_BUDGETS)
@pytest.mark.parametrize("ram", RAM_BUDGETS)
def test_plan_fits_its_budget_and_counts_every_parameter(sizes, found, vram, ram):
    budget = Budget.gb(vram, ram)
    plan = plan_memory(sizes, Job(640, 9, 1), budget, found)
    assert plan.fits(budget)  # within the usable part: the budget less the safety margin
    assert [p.phase for p in plan.phases] == ["encode", "sample", "decode"]
    for phase in plan.phases:
        assert 0 < phase.vram <= budget.vram and 0 < phase.ram <= budget.ram, phase
    meta_params = {c.name: c.params for c in sizes.components}
    assert {c.name: c.params for c in plan.components} == meta_params
    for c in plan.components:
        size = next(s for s in sizes.components if s.name == c.name)
        assert c.weight_bytes == weight_bytes(size, c.choice.storage)
        if c.choice.storage == "bf16":
            assert c.weight_bytes == 2 * meta_params[c.name]
        else:  # 8-bit Linear weights: between 1 and 2 bytes per parameter
            assert meta_params[c.name] < c.weight_bytes < 2 * meta_params[c.name]
        assert 0 < c.gpu_bytes <= c.weight_bytes


def test_the_13b_needs_no_compromise_with_memory_to_spare(sizes, found):
    plan = plan_memory(sizes, Job(640, 9, 1), Budget.gb(10_000, 10_000), found)
    assert all(c.choice.placement == "resident" and c.choice.storage == "bf16" and c.choice.tile is None
               for c in plan.components)
    # and a 6 GB card cannot hold the 24 GB of bf16 transformer weights: it streams blocks
    small = plan_memory(sizes, Job(640, 9, 1), Budget.gb(6, 64), found)
    assert small.component("transformer").choice.placement in ("offload", "disk")
    assert small.component("transformer").gpu_bytes < 6 * GiB


budgets = st.tuples(st.floats(1, 100), st.floats(4, 100))


@settings(max_examples=60, deadline=None)
@given(budgets, budgets)
def test_more_memory_never_gives_a_worse_plan(sizes, found, a, b):
    """Plans are ordered by their key (disk bytes, storage, offload, tiling, moves: smaller is
    better); with at least as much VRAM and RAM the plan's key is never larger."""
    small = Budget.gb(min(a[0], b[0]), min(a[1], b[1]))
    large = Budget.gb(max(a[0], b[0]), max(a[1], b[1]))
    try:
        worse = plan_memory(sizes, Job(640, 9, 1), small, found)
    except NoPlanError:
        return
    better = plan_memory(sizes, Job(640, 9, 1), large, found)  # a larger budget never loses the plan
    assert better.key <= worse.key


@pytest.mark.parametrize("vram, ram", [(2, 64), (3, 16), (80, 3), (0.5, 2)])
def test_an_impossible_budget_names_the_smallest_that_works(sizes, found, vram, ram):
    job = Job(640, 9, 1)
    with pytest.raises(NoPlanError) as caught:
        plan_memory(sizes, job, Budget.gb(vram, ram), found)
    smallest = caught.value.smallest
    named = re.search(r"the smallest that works is ([\d.]+) GB VRAM with ([\d.]+) GB RAM", str(caught.value))
    assert named, caught.value
    typed = Budget.gb(float(named.group(1)), float(named.group(2)))  # what a user would type back
    assert typed.vram >= smallest.vram - GiB // 100 and typed.ram >= smallest.ram - GiB // 100
    plan = plan_memory(sizes, job, typed, found)  # it really plans
    assert plan.fits(typed)
    # and it is the smallest, to the 0.1 GB it is rounded to, where one budget was kept: less of
    # the one raised, with the other unchanged, does not plan
    asked = Budget.gb(vram, ram)
    if smallest.ram == asked.ram:
        less = Budget(smallest.vram - GiB // 10, smallest.ram)
    elif smallest.vram == asked.vram:
        less = Budget(smallest.vram, smallest.ram - GiB // 10)
    else:
        return  # both raised: the pair of the candidate needing the least VRAM
    with pytest.raises(NoPlanError):
        plan_memory(sizes, job, less, found)


# ---- the estimates behave --------------------------------------------------------------------------


def test_tokens_follow_the_packed_context(sizes):
    g = sizes.transformer_geometry
    # the 640 bucket (416 x 960: latents 52 x 120) holds about 18,000 image tokens (spec section 5)
    image = transformer_tokens(g, 52, 120, 9) - g.image_tokens - g.text_tokens
    assert 17_000 < image < 19_000
    assert transformer_tokens(g, 52, 120, 9) < transformer_tokens(g, 52, 120, 18)


def test_vae_tiles_shrink_the_decode(sizes):
    g = sizes.vae_geometry
    whole, tiled, small = (vae_decode_work(g, 9, 416, 960, tile) for tile in (None, 256, 128))
    assert whole > tiled > small > 0


def test_more_pixels_and_cfg_need_more_memory(sizes):
    """The same choices (the best candidate: all resident) predict more for more pixels, and more
    in the sample phase for real CFG's batch of 2."""
    low, high, cfg = (candidates(sizes, job)[0] for job in (Job(320, 9, 1), Job(640, 9, 1), Job(640, 9, 2)))
    assert low.choices == high.choices == cfg.choices
    assert all(a.vram < b.vram for a, b in zip(low.phases, high.phases))
    sample = [c.phases[1] for c in (high, cfg)]
    assert sample[0].phase == "sample" and sample[0].vram < sample[1].vram


def test_the_demo_model_plans_too():
    tiny = model_sizes("tiny")
    plan = plan_memory(tiny, Job(tiny.resolution, 9, 2), Budget.gb(4, 8))
    assert plan.fits(Budget.gb(4, 8))
    assert {c.name for c in plan.components} == {c.name for c in tiny.components}


# ---- the command ------------------------------------------------------------------------------------------


def framepack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framepack", *args], capture_output=True, text=True, timeout=300)


def test_plan_command_prints_the_plan_and_an_impossible_budget_names_one_that_works():
    ok = framepack("plan", "--model", "framepack-i2v", "--vram", "6", "--ram", "16")
    assert ok.returncode == 0, ok.stderr
    for row in ("transformer", "text encoder (LLaMA)", "text encoder 2 (CLIP)", "image encoder (SigLIP)", "VAE",
                "| encode |", "| sample |", "| decode |"):
        assert row in ok.stdout
    peaks = re.findall(r"\| (?:encode|sample|decode) \| ([\d.]+) GB \| ([\d.]+) GB \|", ok.stdout)
    assert len(peaks) == 3 and all(float(v) <= 6 and float(r) <= 16 for v, r in peaks)

    refused = framepack("plan", "--model", "framepack-i2v", "--vram", "2", "--ram", "16")
    assert refused.returncode == 2 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("framepack: error: no memory plan"), refused.stderr
    smallest = re.search(r"smallest that works is ([\d.]+) GB VRAM with ([\d.]+) GB RAM", lines[0])
    assert smallest and float(smallest.group(1)) > 2
    works = framepack("plan", "--model", "framepack-i2v", "--vram", smallest.group(1), "--ram", smallest.group(2))
    assert works.returncode == 0, works.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_plan_without_a_gpu_or_vram_says_so_in_one_line():
    result = framepack("plan", "--model", "tiny")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["framepack: error: no CUDA GPU here to measure: give --vram GB "
                                                  "to plan for a GPU of that size, or --cpu to plan a CPU run"]


def test_plan_for_a_cpu_run_is_one_pool():
    cpu = framepack("plan", "--model", "framepack-i2v", "--cpu", "--ram", "16", "--resolution", "64")
    assert cpu.returncode == 0, cpu.stderr
    assert "| transformer | 12.874 B | block offload from disk | fp8 |" in cpu.stdout
    total = re.search(r"largest phase total ([\d.]+) GB", cpu.stdout)
    assert total and float(total.group(1)) <= 16 * 0.9
    both = framepack("plan", "--model", "tiny", "--cpu", "--vram", "4")
    assert both.returncode == 2 and "drop --vram" in both.stderr and len(both.stderr.strip().splitlines()) == 1


def test_plan_help_imports_no_torch():
    code = ("import sys\nfrom framepack.cli import main\ntry:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--vram" in result.stdout and result.stderr.strip().splitlines()[-1] == "[]", result.stderr


# ---- generate --memory: planned (and refused) before anything loads, applied on CUDA (runtime.apply) --


def test_generation_plan_follows_the_settings_and_refuses_a_budget_too_small():
    from framepack.runtime.choose import generation_plan
    from framepack.settings import GenerationSettings

    settings = GenerationSettings(image="start.png", prompt="a cat", model="tiny")
    plan = generation_plan(settings, Budget.gb(4, 8))
    assert plan.fits(Budget.gb(4, 8)) and plan.job.batch == 2  # the demo model's own cfg 3: a batch of 2
    assert plan.job.resolution == 128 and plan.job.window == settings.window
    with pytest.raises(NoPlanError, match="smallest that works"):
        generation_plan(settings, Budget.gb(0.1, 8))


def test_one_pool_holds_device_and_host_together(sizes):
    """A CPU run (Budget.shared): every phase's device and host peaks together fit the pool, which
    rules out plans that fit a GPU and a host of that size each; the smallest pool named works."""
    job = Job(resolution=64)
    for gb in (16, 24, 48):
        shared = plan_memory(sizes, job, Budget.shared(gb))
        assert all(p.vram + p.ram - NO_CUDA <= usable(gb * GiB) for p in shared.phases) and shared.fits(Budget.shared(gb))
        split = plan_memory(sizes, job, Budget.gb(gb, gb))
        assert split.key <= shared.key  # two pools of gb never plan worse than one
    assert plan_memory(sizes, job, Budget.shared(16)).component("transformer").choice == Choice("disk", "fp8")
    with pytest.raises(NoPlanError, match="of memory") as refused:
        plan_memory(sizes, job, Budget.shared(2))
    smallest = refused.value.smallest
    assert smallest.unified and plan_memory(sizes, job, smallest).fits(smallest)


def test_generate_memory_too_small_is_one_line_before_anything_loads(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    result = framepack("generate", "--model", "tiny", "--image", str(tmp_path / "start.png"), "--prompt", "a cat",
                       "--device", "cpu", "--memory", "0.5", "--out", str(tmp_path / "v.mp4"))
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()
    assert len(line) == 1 and "no memory plan for tiny fits 0.5 GB of memory" in line[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.png"]
    bad = framepack("generate", "--memory", "lots")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "auto or a number" in bad.stderr
