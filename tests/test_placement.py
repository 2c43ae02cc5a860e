"""Weight storage modes, block offload and used-once placement (framepack.runtime.placement), on CPU.

The error bounds come from the formats, not from our own output:

* fp8 e4m3fn has 3 mantissa bits, so round-to-nearest moves a normal number by at most half a
  unit in the last place: 2**-3 / 2 = 2**-4 of its magnitude. Below the smallest normal (2**-6,
  in scaled units) the grid is uniform with spacing 2**-9, so the error is at most 2**-10 * scale.
  Per weight: |w_hat - w| <= max(2**-4 |w|, 2**-10 scale).
* int8 with a per-row scale s = amax / 127 rounds w / s to an integer: |w_hat - w| <= s / 2.
* A Linear's output then moves by at most sum_j |x_j| |w_hat_ij - w_ij| per element.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from framepack.components import asset
from framepack.model.inputs import HistoryInput
from framepack.model.transformer import FramePackTransformer
from framepack.runtime.placement import (
    KEEP_IN_COMPUTE_DTYPE,
    QuantizedLinear,
    offload_blocks,
    quantize_fp8,
    quantize_int8,
    store_weights,
    stored_bytes,
    used_once,
)

FP32_SLACK = 4 * 2.0**-24  # the scaling division and the dequantizing product each round once in fp32


@pytest.fixture(scope="module")
def demo() -> FramePackTransformer:
    return FramePackTransformer.from_pretrained(asset("tiny", "transformer"), dtype=torch.float32).eval()  # as it runs


def inputs(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    history = [HistoryInput((1, 2, 2), torch.randn(1, 16, 1, 8, 8, generator=g), torch.tensor([0]))]
    return (latents, torch.tensor([700.0]), torch.randn(1, 5, 64, generator=g), None,
            torch.randn(1, 32, generator=g), None, torch.tensor([1, 2]), history)


def run(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model(*args).float()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


def small_weights(out: int = 48, inp: int = 256, seed: int = 1) -> torch.Tensor:
    # std 0.02 like a wide transformer's Linear: unscaled, most of these would be fp8 subnormals
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02


# ---- storage modes ------------------------------------------------------------------------------


def test_unknown_mode_is_one_line_value_error():
    with pytest.raises(ValueError) as err:
        store_weights(nn.Linear(4, 4), "fp4")
    message = str(err.value)
    assert "\n" not in message and "'fp4'" in message and "fp8" in message


def test_fp8_rounding_within_e4m3_bound():
    w = small_weights()
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.numel() == 1
    # the bound uses the scale the format calls for (largest weight -> 448), not the one returned
    ideal = w.abs().max() / torch.finfo(torch.float8_e4m3fn).max
    error = (q.float() * scale - w).abs()
    bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * ideal) + FP32_SLACK * w.abs()
    assert bool((error <= bound).all())
    assert float(error.max()) > 0  # it really rounded


def test_int8_rounding_within_half_step_per_row():
    w = small_weights()
    w[3] *= 50  # one loud row must not coarsen the others' grid
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (w.shape[0], 1)
    error = (q.float() * scale - w).abs()
    assert bool((error <= scale / 2 * (1 + FP32_SLACK) + 1e-12).all())
    assert float(scale[0]) < float(scale[3]) / 10


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quantized_linear_output_within_weight_bound(mode):
    linear = nn.Linear(256, 48)
    with torch.no_grad():
        linear.weight.copy_(small_weights())
    layer = QuantizedLinear.from_linear(linear, mode)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, y = linear(x), layer(x)
    w = linear.weight.detach()
    if mode == "fp8":
        per_weight = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * layer.weight_scale)
    else:
        per_weight = (layer.weight_scale / 2).expand_as(w)
    bound = x.abs() @ per_weight.T  # (5, 48): sum_j |x_j| max|w_hat_ij - w_ij|
    assert bool(((y - ref).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    # and it computes with exactly the stored grid values times their scale
    stored = layer.weight.float() * layer.weight_scale
    assert torch.allclose(y, x @ stored.T + linear.bias.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_quantized_weights_are_frozen_parameters_so_offload_moves_them(mode):
    """diffusers' group offloading with a CUDA stream moves a block's buffers onto the GPU and never
    back (only its parameters), so 8-bit weights kept as buffers stayed resident: the 13B's fp8
    offload ran out of memory on an H200. Every stored tensor must be a parameter, none trainable."""
    layer = QuantizedLinear.from_linear(nn.Linear(16, 8), mode)
    params = dict(layer.named_parameters())
    assert set(params) == set(layer.state_dict()) == {"weight", "weight_scale", "bias"}
    assert not list(layer.buffers())
    assert not any(p.requires_grad for p in params.values())
    assert params["weight"].dtype == (torch.float8_e4m3fn if mode == "fp8" else torch.int8)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_demo_transformer_output_close_in_fp32_compute(demo, mode):
    args = inputs()
    ref = run(demo, args)
    model = store_weights(copy.deepcopy(demo), mode, torch.float32)
    # every plain Linear but the kept output head was replaced
    linears = [n for n, m in demo.named_modules() if type(m) is nn.Linear]
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert sorted(quantized) == sorted(n for n in linears if n != "proj_out") and len(quantized) > 20
    assert model.proj_out.weight.dtype == torch.float32 and KEEP_IN_COMPUTE_DTYPE == (r"^proj_out$",)
    # No weight moved by more than 2**-4 of its size (fp8, normal range) or half an int8 step;
    # the errors of thousands of weights mostly cancel, so the output must do at least as well.
    error = relative_error(run(model, args), ref)
    assert 0 < error < 2.0**-4


def test_bf16_compute_for_quantized_modes(demo):
    args = inputs()
    for mode in ("fp8", "int8"):
        model = store_weights(copy.deepcopy(demo), mode)  # default compute: bf16
        assert model.dtype == torch.bfloat16
        out = run(model, args)
        assert bool(torch.isfinite(out).all()) and relative_error(out, run(demo, args)) < 2.0**-3


def test_stored_bytes_half_of_bf16_for_fp8_and_int8(demo):
    bf16 = store_weights(copy.deepcopy(demo), "bf16")
    assert stored_bytes(bf16) * 2 == stored_bytes(demo)  # all fp32 -> bf16
    for mode in ("fp8", "int8"):
        model = store_weights(copy.deepcopy(demo), mode)
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        assert all(m.weight.element_size() == 1 for m in layers)
        weights = sum(m.weight.numel() for m in layers)
        scales = sum(m.weight_scale.nbytes for m in layers)
        # each quantized weight went from 2 bytes to 1; only the fp32 scales were added
        assert stored_bytes(model) == stored_bytes(bf16) - weights + scales
        assert stored_bytes(model) < 0.75 * stored_bytes(bf16)
        as_bf16 = sum(bf16.get_submodule(n).weight.nbytes for n, m in model.named_modules()
                      if isinstance(m, QuantizedLinear))
        assert sum(m.weight.nbytes for m in layers) * 2 == as_bf16  # those weights: exactly half


def loaded_fp8(scaled: bool) -> nn.Sequential:
    """A model as model/io.py loads float8 storage: Linear.weight float8, buffer weight_scale."""
    model = nn.Sequential(nn.Linear(256, 48), nn.GELU(), nn.Linear(48, 8))
    with torch.no_grad():
        model[0].weight.copy_(small_weights())
    q, scale = quantize_fp8(model[0].weight.detach()) if scaled else (model[0].weight.to(torch.float8_e4m3fn), None)
    model[0].weight = nn.Parameter(q, requires_grad=False)
    if scale is not None:
        model[0].register_buffer("weight_scale", scale)
    return model


@pytest.mark.parametrize("scaled", [True, False])
def test_loaded_fp8_weights_adopted_not_rounded_twice(scaled):
    model = loaded_fp8(scaled)
    q = model[0].weight.detach().clone()
    real = q.float() * (model[0].weight_scale if scaled else 1.0)  # what the file means
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    expected = model[2](torch.nn.functional.gelu(x @ real.T + model[0].bias.detach()))
    keep = (r"^2$",)  # the second layer stays fp32, so the first alone decides the output
    fp8 = store_weights(copy.deepcopy(model), "fp8", torch.float32, keep)
    assert torch.equal(fp8[0].weight.view(torch.uint8), q.view(torch.uint8))  # same bytes, kept
    for mode, compute in (("fp8", torch.float32), ("fp32", None), ("int8", torch.float32)):
        out = store_weights(copy.deepcopy(model), mode, compute, keep)
        with torch.no_grad():
            tol = 1e-5 if mode != "int8" else 2e-2
            assert torch.allclose(out(x), expected, rtol=tol, atol=tol), mode


def test_float_modes_refuse_another_compute_dtype():
    with pytest.raises(ValueError, match="computes in"):
        store_weights(nn.Linear(4, 4), "bf16", torch.float32)


# ---- block offload ------------------------------------------------------------------------------


def offload_groups(model: FramePackTransformer, per_group: int) -> int:
    c = model.config
    return math.ceil(c.num_layers / per_group) + math.ceil(c.num_single_layers / per_group) + 1  # + the rest


@pytest.mark.parametrize("per_group", [1, 3])
def test_offload_to_disk_equals_resident(demo, tmp_path, per_group):
    args = inputs()
    ref = run(demo, args)
    model = copy.deepcopy(demo)
    directory = offload_blocks(model, "cpu", "disk", tmp_path, blocks_per_group=per_group)
    assert directory is not None and directory.parent == tmp_path
    # one file per group of blocks from each of the two ModuleLists, plus one for the rest
    assert len(list(directory.glob("*.safetensors"))) == offload_groups(demo, per_group)
    assert torch.equal(run(model, args), ref)
    assert torch.equal(run(model, args), ref)  # the second call reads the same files back
    other = inputs(seed=5)
    assert torch.equal(run(model, other), run(demo, other))


def test_offload_to_cpu_equals_resident(demo):
    args = inputs()
    model = copy.deepcopy(demo)
    assert offload_blocks(model, "cpu", "cpu", blocks_per_group=2) is None
    assert torch.equal(run(model, args), run(demo, args))


def test_disk_offload_of_two_models_in_one_path_keeps_each_its_weights(demo, tmp_path):
    # diffusers reuses a group's file if one of the same name exists; each call gets its own directory
    args = inputs()
    other = copy.deepcopy(demo)
    with torch.no_grad():
        for p in other.single_transformer_blocks.parameters():
            p.mul_(0.5)
    expected = run(other, args)
    first, second = copy.deepcopy(demo), copy.deepcopy(other)
    offload_blocks(first, "cpu", "disk", tmp_path)
    offload_blocks(second, "cpu", "disk", tmp_path)
    assert torch.equal(run(second, args), expected)
    assert not torch.equal(expected, run(first, args))


class Nested(nn.Module):
    """Blocks one level down (``inner.blocks``), where diffusers does not look by itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.inner.blocks:
            x = torch.tanh(block(x))
        return x


