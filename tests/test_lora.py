"""LoRA at generation (framepack.lora): the three key formats, checks, fuse / unfuse, saving.

Key sets are built here by hand from each format's documented naming (not by our own writer), on
the tiny model; the fused weight must change by exactly ``scale * alpha / rank * B @ A`` on the
named layer and nowhere else. PEFT's own LoRA forward is the independent reference for the
diffusers format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack.lora import (
    FORMATS,
    LoraError,
    LoraFusion,
    LoraLayer,
    LoraWeights,
    linear_shapes,
    parse_lora_option,
    read_lora,
    save_lora,
)
from framepack.model import FramePackTransformer
from framepack.video import read_frames, read_metadata

DIM = 128  # the tiny preset's width (the `model` fixture)
# two layers with different shapes and ranks: a dual-stream attention projection and a
# single-stream output projection (in = dim + mlp width)
TARGETS = {"transformer_blocks.0.attn.to_q": 2, "single_transformer_blocks.1.proj_out": 3}


@pytest.fixture
def model() -> FramePackTransformer:
    torch.manual_seed(0)
    return FramePackTransformer("tiny").eval()


def random_layers(model, alphas: dict[str, float], seed: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(model)
    out = {}
    for path, rank in TARGETS.items():
        o, i = shapes[path]
        out[path] = (torch.randn(rank, i, generator=g) * 0.1, torch.randn(o, rank, generator=g) * 0.1)
    return out


def musubi_keys(layers, alphas) -> dict[str, torch.Tensor]:
    """musubi-tuner: lora_unet_ + module path with '.' -> '_'; .lora_down/.lora_up.weight; .alpha."""
    tensors = {}
    for path, (down, up) in layers.items():
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alphas[path])
    return tensors


def diffusers_keys(layers) -> dict[str, torch.Tensor]:
    """diffusers / PEFT: transformer.<path>.lora_A.weight (A) / .lora_B.weight (B)."""
    tensors = {}
    for path, (down, up) in layers.items():
        tensors[f"transformer.{path}.lora_A.weight"] = down
        tensors[f"transformer.{path}.lora_B.weight"] = up
    return tensors


def diffusers_metadata(alphas) -> dict[str, str]:
    # diffusers' save_lora_weights: PEFT's LoraConfig under the key lora_adapter_metadata, packed with "transformer."
    first = next(iter(alphas))
    config = {"transformer.r": TARGETS[first], "transformer.lora_alpha": alphas[first],
              "transformer.alpha_pattern": {p: a for p, a in alphas.items() if p != first}}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def ours_keys(layers) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, (down, up) in layers.items():
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = down, up
    return tensors


def write(tmp_path, fmt, layers, alphas) -> Path:
    path = tmp_path / f"{fmt}.safetensors"
    if fmt == "musubi":
        save_file(musubi_keys(layers, alphas), path)
    elif fmt == "diffusers":
        save_file(diffusers_keys(layers), path, metadata=diffusers_metadata(alphas))
    else:
        save_file(ours_keys(layers), path, metadata={"format": "framepack-lora", "alphas": json.dumps(alphas)})
    return path


def weights_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_fused(model, before, layers, alphas, scale):
    after = model.state_dict()
    for name, value in before.items():
        path = name.removesuffix(".weight")
        if path in layers and name.endswith(".weight"):
            down, up = layers[path]
            expected = up @ down * scale * alphas[path] / down.shape[0]
            torch.testing.assert_close(after[name] - value, expected, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(after[name], value), f"{name} changed"


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_fuses_its_delta_on_the_named_layer_only(model, tmp_path, fmt):
    alphas = {"transformer_blocks.0.attn.to_q": 4.0, "single_transformer_blocks.1.proj_out": 1.5}
    layers = random_layers(model, alphas)
    weights = read_lora(write(tmp_path, fmt, layers, alphas), linear_shapes(model))
    assert weights.format == fmt and set(weights.layers) == set(TARGETS)
    before = weights_of(model)
    LoraFusion(model).fuse([(weights, 0.7)])
    assert_fused(model, before, layers, alphas, 0.7)


def test_alpha_defaults_to_the_rank(model, tmp_path):
    """musubi alpha 0 and diffusers without metadata both mean alpha = rank (scale 1)."""
    layers = random_layers(model, {})
    rank_alphas = {p: float(r) for p, r in TARGETS.items()}
    musubi = musubi_keys(layers, {p: 0.0 for p in TARGETS})
    save_file(musubi, tmp_path / "m.safetensors")
    save_file(diffusers_keys(layers), tmp_path / "d.safetensors")
    for name in ("m", "d"):
        weights = read_lora(tmp_path / f"{name}.safetensors", linear_shapes(model))
        assert {p: l.alpha for p, l in weights.layers.items()} == rank_alphas


@pytest.mark.parametrize("fmt", FORMATS)
def test_saving_round_trips_through_each_format(model, tmp_path, fmt):
    alphas = {"transformer_blocks.0.attn.to_q": 4.0, "single_transformer_blocks.1.proj_out": 1.5}
    layers = random_layers(model, alphas)
    original = LoraWeights({p: LoraLayer(d, u, alphas[p]) for p, (d, u) in layers.items()}, "framepack")
    back = read_lora(save_lora(original, tmp_path / "x.safetensors", fmt), linear_shapes(model))
    assert back.format == fmt
    assert set(back.layers) == set(original.layers)
    for path, layer in original.layers.items():
        assert torch.equal(back.layers[path].down, layer.down) and torch.equal(back.layers[path].up, layer.up)
        assert back.layers[path].alpha == layer.alpha


def test_saved_diffusers_file_names_keys_as_diffusers_does(model, tmp_path):
    alphas = {p: 1.0 for p in TARGETS}
    layers = random_layers(model, alphas)
    original = LoraWeights({p: LoraLayer(d, u, alphas[p]) for p, (d, u) in layers.items()}, "framepack")
    from safetensors import safe_open

    with safe_open(str(save_lora(original, tmp_path / "d.safetensors", "diffusers")), "pt") as f:
        assert sorted(f.keys()) == sorted(diffusers_keys(layers))
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["transformer.r"] in TARGETS.values() and config["transformer.lora_alpha"] == 1.0
    with safe_open(str(save_lora(original, tmp_path / "m.safetensors", "musubi")), "pt") as f:
        assert sorted(f.keys()) == sorted(musubi_keys(layers, alphas))


def test_another_architecture_is_named_by_its_first_key(model, tmp_path):
    # musubi-tuner's HunyuanVideo (not FramePack) LoRA: the original double/single block names
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0)}
    save_file(tensors, tmp_path / "hv.safetensors")
    with pytest.raises(LoraError) as info:
        read_lora(tmp_path / "hv.safetensors", linear_shapes(model))
    message = str(info.value)
    assert "'lora_unet_double_blocks_0_img_attn_qkv.alpha'" in message and "\n" not in message
    save_file({"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 5)}, tmp_path / "wan.safetensors")
    with pytest.raises(LoraError, match=r"'transformer\.blocks\.0\.attn1\.to_q\.lora_A\.weight' fits no layer"):
        read_lora(tmp_path / "wan.safetensors", linear_shapes(model))


def test_a_shape_that_does_not_fit_is_named(model, tmp_path):
    layers = random_layers(model, {})
    down, up = layers["transformer_blocks.0.attn.to_q"]
    layers["transformer_blocks.0.attn.to_q"] = (down, torch.zeros(DIM * 3, down.shape[0]))  # a wider model's B
    save_file(diffusers_keys(layers), tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match=r"key 'transformer\.transformer_blocks\.0\.attn\.to_q\.lora_B\.weight' "
                       r"has shape \(384, 2\)"):
        read_lora(tmp_path / "wide.safetensors", linear_shapes(model))
    layers = random_layers(model, {})
    down, up = layers["single_transformer_blocks.1.proj_out"]
    layers["single_transformer_blocks.1.proj_out"] = (down, up[:, :1].contiguous())  # ranks of A and B disagree
    save_file(ours_keys(layers), tmp_path / "rank.safetensors", metadata={"format": "framepack-lora"})
    with pytest.raises(LoraError, match=r"'single_transformer_blocks\.1\.proj_out\.lora_B' has shape"):
        read_lora(tmp_path / "rank.safetensors", linear_shapes(model))
    tensors = musubi_keys(random_layers(model, {}), {p: 1.0 for p in TARGETS})
    del tensors["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"]
    save_file(tensors, tmp_path / "half.safetensors")
    with pytest.raises(LoraError, match="no matching up"):
        read_lora(tmp_path / "half.safetensors", linear_shapes(model))


def test_not_a_lora_is_one_line(model, tmp_path):
    save_file({"x_embedder.proj.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(LoraError, match="not a LoRA in a known format"):
        read_lora(tmp_path / "model.safetensors", linear_shapes(model))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(LoraError, match="cannot read LoRA junk.safetensors"):
        read_lora(tmp_path / "junk.safetensors", linear_shapes(model))


def _lora(model, seed, scale_alpha=1.0) -> LoraWeights:
    layers = random_layers(model, {}, seed=seed)
    return LoraWeights({p: LoraLayer(d, u, scale_alpha) for p, (d, u) in layers.items()}, "framepack")


@pytest.mark.parametrize("storage", ["fp32", "bf16", "fp8", "int8"])
def test_unfuse_restores_the_base_weights_bit_for_bit(model, storage):
    from framepack.runtime.placement import store_weights

    store_weights(model, storage, torch.float32 if storage == "fp32" else torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fusion = LoraFusion(model)
    fusion.fuse([(_lora(model, 1), 0.8), (_lora(model, 2), -0.5)])
    changed = [k for k in before if not torch.equal(before[k], model.state_dict()[k])]
    assert any(k.startswith("transformer_blocks.0.attn.to_q.") for k in changed)
    fusion.fuse([(_lora(model, 3), 1.0)])  # switching unfuses first
    fusion.unfuse()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


def test_several_loras_sum_with_their_scales(model):
    a, b = _lora(model, 1, 2.0), _lora(model, 2, 0.5)
    before = weights_of(model)
    LoraFusion(model).fuse([(a, 0.3), (b, -1.2)])
    for path in TARGETS:
        expected = a.layers[path].delta() * 0.3 + b.layers[path].delta() * -1.2
        torch.testing.assert_close(model.state_dict()[f"{path}.weight"] - before[f"{path}.weight"], expected,
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_quantized_weights_are_fused_and_stored_again(model, storage):
    """fp8 / int8 storage: dequantize, add the delta in fp32, quantize again with a fresh scale."""
    from framepack.runtime.placement import QuantizedLinear, store_weights

    store_weights(model, storage, torch.bfloat16)
    layer = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(layer, QuantizedLinear)
    base = layer.dequantized(torch.float32)
    lora = _lora(model, 1)
    LoraFusion(model).fuse([(lora, 5.0)])  # large enough to move the weights by many quantization steps
    assert layer.weight.dtype == (torch.float8_e4m3fn if storage == "fp8" else torch.int8)
    expected = base + 5.0 * lora.layers["transformer_blocks.0.attn.to_q"].delta()
    error = (layer.dequantized(torch.float32) - expected).abs().max()
    step = layer.weight_scale.max() * (32 if storage == "fp8" else 1)  # fp8: 3 mantissa bits near 448
    assert error <= step and (layer.dequantized(torch.float32) - base).abs().max() > 10 * error


def test_an_offloaded_transformer_is_refused(model):
    from framepack.runtime.placement import offload_blocks

    offload_blocks(model, "cpu")
    with pytest.raises(LoraError, match="offloaded"):
        LoraFusion(model).fuse([(_lora(model, 1), 1.0)])


def test_weights_stored_again_after_fusing_are_not_unfused_wrongly(model):
    """fp8 storage applied after fusing (a memory plan on a model loaded in full precision): the
    kept fp32 copies no longer fit the layers, and unfusing says so instead of casting them in."""
    from framepack.runtime.placement import store_weights

    fusion = LoraFusion(model)
    fusion.fuse([(_lora(model, 1), 1.0)])
    store_weights(model, "fp8", torch.bfloat16)
    with pytest.raises(LoraError, match="stored in another format after the LoRAs were fused"):
        fusion.unfuse()


def test_fused_model_matches_peft_lora_forward(model, tmp_path):
    """Independent reference: PEFT's unmerged LoRA layers on a copy of the model give the output
    our fused weights give, from the file diffusers' naming describes (PEFT state dict + prefix)."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    targets = ["attn.to_q", "attn.to_v", "ff.net.2", "proj_mlp"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    reference = inject_adapter_in_model(config, copy.deepcopy(model))
    state = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(reference).items()}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 8})}
    save_file(state, tmp_path / "peft.safetensors", metadata=meta)
    weights = read_lora(tmp_path / "peft.safetensors", linear_shapes(model))
    assert len(weights.layers) == len(state) // 2 > 0
    LoraFusion(model).fuse([(weights, 1.0)])
    inputs = _inputs()
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def _inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return dict(latents=torch.randn(1, 16, 2, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                text=torch.randn(1, 5, 64, generator=g), text_mask=None, pooled_text=torch.randn(1, 32, generator=g),
                image_embeds=torch.randn(1, 3, 32, generator=g), guidance=torch.tensor([10000.0]))


@pytest.mark.parametrize("text, parsed", [("a.safetensors", ("a.safetensors", 1.0)),
                                          ("a.safetensors:0.5", ("a.safetensors", 0.5)),
                                          ("dir:x/a.safetensors", ("dir:x/a.safetensors", 1.0)),
                                          ("C:/l/a.safetensors:-2", ("C:/l/a.safetensors", -2.0))])
def test_lora_option(text, parsed):
    assert parse_lora_option(text) == parsed


# ---- through `framepack generate` on the demo model ----------------------------------------------------------

FRAMEPACK = str(Path(sys.executable).with_name("framepack"))
DEMO_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.proj_mlp",
                "single_transformer_blocks.3.proj_out")


