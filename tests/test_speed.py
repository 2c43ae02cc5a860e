"""Speed work that must not change the video: reused decoded frames; compiled blocks that compile once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

import framepack.pipeline as pipeline_module
from framepack.components import asset, load_vae
from framepack.demo import demo_settings
from framepack.jobs import JobDir
from framepack.pipeline import FramePackPipeline
from framepack.small_vae import SmallVideoAutoencoder
from framepack.train import world
from framepack.video import Assembler, read_frames, to_frames, to_uint8

FIRST_CONV = "decoder.trunk.0.weight"


@pytest.fixture(scope="module")
def demo() -> FramePackPipeline:
    return FramePackPipeline.from_model("tiny")


def _decoder_variant(vae: SmallVideoAutoencoder, context: int, decode_dtype: torch.dtype) -> SmallVideoAutoencoder:
    """``vae`` with a decoder that reads the previous latent (random weights on it, so the context
    changes the frames) or that decodes each latent alone (those weights dropped), decoding in
    ``decode_dtype`` (bf16 runs on any CPU, emulated where it is not native)."""
    state = vae.state_dict()
    own = state[FIRST_CONV][:, : vae.config.latent_channels]
    previous = torch.randn(own.shape, generator=torch.Generator().manual_seed(0)) * own.std()
    state[FIRST_CONV] = torch.cat([own, previous], dim=1) if context else own
    variant = SmallVideoAutoencoder(dataclasses.replace(vae.config, decoder_context=context))
    variant.load_state_dict(state)
    return variant.eval().for_inference("cpu", decode_dtype)


def _clips_and_video(pipeline: FramePackPipeline, root: Path, monkeypatch, reuse: bool, mode: str):
    """Run 3 demo sections; returns (every clip the blend received, latents decoded, final frames)."""
    clips: list[np.ndarray] = []
    decoded: list[int] = []
    add, decode = Assembler.add, pipeline.c.vae.decode

    def recording_add(self, clip, last):
        if clip.size:  # not the layout's dry run on empty frames
            clips.append(clip.copy())
        return add(self, clip, last)

    def counting_decode(latents):
        decoded.append(latents.shape[2])
        return decode(latents)

    with monkeypatch.context() as patch:
        patch.setattr(Assembler, "add", recording_add)
        patch.setattr(pipeline.c.vae, "decode", counting_decode)
        if not reuse:  # the reference path: every section's span decoded whole, as before
            patch.setattr(pipeline_module, "_decodes_latents_alone", lambda vae: False)
        settings = dataclasses.replace(demo_settings(seconds=3.6, steps=1), mode=mode)
        job = JobDir.create(root / "job", settings, root / "out.mp4")
        pipeline.run(job)
    return clips, sum(decoded), read_frames(job.out)


DECODE_DTYPES = pytest.mark.parametrize("decode_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DECODE_DTYPES
@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_reused_decoded_frames_leave_the_video_bit_identical(demo, tmp_path, monkeypatch, mode, decode_dtype):
    monkeypatch.setattr(demo.c, "vae", _decoder_variant(demo.c.vae, context=0, decode_dtype=decode_dtype))
    clips, fewer, video = _clips_and_video(demo, tmp_path / "reuse", monkeypatch, True, mode)
    ref_clips, whole, ref_video = _clips_and_video(demo, tmp_path / "whole", monkeypatch, False, mode)
    assert fewer < whole  # the reuse did happen: fewer latents went through the VAE
    assert len(clips) == len(ref_clips) == 3
    for clip, ref in zip(clips, ref_clips):
        assert clip.dtype == ref.dtype and clip.shape == ref.shape
        assert np.array_equal(clip, ref)  # the float frames before rounding, bit for bit
    assert np.array_equal(video, ref_video)


@DECODE_DTYPES
@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_a_decoder_that_reads_the_previous_latent_reuses_frames_only_where_their_context_holds(
        demo, tmp_path, monkeypatch, mode, decode_dtype):
    """Inverted mode decodes each span's new latents right after its first one, so their context is
    there; forward mode's new latents follow kept ones, so the last kept one is decoded again as
    their context. Either way fewer latents are decoded and the video is that of whole-span
    decodes, bit for bit."""
    monkeypatch.setattr(demo.c, "vae", _decoder_variant(demo.c.vae, context=1, decode_dtype=decode_dtype))
    clips, decoded, video = _clips_and_video(demo, tmp_path / "reuse", monkeypatch, True, mode)
    ref_clips, whole, ref_video = _clips_and_video(demo, tmp_path / "whole", monkeypatch, False, mode)
    assert decoded < whole
    assert all(np.array_equal(clip, ref) for clip, ref in zip(clips, ref_clips, strict=True))
    assert np.array_equal(video, ref_video)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_session.sh runs it where there is)"))])
def test_the_demo_vae_decodes_in_bf16_within_one_level_of_fp32(device):
    """Where the hardware multiplies bf16 natively the demo VAE decodes in it (4-7x faster on a CPU):
    its frames, rounded to the video's 8 bits, are those of fp32 to within one level, on a clip of
    its world."""
    exact = SmallVideoAutoencoder.from_pretrained(asset("tiny", "vae"))
    fast = SmallVideoAutoencoder.from_pretrained(asset("tiny", "vae")).for_inference(device, torch.bfloat16)
    scene = world.sample_params(np.random.default_rng(3), start="independent")
    clip = torch.from_numpy(world.render(scene, frames=33)).float() / 127.5 - 1
    latents = exact.encode(clip.permute(3, 0, 1, 2)[None])
    reference, frames = (to_uint8(to_frames(vae.decode(latents))).astype(int) for vae in (exact, fast))
    assert frames.shape == reference.shape == (33, 128, 128, 3)
    assert np.abs(frames - reference).max() <= 1
    assert np.abs(frames - reference).mean() < 0.1  # one level off in a few values, never more
    assert not torch.equal(fast.decode(latents), exact.decode(latents))  # bf16 did run


@pytest.mark.parametrize(("capabilities", "expected"), [
    ({"amx_bf16": True, "avx512_bf16": True}, torch.bfloat16), ({"avx512_bf16": True}, torch.bfloat16),
    ({"amx_bf16": False, "avx512_bf16": False, "avx2": True}, torch.float32), ({}, torch.float32)])
def test_the_demo_vae_decodes_in_bf16_only_where_the_cpu_has_it(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    vae = load_vae(asset("tiny", "vae"), torch.float32, "cpu", tiling=False)
    assert vae.decode_dtype == expected
    assert all(p.dtype == torch.float32 for p in vae.parameters())  # the weights stay fp32
    assert vae.decoder.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)


# ---- --compile ---------------------------------------------------------------------------------------


def test_compiled_blocks_compile_once_and_agree_with_eager(tmp_path):
    import torch
    from torch._dynamo.utils import counters

    from framepack.pipeline import SectionFinished
    from framepack.runtime.compile import compile_blocks

    # a prompt per section of different lengths: the text length changes from section to section too
    settings = dataclasses.replace(demo_settings(seconds=3.6, steps=2), prompt=(
        "[0s-1.2s: a red ball] [1.2s-2.4s: a small blue square slides to the left] [2.4s-3.6s: a circle]"))
    eager = FramePackPipeline.from_model("tiny")
    reference = JobDir.create(tmp_path / "eager", settings, tmp_path / "eager.mp4")
    eager.run(reference)

    torch._dynamo.reset()
    counters.clear()
    compiled = FramePackPipeline.from_model("tiny")
    blocks = compiled.c.transformer.transformer_blocks, compiled.c.transformer.single_transformer_blocks
    assert compile_blocks(compiled.c.transformer) == sum(len(b) for b in blocks)
    graphs: list[int] = []
    compiles: list[int] = []

    def on_event(event) -> None:
        if isinstance(event, SectionFinished):
            graphs.append(counters["stats"]["unique_graphs"])
            compiles.append(sum(counters["inductor"].values()))

    job = JobDir.create(tmp_path / "compiled", settings, tmp_path / "compiled.mp4")
    try:
        compiled.run(job, on_event=on_event)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 3 and graphs[0] > 0  # the first section compiled the blocks
    assert graphs[1:] == [graphs[0]] * 2  # and nothing was traced again afterwards
    assert compiles[1:] == [compiles[0]] * 2
    for step in range(3):  # fused kernels round differently, nothing more
        torch.testing.assert_close(job.load_latents(step), reference.load_latents(step), rtol=1e-3, atol=1e-3)


def test_compile_and_attention_refusals_are_one_line_before_anything_is_written(tmp_path):
    import subprocess
    import sys

    from framepack.components import asset

    framepack = str(Path(sys.executable).with_name("framepack"))
    base = [framepack, "generate", "--model", "tiny", "--image", str(asset("demo", "start.png")), "--prompt", "p",
            "--device", "cpu", "--out", str(tmp_path / "out.mp4")]
    for extra, words in ((["--attention", "flash"], ["--attention flash", "CUDA", "flash-attn"]),
                         (["--attention", "sage"], ["--attention sage", "CUDA", "sageattention"]),
                         (["--compile", "--attention", "sage"], ["sage"])):
        result = subprocess.run(base + extra, capture_output=True, text=True, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr
    assert list(tmp_path.iterdir()) == []


# ---- --attention -------------------------------------------------------------------------------------


def _unmasked(q, k, v):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_a_mask_free_kernel_runs_a_masked_batch_sample_by_sample():
    import torch

    from framepack.model.attention import by_sample, sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 10, 2, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False  # padded text at the end of two samples
    mask[2, 4:] = False
    torch.testing.assert_close(by_sample(_unmasked, q, k, v, mask), sdpa(q, k, v, mask))
    torch.testing.assert_close(by_sample(_unmasked, q, k, v, None), sdpa(q, k, v, None))
    # and the mask matters: without it sample 0 would differ
    assert not torch.allclose(by_sample(_unmasked, q, k, v, None)[0], sdpa(q, k, v, mask)[0])


def test_use_attention_applies_to_the_models_forwards_only_and_is_undone(demo, monkeypatch):
    import threading

    import torch

    from framepack.model import attention

    calls: list[str] = []

    def kernel(q, k, v):
        calls.append(threading.current_thread().name)
        return _unmasked(q, k, v)

    monkeypatch.setattr(attention, "load_kernel", lambda backend: kernel)
    model = demo.c.transformer
    undo = attention.use_attention(model, "flash")
    q = torch.randn(1, 4, 2, 8)
    attention.attention(q, q, q)  # outside the model's forward: SDPA
    assert calls == []
    inputs = _tiny_forward_inputs(model)

    def forward() -> None:
        with torch.no_grad():
            model(*inputs)

    forward()
    assert calls and set(calls) == {threading.current_thread().name}
    calls.clear()
    worker = threading.Thread(target=forward, name="worker")  # the pipeline samples in a thread of its own
    worker.start()
    worker.join()
    assert calls and set(calls) == {"worker"}
    undo()
    calls.clear()
    forward()
    assert calls == []


def _tiny_forward_inputs(model):
    import torch

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, 1, 4, 4, generator=g)
    text = torch.randn(1, 5, cfg.text_embed_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g)
    image = torch.randn(1, 3, cfg.image_proj_dim, generator=g) if cfg.has_image_proj else None
    guidance = torch.tensor([10_000.0]) if cfg.guidance_embeds else None
    return latents, torch.tensor([500.0]), text, None, pooled, image, None, (), guidance


# ---- the HunyuanVideo VAE's repeated temporal tiles ----------------------------------------------------


@pytest.fixture(scope="module")
def hunyuan_vae(tmp_path_factory):
    from tiny_hub import write_hunyuan_video

    return write_hunyuan_video(tmp_path_factory.mktemp("hv")) / "vae"


def _spans(latents, mode: str, window: int = 9):
    """The spans a 4-section video decodes, in generation order: each section's window with the
    window before it in generation order (after it in video time in inverted mode)."""
    n = latents.shape[2] // window
    order = range(n - 2, -1, -1) if mode == "inverted" else range(n - 1)
    return [latents[:, :, window * k: window * (k + 2)] for k in order]


@pytest.mark.parametrize("mode", ["inverted", "forward"])
def test_repeated_tiles_decode_bit_identical_to_diffusers_and_less(hunyuan_vae, mode):
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    from framepack.components import HunyuanVAE

    ours = HunyuanVAE.from_pretrained(hunyuan_vae)
    plain = AutoencoderKLHunyuanVideo.from_pretrained(hunyuan_vae).eval()  # no hook: diffusers' own decode
    latents = torch.randn(1, 16, 9 * 4, 8, 8, generator=torch.Generator().manual_seed(3))
    runs = []
    for span in _spans(latents, mode):
        before = ours.tiles.decoded
        with torch.no_grad():
            reference = plain.decode(span / ours.scaling).sample.float().clamp(-1, 1)
        assert torch.equal(ours.decode(span), reference)  # bit for bit, tiles reused or not
        runs.append(ours.tiles.decoded - before)
    # 18 latents make 6 tiles (every 3 latents); from the second span on, 2 were made by the one before
    assert runs == [6, 4, 4]
    # a span that shares nothing with the previous one decodes every tile again
    ours.decode(torch.randn(1, 16, 18, 8, 8))
    assert ours.tiles.decoded - sum(runs) == 6


def test_repeated_tiles_leave_the_pipelines_video_bit_identical(tmp_path):
    from diffusers.hooks import HookRegistry

    from framepack.settings import GenerationSettings
    from framepack.tile_reuse import NAME
    from tiny_hub import write_model_dir

    model = write_model_dir(tmp_path / "model", mode="inverted")[0]
    image = str(Path(__file__).parent.parent / "src/framepack/assets/demo/start.png")
    settings = GenerationSettings(image=image, prompt="a red circle moves to the right", model=str(model),
                                  seconds=3.6, steps=2, resolution=64, seed=7)
    videos, decoded = [], []
    for reuse in (True, False):
        pipeline = FramePackPipeline.from_model(str(model))
        vae = pipeline.c.vae
        if not reuse:
            HookRegistry.check_if_exists_or_initialize(vae.vae.decoder).remove_hook(NAME)
            vae.tiles = None
        runs = []
        hook = vae.vae.decoder.conv_in.register_forward_hook(lambda *_: runs.append(1))
        job = JobDir.create(tmp_path / f"job{reuse}", settings, tmp_path / f"out{reuse}.mp4")
        pipeline.run(job)
        hook.remove()
        videos.append(read_frames(job.out))
        decoded.append(len(runs))
        del pipeline
    assert decoded[0] < decoded[1]  # tiles were reused
    assert np.array_equal(videos[0], videos[1])


# ---- RoPE as a complex product ---------------------------------------------------------------------


def test_rope_as_a_complex_product_is_the_pairwise_rotation():
    import torch

    from framepack.model.rope import apply_rope, avg_pool_grid, rotate_pairs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 4, 16, generator=g).flatten(1, 3)  # (B, L, H, d)
    angles = torch.randn(2, 3, 4, 5, 8, generator=g).repeat_interleave(2, dim=-1)  # one angle per pair
    # pooled tables (history levels) are no longer unit rotations; the identity holds for them too
    for cos, sin in ((angles.cos(), angles.sin()),
                     (avg_pool_grid(angles.cos(), (1, 2, 2)), avg_pool_grid(angles.sin(), (1, 2, 2)))):
        cos, sin = cos.flatten(1, 3), sin.flatten(1, 3)
        xs = x[:, : cos.shape[1]]
        expected = xs * cos[:, :, None] + rotate_pairs(xs) * sin[:, :, None]  # the definition, in fp32
        # the complex product may fuse a multiply-add: within 2 float32 ulps of the definition
        torch.testing.assert_close(apply_rope(xs, cos, sin), expected, rtol=2.5e-7, atol=1e-7)
        xb = xs.bfloat16()  # bf16 queries are rotated in fp32 and rounded back
        rounded = (xb.float() * cos[:, :, None] + rotate_pairs(xb.float()) * sin[:, :, None]).bfloat16()
        torch.testing.assert_close(apply_rope(xb, cos, sin), rounded, rtol=0.008, atol=0)
        assert not torch.allclose(apply_rope(xs, cos, -sin), expected, atol=1e-3)  # the direction matters

    # compiled, the same rotation in real arithmetic, with nothing left to inductor's eager fallback
    # for complex tensors (the warning it gives for them)
    import warnings

    torch._dynamo.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = torch.compile(apply_rope, dynamic=False)(xs, cos, sin)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, expected, rtol=2.5e-7, atol=1e-7)
    assert not [w for w in caught if "complex" in str(w.message)], [str(w.message) for w in caught]