def test_offload_block_modules_for_other_layouts(tmp_path):
    model, x = Nested(), torch.randn(2, 8)
    expected = run(model, (x,))
    whole, split = copy.deepcopy(model), copy.deepcopy(model)
    found = offload_blocks(whole, "cpu", "disk", tmp_path)
    named = offload_blocks(split, "cpu", "disk", tmp_path, block_modules=["inner"])
    assert len(list(found.glob("*.safetensors"))) == 1  # alone, diffusers sees one unmatched module
    assert len(list(named.glob("*.safetensors"))) == 3  # told where to look: one group per block
    assert torch.equal(run(whole, (x,)), expected) and torch.equal(run(split, (x,)), expected)


def test_fp8_storage_with_disk_offload_equals_fp8_resident(demo, tmp_path):
    args = inputs()
    resident = store_weights(copy.deepcopy(demo), "fp8")
    model = store_weights(copy.deepcopy(demo), "fp8")
    offload_blocks(model, "cpu", "disk", tmp_path)
    assert torch.equal(run(model, args), run(resident, args))


def test_mapped_fp8_load_reads_nothing_and_disk_offload_equals_fp8_resident(demo, tmp_path):
    """What a plan streaming the transformer from disk does (generate --memory on a small budget):
    float8 block weights left mapped from the fp8 checkpoint (not read at load), stored fp8, block
    offloaded to disk: the outputs of a model loaded by copying and kept resident."""
    from framepack.model.io import data_offsets, fp8_weight_names

    store_weights(copy.deepcopy(demo), "fp8").save_pretrained(tmp_path / "fp8")  # our fp8 checkpoint
    copied = FramePackTransformer.from_pretrained(tmp_path / "fp8", storage_dtype=torch.float8_e4m3fn,
                                                  dtype=torch.float32)
    mapped = FramePackTransformer.from_pretrained(tmp_path / "fp8", storage_dtype=torch.float8_e4m3fn,
                                                  dtype=torch.float32, mapped=True)
    # not read at load: bytes changed in the file afterwards show through the mapped weight only
    file = tmp_path / "fp8" / "diffusion_pytorch_model.safetensors"
    name = sorted(fp8_weight_names(mapped))[0]
    start, end = data_offsets(file)[name]
    original = file.read_bytes()
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(bytes(end - start))  # zeros
    weight = lambda m: m.get_parameter(name).detach().reshape(-1).view(torch.uint8)  # noqa: E731
    assert not weight(mapped).any() and weight(copied).any()
    file.write_bytes(original)  # the same inode's pages again (write_bytes truncates and rewrites in place)
    assert torch.equal(weight(mapped), weight(copied))

    args = inputs()
    resident = store_weights(copied, "fp8", torch.float32)
    streamed = store_weights(mapped, "fp8", torch.float32)
    offload_blocks(streamed, "cpu", "disk", tmp_path / "offload")
    assert torch.equal(run(streamed, args), run(resident, args))
    with pytest.raises(ValueError, match="mapped loading"):
        FramePackTransformer.from_pretrained(tmp_path / "fp8", mapped=True)  # without float8 storage