def demo_lora(path: Path, seed: int = 5, model: str | Path = "tiny") -> Path:
    """A random rank-4 LoRA for ``model`` (default the shipped demo model; its transformer's shapes), in our format."""
    from framepack.components import resolve_model

    shapes = linear_shapes(FramePackTransformer.from_pretrained(resolve_model(str(model)).transformer, dtype=torch.float32))
    g = torch.Generator().manual_seed(seed)
    layers = {p: LoraLayer(torch.randn(4, shapes[p][1], generator=g) * 0.3,
                           torch.randn(shapes[p][0], 4, generator=g) * 0.3, 4.0) for p in DEMO_TARGETS}
    return save_lora(LoraWeights(layers, "framepack"), path)


def generate(tmp: Path, out: str, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    args = [FRAMEPACK, "generate", "--out", str(tmp / out), *extra]
    if "--from" not in extra:
        args += ["--model", "tiny", "--image", str(tmp / "start.png"), "--prompt", "a red circle moves right",
                 "--seconds", "1", "--steps", "2", "--resolution", "64", "--seed", "1"]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300, cwd=cwd or tmp,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    from PIL import Image

    tmp = tmp_path_factory.mktemp("lora_demo")
    yy, xx = np.mgrid[0:64, 0:64]
    img = np.stack([xx * 4, yy * 4, np.full((64, 64), 90)], axis=-1).astype(np.uint8)
    img[(yy - 30) ** 2 + (xx - 20) ** 2 < 100] = (220, 30, 30)
    Image.fromarray(img).save(tmp / "start.png")
    demo_lora(tmp / "style.safetensors")
    result = generate(tmp, "base.mp4")
    assert result.returncode == 0, result.stderr
    return tmp


def test_a_lora_changes_the_video_and_scale_zero_is_the_base_video(demo_dir):
    base = read_frames(demo_dir / "base.mp4")
    result = generate(demo_dir, "zero.mp4", "--lora", "style.safetensors:0")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_frames(demo_dir / "zero.mp4"), base)
    result = generate(demo_dir, "one.mp4", "--lora", "style.safetensors")
    assert result.returncode == 0, result.stderr
    with_lora = read_frames(demo_dir / "one.mp4")
    assert with_lora.shape == base.shape
    assert np.abs(with_lora.astype(int) - base.astype(int)).mean() > 1.0  # visibly, not by codec noise
    # the mp4 records the file by name, its sha256 prefix and its scale
    recorded = read_metadata(demo_dir / "one.mp4")["framepack"]["loras"]
    sha = hashlib.sha256((demo_dir / "style.safetensors").read_bytes()).hexdigest()
    assert recorded == [{"path": "style.safetensors", "scale": 1.0, "sha256": sha[: len(recorded[0]["sha256"])]}]
    assert len(recorded[0]["sha256"]) >= 12


