"""Step caches (framepack.cache): the --cache setting, TeaCache against an independent version of
the reference's algorithm built around diffusers' port, diffusers' hooks on our blocks, and caching
off leaving the video bit-identical."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import diffusers_twin, random_inputs, run_diffusers
from test_generate import write_image

from framepack.cache import (
    CacheSpec,
    count_evaluations,
    magnitude_ratios,
    parse_cache,
    resolve_cache,
    section_cache,
)
from framepack.components import asset
from framepack.model import FramePackTransformer
from framepack.settings import GenerationSettings

FRAMEPACK = [sys.executable, "-m", "framepack"]
STEPS = 10
SMALL = {"frames": 3, "height": 4, "width": 4, "history_frames": (2, 2, 4)}  # a small section keeps these tests fast


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- the setting -------------------------------------------------------------------------------------


def test_parse_cache_accepts_methods_with_and_without_values():
    assert parse_cache("none") == CacheSpec("none")
    assert parse_cache("TeaCache") == CacheSpec("teacache", 0.15)
    assert str(parse_cache("teacache:0.3")) == "teacache:0.3"
    assert parse_cache("taylorseer:4") == CacheSpec("taylorseer", 4)
    assert str(parse_cache("fbcache")) == "fbcache:0.05"
    assert resolve_cache("model", {"cache": "teacache:0.2"}) == CacheSpec("teacache", 0.2)
    assert resolve_cache("model", {}) == CacheSpec("teacache", 0.15)  # the 13B models: the reference's threshold
    assert resolve_cache("fbcache:0.1", {"cache": "teacache:0.2"}) == CacheSpec("fbcache", 0.1)


@pytest.mark.parametrize("bad", ["tea", "teacache:x", "teacache:-1", "teacache:nan", "none:1", "taylorseer:2.5", ""])
def test_bad_cache_values_are_one_line_errors(bad):
    with pytest.raises(ValueError) as info:
        parse_cache(bad)
    assert "\n" not in str(info.value) and "cache" in str(info.value)
    with pytest.raises(ValueError):
        GenerationSettings(image="x.png", prompt="p", cache=bad)


def test_magnitude_ratios_average_sections():
    # two sections of 3 steps; the norms double, then halve: ratios 2 and 0.5 in both
    norms = [torch.full((2, 4), v) for v in (1.0, 2.0, 1.0, 3.0, 6.0, 3.0)]
    assert magnitude_ratios(norms, 3) == pytest.approx([1.0, 2.0, 0.5], rel=1e-6)


# ---- TeaCache against the reference's algorithm on diffusers' port ---------------------------------------


HUNYUAN_POLY = np.poly1d([7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02])


class _Gate(torch.nn.Module):
    """One of diffusers' blocks behind the reference's TeaCache switch (state shared by all gates)."""

    def __init__(self, block, state: dict, first: bool, last: bool) -> None:
        super().__init__()
        self.block, self.state, self.first, self.last = block, state, first, last

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask, rope):
        s = self.state
        if self.first:  # the reference's decision, written from its description
            modulated = self.block.norm1(hidden_states, emb=temb)[0]
            if s["cnt"] == 0 or s["cnt"] == s["num_steps"] - 1:
                s["calc"], s["acc"] = True, 0.0
            else:
                prev = s["prev_modulated"]
                s["acc"] += HUNYUAN_POLY(((modulated - prev).abs().mean() / prev.abs().mean()).item())
                s["calc"] = s["acc"] >= s["thresh"]
                if s["calc"]:
                    s["acc"] = 0.0
            s["prev_modulated"] = modulated
            s["cnt"] += 1
            s["decisions"].append(s["calc"])
            if not s["calc"]:  # every block passes the streams through; the residual is added once, here
                return hidden_states + s["residual"], encoder_hidden_states
            s["entering"] = hidden_states.clone()
        if not s["calc"]:
            return hidden_states, encoder_hidden_states
        out = self.block(hidden_states, encoder_hidden_states, temb, attention_mask, rope)
        if self.last:
            s["residual"] = out[0] - s["entering"]
        return out


def _reference_teacache(twin, threshold: float, num_steps: int) -> dict:
    state = {"cnt": 0, "acc": 0.0, "thresh": threshold, "num_steps": num_steps, "decisions": []}
    blocks = [*twin.transformer_blocks, *twin.single_transformer_blocks]
    gates = [_Gate(b, state, i == 0, i == len(blocks) - 1) for i, b in enumerate(blocks)]
    n = len(twin.transformer_blocks)
    twin.transformer_blocks = torch.nn.ModuleList(gates[:n])
    twin.single_transformer_blocks = torch.nn.ModuleList(gates[n:])
    return state


def _trajectory(steps: int) -> torch.Tensor:
    """The sigmas of a plain Euler run, one model call each, from 1 down."""
    return torch.linspace(1.0, 1.0 / steps, steps)


@pytest.mark.parametrize("threshold", [0.08, 0.3])
def test_teacache_matches_the_reference_algorithm_on_diffusers_port(threshold):
    torch.manual_seed(0)
    model = FramePackTransformer("tiny").eval()
    twin = diffusers_twin(model)
    state = _reference_teacache(twin, threshold, STEPS)
    inputs = random_inputs(model.config, batch=2, valid_text=[12, 12], seed=11, **SMALL)  # two CFG branches, one batch
    noise = inputs["latents"]
    ours_cache = section_cache(model, CacheSpec("teacache", threshold), STEPS)
    x = noise
    with ours_cache as cache, torch.no_grad():
        for i, sigma in enumerate(_trajectory(STEPS)):
            step = dict(inputs, latents=x, timestep=torch.full((2,), float(sigma) * 1000))
            ours = model(**step, cache=cache)
            theirs = run_diffusers(twin, step)
            assert rel_err(ours, theirs) <= 1e-5, f"step {i}"
            x = x - ours / STEPS  # a flow step along our prediction; both see the same x next
        decisions = cache.decisions
    assert decisions == state["decisions"]
    assert decisions[0] and decisions[-1] and len(decisions) == STEPS
    if threshold == 0.08:  # this threshold skips some middle steps and computes others: both paths ran
        assert 0 < sum(decisions[1:-1]) < STEPS - 2, decisions


def test_teacache_state_is_per_section():
    """A cache made for one section starts fresh: the same section twice gives the same result."""
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config, seed=4, **SMALL)
    results = []
    for _ in range(2):
        with section_cache(model, CacheSpec("teacache", 0.2), STEPS) as cache, torch.no_grad():
            outs = [model(**dict(inputs, timestep=torch.tensor([float(s) * 1000])), cache=cache)
                    for s in _trajectory(STEPS)]
        results.append((torch.stack(outs), cache.decisions))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


# ---- diffusers' hooks on our blocks ------------------------------------------------------------------------


def _section(model, spec: CacheSpec, inputs: dict, ratios=None) -> tuple[torch.Tensor, int]:
    with section_cache(model, spec, STEPS, ratios) as cache, count_evaluations(model) as count, torch.no_grad():
        x, outs = inputs["latents"], []
        for sigma in _trajectory(STEPS):
            extra = {} if cache is None else {"cache": cache}
            out = model(**dict(inputs, latents=x, timestep=torch.full((x.shape[0],), float(sigma) * 1000)), **extra)
            outs.append(out)
            x = x - out / STEPS
    return torch.stack(outs), count[0]


RATIOS = [1.0] + [0.99] * (STEPS - 1)


@pytest.mark.parametrize("spec, ratios", [
    (CacheSpec("fbcache", 0.0), None),  # a threshold of 0 never skips
    (CacheSpec("magcache", 0.0), RATIOS),
    (CacheSpec("taylorseer", 1), None),  # every step computed
])
def test_hooks_that_never_skip_leave_the_output_unchanged(spec, ratios):
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config, batch=2, valid_text=[12, 6], seed=2, **SMALL)
    plain, plain_count = _section(model, CacheSpec("none"), inputs)
    hooked, count = _section(model, spec, inputs, ratios)
    assert plain_count == count == STEPS
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("spec, ratios", [
    (CacheSpec("fbcache", 5.0), None),
    (CacheSpec("magcache", 5.0), RATIOS),
    (CacheSpec("taylorseer", 3), None),
])
def test_hooks_skip_steps_and_are_removed_after_the_section(spec, ratios):
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config, seed=6, **SMALL)
    plain, _ = _section(model, CacheSpec("none"), inputs)
    first, count = _section(model, spec, inputs, ratios)
    assert count < STEPS and torch.isfinite(first).all()
    assert not torch.equal(first, plain)
    # nothing of the hooks is left on the model, and their state started fresh for the second section
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in vars(m) for m in model.modules())
    again, _ = _section(model, CacheSpec("none"), inputs)
    assert torch.equal(again, plain)
    assert torch.equal(_section(model, spec, inputs, ratios)[0], first)


# ---- the CLI and the pipeline --------------------------------------------------------------------------


def _generate(tmp: Path, name: str, *extra: str, image: Path | None = None) -> subprocess.CompletedProcess:
    image = image or write_image(tmp / "start.png")
    cmd = [*FRAMEPACK, "generate", "--model", "tiny", "--image", str(image), "--prompt", "a red ball moves left",
           "--seconds", "1.2", "--steps", "6", "--out", str(tmp / f"{name}.mp4"), *extra]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)


def test_cache_none_is_bit_identical_to_no_option_and_teacache_skips(tmp_path):
    from framepack.video import read_frames

    write_image(tmp_path / "start.png")
    runs = {name: _generate(tmp_path, name, *extra) for name, extra in
            [("plain", ()), ("none", ("--cache", "none")), ("tea", ("--cache", "teacache:0.5"))]}
    for name, run in runs.items():
        assert run.returncode == 0, (name, run.stderr)
    plain, none, tea = (read_frames(tmp_path / f"{n}.mp4") for n in ("plain", "none", "tea"))
    assert np.array_equal(plain, none)
    from safetensors.torch import load_file

    sections = sorted((tmp_path / "plain.job" / "sections").iterdir())
    assert sections
    for path in sections:
        a, b = load_file(path), load_file(tmp_path / "none.job" / "sections" / path.name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tea.shape == plain.shape and not np.array_equal(tea, plain)
    from framepack.video import settings_from_video

    assert settings_from_video(tmp_path / "tea.mp4")["cache"] == "teacache:0.5"
    assert settings_from_video(tmp_path / "plain.mp4")["cache"] == "none"


def test_bad_cache_option_is_one_line_exit_2(tmp_path):
    run = _generate(tmp_path, "bad", "--cache", "teacache:lots")
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "teacache:lots" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "bad.job").exists()


def test_videos_and_jobs_from_before_the_field_still_load(tmp_path):
    """An mp4 and a job.json without 'cache' (made before it existed) run uncached, as they were made."""
    from framepack.video import concat_segments, embedded_settings, read_frames, settings_from_video

    assert _generate(tmp_path, "made").returncode == 0
    recorded = settings_from_video(tmp_path / "made.mp4")
    del recorded["cache"]
    old = tmp_path / "old.mp4"
    # the same video with the metadata an older version wrote
    concat_segments([tmp_path / "made.mp4"], old, embedded_settings(recorded, {"image": "start.png"}))
    assert "cache" not in settings_from_video(old)
    again = subprocess.run([*FRAMEPACK, "generate", "--from", str(old), "--out", str(tmp_path / "again.mp4")],
                           check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert np.array_equal(read_frames(tmp_path / "again.mp4"), read_frames(tmp_path / "made.mp4"))
    assert settings_from_video(tmp_path / "again.mp4")["cache"] == "none"

    # a job directory written before the field: its settings.json lacks it, and --resume finishes it
    from framepack.jobs import SETTINGS, JobDir

    settings = GenerationSettings(image=str(tmp_path / "start.png"), prompt="a ball", seconds=1.2, steps=4)
    job = JobDir.create(tmp_path / "oldjob", settings, tmp_path / "oldjob.mp4")
    data = json.loads((job.root / SETTINGS).read_text())
    del data["cache"]
    (job.root / SETTINGS).write_text(json.dumps(data))
    resumed = subprocess.run([*FRAMEPACK, "generate", "--resume", str(job.root)], check=False, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert settings_from_video(tmp_path / "oldjob.mp4")["cache"] == "none"


def _tiny_without_ratios(tmp_path: Path) -> tuple[Path, list[float]]:
    """A model directory of the demo model's components, its manifest without MagCache ratios or a
    cache choice; and the ratios the demo model ships."""
    source = json.loads(asset("tiny", "framepack.json").read_text())
    shipped = source.pop("magcache_ratios")
    for key in ("magcache_steps", "cache"):
        source.pop(key)
    for part in ("transformer", "hunyuan", "vae", "text_embeddings"):
        source[part] = str(asset("tiny", source[part]))
    model = tmp_path / "model"
    model.mkdir()
    (model / "framepack.json").write_text(json.dumps(source))
    return model, shipped


def test_calibrate_cache_writes_ratios_that_magcache_reads(tmp_path):
    """A model directory without ratios: magcache is refused in one line; calibrate-cache fixes that."""
    model, _ = _tiny_without_ratios(tmp_path)
    refused = _generate(tmp_path, "refused", "--model", str(model), "--cache", "magcache")
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and "calibrate-cache" in last and "Traceback" not in refused.stderr
    cal = subprocess.run([*FRAMEPACK, "calibrate-cache", "--model", str(model), "--steps", "6", "--seconds", "1.2"],
                         check=False, capture_output=True, text=True, timeout=300)
    assert cal.returncode == 0, cal.stderr
    ratios = json.loads((model / "framepack.json").read_text())["magcache_ratios"]
    assert len(ratios) == 6 and ratios[0] == 1.0 and all(0.2 < r < 5 for r in ratios)
    ran = _generate(tmp_path, "mag", "--model", str(model), "--cache", "magcache")
    assert ran.returncode == 0, ran.stderr


def test_the_demo_models_magcache_ratios_are_its_own_transformers(tmp_path):
    """The shipped ratios are what calibrate-cache measures on the shipped weights (a transformer swapped
    in without calibrating again would keep the old one's ratios: package --transformer-only drops them)."""
    model, shipped = _tiny_without_ratios(tmp_path)
    steps = len(shipped)
    cal = subprocess.run([*FRAMEPACK, "calibrate-cache", "--model", str(model), "--steps", str(steps)],
                         check=False, capture_output=True, text=True, timeout=600)
    assert cal.returncode == 0, cal.stderr
    measured = json.loads((model / "framepack.json").read_text())["magcache_ratios"]
    assert len(measured) == len(shipped) and max(abs(a - b) for a, b in zip(measured, shipped)) < 2e-3


def test_demo_model_ships_calibrated_with_the_benchmarks_choice():
    manifest = json.loads(asset("tiny", "framepack.json").read_text())
    assert len(manifest["magcache_ratios"]) == manifest["magcache_steps"]
    chosen = parse_cache(manifest["cache"])  # written by benchmarks/caching.py --write-default
    doc = (Path(__file__).resolve().parents[1] / "docs" / "caching.md").read_text()
    assert f"`{chosen}`" in doc.split("<!-- bench:caching -->")[1]  # the published table's choice


def test_the_demo_command_uses_the_models_cache_and_the_library_stays_exact():
    """`framepack demo` (make demo) runs at the demo model's quality-gated cache; demo_settings, which
    the benchmarks and tests build on, stays exact unless asked."""
    from framepack.cli import build_parser
    from framepack.demo import demo_settings

    assert build_parser().parse_args(["demo"]).cache == "model"
    assert build_parser().parse_args(["demo", "--cache", "none"]).cache == "none"
    assert demo_settings().cache == "none" and demo_settings(cache="model").cache == "model"