@pytest.mark.parametrize("kwargs, words", [
    ({"offload_to": "tape"}, "offload_to"),
    ({"offload_to": "disk"}, "path"),
    ({"prefetch": True}, "CUDA"),
    ({"blocks_per_group": 0}, "blocks_per_group"),
])
def test_offload_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        offload_blocks(FramePackTransformer("tiny"), "cpu", **kwargs)


# ---- used once ------------------------------------------------------------------------------------


class Recorder(nn.Linear):
    """A Linear that notes every device it is moved to (this machine has no second device)."""

    def __init__(self) -> None:
        super().__init__(3, 3)
        self.moves: list[torch.device] = []

    def to(self, device, *args, **kwargs):  # type: ignore[override]
        self.moves.append(torch.device(device))
        return super().to(device, *args, **kwargs)


def test_used_once_moves_there_and_back_even_on_error():
    enc = Recorder()
    x = torch.randn(2, 3)
    with used_once(enc, "cpu") as module:
        assert module is enc
        y = module(x)
    assert enc.moves == [torch.device("cpu"), torch.device("cpu")]
    assert torch.equal(y, enc(x))
    with pytest.raises(RuntimeError, match="boom"):
        with used_once(enc, "cpu"):
            raise RuntimeError("boom")
    assert len(enc.moves) == 4  # moved back despite the error