def test_from_a_video_repeats_its_loras_when_the_file_is_found(demo_dir):
    made = demo_dir / "one.mp4"
    if not made.exists():
        assert generate(demo_dir, "one.mp4", "--lora", "style.safetensors").returncode == 0
    result = generate(demo_dir, "again.mp4", "--from", str(made))
    assert result.returncode == 0, result.stderr
    assert np.array_equal(read_frames(demo_dir / "again.mp4"), read_frames(made))
    # moved away from its LoRA (and the image beside it), the video names the missing file in one line
    away = demo_dir / "away"
    away.mkdir(exist_ok=True)
    shutil.copy(made, away / "one.mp4")
    shutil.copy(demo_dir / "start.png", away / "start.png")
    result = generate(away, "third.mp4", "--from", str(away / "one.mp4"), cwd=away)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (f"framepack: error: {away / 'one.mp4'} was made with the LoRA 'style.safetensors' (sha256 "
         f"{read_metadata(made)['framepack']['loras'][0]['sha256']}), which is neither beside the video nor in the "
         "current directory; give the LoRAs with --lora")]
    # another file under the same name is not taken for it
    demo_lora(away / "style.safetensors", seed=6)
    result = generate(away, "third.mp4", "--from", str(away / "one.mp4"), cwd=away)
    assert result.returncode == 2 and "has another sha256" in result.stderr
    assert not (away / "third.mp4").exists() and not (away / "third.job").exists()


