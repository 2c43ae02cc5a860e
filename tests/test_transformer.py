"""The packed transformer against its specification and against diffusers' independent port."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from framepack import FramePackTransformer, HistoryInput, TransformerConfig, preset
from reference import diffusers_twin, random_inputs, run_diffusers

# Names and shapes of the released 13B checkpoint, kept in the repository so a fresh clone can run
# this test without the checkpoint (26 GB) or network access.
SPEC = Path(__file__).resolve().parent / "data" / "framepack_13b_state_dict.json"

# Two different small architectures: the tiny preset, and one without guidance embedding, with a
# different head geometry, MLP ratio and two refiner blocks.
CONFIGS = {
    "tiny": preset("tiny"),
    "other": TransformerConfig(
        num_attention_heads=2,
        attention_head_dim=48,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=2,
        mlp_ratio=2.0,
        guidance_embeds=False,
        text_embed_dim=40,
        pooled_projection_dim=24,
        rope_axes_dim=(8, 20, 20),
        rope_theta=10000.0,
        image_proj_dim=20,
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_13b_preset_has_the_released_names_and_shapes():
    spec = json.loads(SPEC.read_text())
    with torch.device("meta"):
        model = FramePackTransformer("hunyuan-13b")
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == spec["shapes"]
    assert len(state) == spec["num_tensors"] == 1274
    assert sum(v.numel() for v in state.values()) == spec["num_parameters"] == 12_874_314_816


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(8, 8), (10, 6)])  # (10, 6): history levels need replicate padding
def test_matches_diffusers_at_batch_1(name, size):
    model = FramePackTransformer(CONFIGS[name]).eval()
    twin = diffusers_twin(model)
    inputs = random_inputs(model.config, height=size[0], width=size[1], valid_text=[7], seed=3)
    with torch.no_grad():
        ours, theirs = model(**inputs), run_diffusers(twin, inputs)
    assert ours.shape == theirs.shape == inputs["latents"].shape
    assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_of_two_equals_each_sample_alone(name):
    """Different text lengths and different frame indices per sample, masked SDPA only."""
    model = FramePackTransformer(CONFIGS[name]).eval()
    batch = random_inputs(model.config, batch=2, valid_text=[12, 5], index_offsets=[0, 37], seed=5)
    twin = diffusers_twin(model)
    with torch.no_grad():
        together = model(**batch)
        for i in range(2):
            alone = {k: _take(v, i) for k, v in batch.items()}
            single = model(**alone)
            assert rel_err(together[i : i + 1], single) <= 1e-5
            # and each sample alone is diffusers' answer for that sample
            assert rel_err(single, run_diffusers(twin, alone)) <= 1e-5
    # the two samples really are different problems
    assert rel_err(together[0:1], together[1:2]) > 1e-2


def _take(value, i):
    if isinstance(value, torch.Tensor):
        return value[i : i + 1]
    if isinstance(value, list):
        return [HistoryInput(h.kernel, h.latents[i : i + 1], h.indices[i : i + 1]) for h in value]
    return value


def test_text_padding_position_does_not_matter():
    """Valid tokens anywhere in the mask give the result of the same tokens packed at the front."""
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config, valid_text=[6], seed=7)
    scattered = dict(inputs)
    order = torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])  # valid tokens 0..5 interleaved with padding
    scattered["text"] = inputs["text"][:, order]
    scattered["text_mask"] = inputs["text_mask"][:, order]
    with torch.no_grad():
        assert rel_err(model(**scattered), model(**inputs)) <= 1e-6


def test_gradient_checkpointing_gives_the_same_gradients():
    model = FramePackTransformer("tiny").train()
    inputs = random_inputs(model.config, batch=2, valid_text=[12, 4], index_offsets=[0, 9])

    def grads():
        model.zero_grad()
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_close_to_fp32(dtype):
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config, valid_text=[9])
    with torch.no_grad():
        reference = model(**inputs)
        half = model.cast(dtype)(**inputs)
    assert half.dtype == dtype
    assert torch.isfinite(half).all()
    assert rel_err(half.float(), reference) < 0.05


def test_fp32_output_head():
    model = FramePackTransformer("tiny").eval().cast(torch.bfloat16, fp32_output_head=True)
    assert model.proj_out.weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**random_inputs(model.config))
    assert out.dtype == torch.float32


def test_history_changes_the_prediction_and_positions_matter():
    """Sanity of the packing itself: the context is read, and RoPE time indices are used."""
    model = FramePackTransformer("tiny").eval()
    inputs = random_inputs(model.config)
    with torch.no_grad():
        base = model(**inputs)
        no_history = model(**{**inputs, "history": []})
        moved = [HistoryInput(h.kernel, h.latents, h.indices + 5) for h in inputs["history"]]
        shifted = model(**{**inputs, "history": moved})
    assert rel_err(no_history, base) > 1e-3
    assert rel_err(shifted, base) > 1e-4


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_memo_reuses_the_history_across_steps_bit_for_bit(name):
    """A section's steps share the history tokens and RoPE tables: made once, the same outputs."""
    model = FramePackTransformer(CONFIGS[name]).eval()
    inputs = random_inputs(model.config)
    embedded = []
    model.clean_x_embedder.register_forward_hook(lambda *_: embedded.append(1))
    memo: dict = {}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step in range(3):  # new noisy latents and timestep every step, as a sampler does
            x = torch.randn(inputs["latents"].shape, generator=g)
            t = inputs["timestep"] * (1 - step / 4)
            plain = model(**{**inputs, "latents": x, "timestep": t})
            assert torch.equal(model(**{**inputs, "latents": x, "timestep": t}, memo=memo), plain)
        history_calls = len(inputs["history"])
        assert len(embedded) == 3 * history_calls + history_calls  # 3 plain forwards, the memo's first only
        with pytest.raises(ValueError, match="memo made for latents of shape"):  # another section's inputs
            model(**random_inputs(model.config, height=16, width=16), memo=memo)