@pytest.mark.parametrize("case", ["another architecture", "wrong shape", "missing", "not safetensors"])
def test_a_lora_that_does_not_fit_is_one_line_before_anything_is_made(demo_dir, case):
    bad = demo_dir / f"bad-{case.replace(' ', '-')}.safetensors"
    if case == "another architecture":
        save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
                   "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(9216, 4)}, bad)
        expected = "key 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' fits no layer of this model"
    elif case == "wrong shape":  # a LoRA of the 13B model (width 3072) on the demo model
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}, bad)
        expected = "key 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' has shape (4, 3072)"
    elif case == "missing":
        expected = "does not exist"
    else:
        bad.write_text("hello")
        expected = "cannot read LoRA"
    out = f"bad-{case.replace(' ', '-')}.mp4"
    result = generate(demo_dir, out, "--lora", str(bad))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("framepack: error")]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (demo_dir / out).exists() and not (demo_dir / out.replace(".mp4", ".job")).exists()


# ---- the pipeline: switching between jobs, memory plans ----------------------------------------------------------


def demo_settings(image: Path, loras=()):
    from framepack.settings import GenerationSettings

    return GenerationSettings(image=str(image), prompt="a red circle moves", model="tiny", seconds=1.0, steps=2,
                              resolution=64, seed=3, loras=tuple(loras))


def first_latents(pipeline, settings, root: Path) -> torch.Tensor:
    from framepack.jobs import JobDir

    job = JobDir.create(root, settings, root.with_suffix(".mp4"))
    pipeline.run(job)
    return job.load_latents(0)


def test_one_pipeline_switches_loras_between_jobs_and_back_to_the_base(demo_dir, tmp_path):
    from framepack.lora import lora_choice
    from framepack.pipeline import FramePackPipeline

    pipeline = FramePackPipeline.from_model("tiny")
    style = lora_choice(demo_dir / "style.safetensors", 1.0)
    other = lora_choice(demo_lora(tmp_path / "other.safetensors", seed=11), 0.5)
    base = first_latents(pipeline, demo_settings(demo_dir / "start.png"), tmp_path / "a")
    styled = first_latents(pipeline, demo_settings(demo_dir / "start.png", [style]), tmp_path / "b")
    both = first_latents(pipeline, demo_settings(demo_dir / "start.png", [style, other]), tmp_path / "c")
    again = first_latents(pipeline, demo_settings(demo_dir / "start.png"), tmp_path / "d")
    fresh = FramePackPipeline.from_model("tiny")
    assert not torch.equal(base, styled) and not torch.equal(styled, both)
    assert torch.equal(again, base)  # unfused exactly
    assert torch.equal(first_latents(fresh, demo_settings(demo_dir / "start.png", [style, other]), tmp_path / "e"),
                       both)  # switching on one pipeline = loading them on a fresh one


def test_a_changed_file_is_refused_at_resume(demo_dir, tmp_path):
    from framepack.jobs import JobDir
    from framepack.lora import lora_choice
    from framepack.pipeline import FramePackPipeline

    path = demo_lora(tmp_path / "mine.safetensors")
    job = JobDir.create(tmp_path / "job", demo_settings(demo_dir / "start.png", [lora_choice(path)]),
                        tmp_path / "out.mp4")
    demo_lora(path, seed=12)  # replaced under the same name after the job was made
    with pytest.raises(LoraError, match=r"mine\.safetensors has changed since it was chosen"):
        FramePackPipeline.from_model("tiny").run(job)


def test_fused_before_a_memory_plan_fp8_offloaded_equals_fp8_resident(demo_dir, tmp_path):
    """What generate --memory and the web app's planned jobs do: load (the blocks straight into fp8),
    fuse, then place. Block offload gives the resident video; switching LoRAs on an offloaded
    transformer is refused in one line."""
    from framepack.components import load_components, resolve_model
    from framepack.lora import lora_choice
    from framepack.pipeline import FramePackPipeline
    from framepack.runtime.apply import CLIP, LLAMA, TRANSFORMER, VAE, apply_plan, load_options
    from framepack.runtime.plan import Choice, ComponentPlan, Job, MemoryPlan

    def plan_of(transformer: Choice) -> MemoryPlan:  # by hand, for the demo model's components (no SigLIP)
        parts = {TRANSFORMER: transformer, LLAMA: Choice(), CLIP: Choice(), VAE: Choice()}
        return MemoryPlan("tiny", Job(resolution=64, window=9), None,
                          tuple(ComponentPlan(n, 0, c, 0, 0) for n, c in parts.items()), (), ())

    style = lora_choice(demo_dir / "style.safetensors", 1.0)
    results = []
    for name, choice in (("resident", Choice("resident", "fp8")), ("offload", Choice("offload", "fp8"))):
        plan = plan_of(transformer=choice)
        pipeline = FramePackPipeline(load_components(resolve_model("tiny"), **load_options(plan)), "cpu")
        loaded = {k: v.clone() for k, v in pipeline.c.transformer.state_dict().items()}
        pipeline.use_loras([style])
        fused = pipeline.c.transformer.get_submodule("transformer_blocks.0.attn.to_q")
        assert fused.weight.dtype == torch.float8_e4m3fn  # requantized in place, scale and all
        assert not torch.equal(fused.weight, loaded["transformer_blocks.0.attn.to_q.weight"])
        with apply_plan(pipeline, plan, "cpu", offload_dir=tmp_path / name / "offload"):
            results.append(first_latents(pipeline, demo_settings(demo_dir / "start.png", [style]), tmp_path / name))
            if name == "offload":
                with pytest.raises(LoraError, match="offloaded"):
                    pipeline.use_loras([])
    assert torch.equal(results[0], results[1])
    # and unfusing a model loaded into fp8 gives back the loaded bytes
    pipeline = FramePackPipeline(load_components(resolve_model("tiny"), **load_options(plan_of(
        transformer=Choice("resident", "fp8")))), "cpu")
    loaded = {k: v.clone() for k, v in pipeline.c.transformer.state_dict().items()}
    pipeline.use_loras([style])
    pipeline.use_loras([])
    assert all(torch.equal(v, loaded[k]) for k, v in pipeline.c.transformer.state_dict().items())


def test_settings_take_pairs_and_old_settings_load_without_loras(tmp_path):
    from framepack.lora import file_sha256, recorded_loras
    from framepack.settings import GenerationSettings, LoraChoice

    old = {"image": "a.png", "prompt": "p", "seconds": 2.0}  # a job or video made before LoRAs existed
    assert GenerationSettings.from_dict(old).loras == ()
    path = demo_lora(tmp_path / "x.safetensors")
    settings = GenerationSettings(image="a.png", prompt="p", loras=((str(path), 0.5),))  # as a user writes them
    assert settings.loras == (LoraChoice(str(path), 0.5, None),)
    assert GenerationSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    # a video records the file's sha256 even when the settings were made without it
    assert recorded_loras(settings.loras) == [{"path": "x.safetensors", "scale": 0.5, "sha256": file_sha256(path)}]
    for bad, message in (((("x", float("inf")),), "must be a finite number"), (("x",), "needs a file"),
                         ((("", 1.0),), "needs a file"), (((str(path), True),), "must be a finite number")):
        with pytest.raises(ValueError, match=message):
            GenerationSettings(image="a.png", prompt="p", loras=bad)


def test_musubi_names_of_the_13b_model_map_back_to_one_layer_each():
    """On the released 13B checkpoint's own parameter names (tests/data): every 2-D block weight
    gets a musubi-tuner name that no other layer shares, and a musubi key set over the names
    musubi-tuner's FramePack network targets (Linear layers of the blocks, 'norm' excluded) reads
    back onto those layers with the 13B shapes."""
    from framepack.lora import musubi_name, parse_lora

    names = json.loads((Path(__file__).parent / "data" / "framepack_13b_state_dict.json").read_text())["shapes"]
    shapes = {k.removesuffix(".weight"): tuple(v) for k, v in names.items() if k.endswith(".weight") and len(v) == 2}
    assert len({musubi_name(p) for p in shapes}) == len(shapes)
    targets = [p for p in shapes if p.startswith(("transformer_blocks.0.", "single_transformer_blocks.0."))
               and "norm" not in p]
    assert {"transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.0.proj",
            "transformer_blocks.0.attn.add_k_proj", "single_transformer_blocks.0.proj_mlp"} <= set(targets)
    tensors = {}
    for path in targets:
        out_features, in_features = shapes[path]
        name = "lora_unet_" + path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.zeros(2, in_features)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(out_features, 2)
    weights = parse_lora(tensors, {}, shapes, "13b.safetensors")
    assert set(weights.layers) == set(targets)


def test_a_resumed_lora_job_is_bit_identical(demo_dir, tmp_path):
    """A fresh pipeline (a new process after an interrupt) fuses the job's LoRAs from its settings."""
    from framepack.jobs import JobDir
    from framepack.lora import lora_choice
    from framepack.pipeline import Cancelled, FramePackPipeline, SectionFinished

    settings = demo_settings(demo_dir / "start.png", [lora_choice(demo_dir / "style.safetensors", 0.6)])
    settings = settings.replace(seconds=2.4)  # 2 sections
    full = JobDir.create(tmp_path / "full", settings, tmp_path / "full.mp4")
    FramePackPipeline.from_model("tiny").run(full)
    broken = JobDir.create(tmp_path / "broken", settings, tmp_path / "broken.mp4")
    events: list = []
    with pytest.raises(Cancelled):
        FramePackPipeline.from_model("tiny").run(broken, on_event=events.append,
                                                should_stop=lambda: any(isinstance(e, SectionFinished) for e in events))
    resumed = JobDir.open(broken.root)
    assert resumed.finished == 1
    FramePackPipeline.from_model("tiny").run(resumed)
    assert all(torch.equal(full.load_latents(s), resumed.load_latents(s)) for s in range(2))
    plain = JobDir.create(tmp_path / "plain", settings.replace(loras=()), tmp_path / "plain.mp4")
    FramePackPipeline.from_model("tiny").run(plain)
    assert not torch.equal(plain.load_latents(1), full.load_latents(1))  # the LoRA was in force throughout


def test_lora_with_resume_is_refused_in_one_line(tmp_path):
    result = subprocess.run([FRAMEPACK, "generate", "--resume", str(tmp_path / "job"), "--lora", "x.safetensors"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "framepack: error: --resume continues a job with the settings it was started with; drop --lora (or start a "
        "new job to change them)"]
