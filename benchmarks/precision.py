"""Weight storage modes on the demo model (CPU): error vs fp32 and bytes of weights, per mode.

For each mode the fp32 transformer is copied and stored as that mode (framepack.runtime.placement,
applied from outside the pipeline to ``pipeline.c.transformer``), then:

* transformer: relative error ||y - y_fp32|| / ||y_fp32|| of one forward on fixed inputs (a
  window of 9 latent frames at the demo's 128 px, with a packed history level of each kernel);
* video: a short generation (same prompt, image, seed and steps as the fp32 run); every section's
  latents are decoded by the VAE and compared with fp32's: PSNR over all frames, pixels in [-1, 1]
  (peak-to-peak 2). Decoded latents, not the mp4, so codec noise does not enter the comparison;
* weight memory: bytes of parameters and buffers as stored (tensor subclasses: their inner tensors).

Rows beside ours, for the record: diffusers' ``apply_layerwise_casting`` to float8 (no scale), and
torchao's int8 weight-only if torchao is installed.

Run: ``python benchmarks/precision.py [--update-doc docs/precision-and-offload.md]``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from framepack.demo import demo_settings  # noqa: E402
from framepack.jobs import JobDir  # noqa: E402
from framepack.model.inputs import HistoryInput  # noqa: E402
from framepack.pipeline import FramePackPipeline  # noqa: E402
from framepack.runtime.placement import (  # noqa: E402
    FP8,
    KEEP_IN_COMPUTE_DTYPE,
    QuantizedLinear,
    quantize_fp8,
    store_weights,
    stored_bytes,
)

PIXEL_RANGE = 2.0  # decoded pixels live in [-1, 1]


def forward_inputs(seed: int = 0) -> tuple:
    """One section's worth of transformer inputs for the 128 px demo (latents 16x16, window 9):
    a start frame and the three history levels (1x, 2x, 4x), nearest first."""
    g = torch.Generator().manual_seed(seed)
    window, size = 9, 16
    levels = (((1, 2, 2), 3, 0), ((2, 4, 4), 2, 12), ((4, 8, 8), 16, 14))  # (kernel, frames, first index)
    history = [HistoryInput(kernel, torch.randn(1, 16, frames, size, size, generator=g), torch.arange(frames) + first)
               for kernel, frames, first in levels]
    return (torch.randn(1, 16, window, size, size, generator=g), torch.tensor([700.0]),
            torch.randn(1, 12, 64, generator=g), None, torch.randn(1, 32, generator=g), None,
            torch.arange(3, 3 + window), history)


def diffusers_fp8_unscaled(model: nn.Module) -> nn.Module:
    from diffusers.hooks import apply_layerwise_casting

    model.to(torch.bfloat16)
    # the same Linear layers as ours (convolutions and the output head stay bf16)
    apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=torch.bfloat16,
                            skip_modules_pattern=KEEP_IN_COMPUTE_DTYPE, skip_modules_classes=(nn.Conv3d,))
    return model


def torchao_int8(model: nn.Module) -> nn.Module:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model.to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, name: type(m) is nn.Linear and name != "proj_out")
    return model


def modes(with_torchao: bool) -> list[tuple[str, Callable[[nn.Module], nn.Module]]]:
    rows: list[tuple[str, Callable[[nn.Module], nn.Module]]] = [
        ("fp32", lambda m: store_weights(m, "fp32")),
        ("bf16", lambda m: store_weights(m, "bf16")),
        ("fp8 e4m3fn + per-tensor scale, bf16 compute", lambda m: store_weights(m, "fp8", torch.bfloat16)),
        ("fp8 e4m3fn + per-tensor scale, fp32 compute", lambda m: store_weights(m, "fp8", torch.float32)),
        ("fp8 e4m3fn, no scale (diffusers layerwise casting), bf16 compute", diffusers_fp8_unscaled),
        ("int8 + per-channel scale, bf16 compute", lambda m: store_weights(m, "int8", torch.bfloat16)),
        ("int8 + per-channel scale, fp32 compute", lambda m: store_weights(m, "int8", torch.float32)),
    ]
    if with_torchao:
        rows.append(("int8 torchao Int8WeightOnlyConfig, bf16 compute", torchao_int8))
    return rows


def torchao_available() -> bool:
    try:
        import torchao  # noqa: F401
    except ImportError:
        return False
    return True


def weight_bytes(model: nn.Module) -> int:
    """stored_bytes, looking inside tensor subclasses (torchao keeps int8 data + scales inside)."""
    def size(t: torch.Tensor) -> int:
        if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(size(t) for t in tensors.values())


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a Linear-like layer computes with, in fp32."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized(torch.float32)
    weight = module.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize"):
        return weight.dequantize().float()  # torchao's int8 tensor
    return weight.detach().float()


def weight_error(model: nn.Module, fp32: nn.Module) -> float:
    """||W_stored - W|| / ||W|| over all Linear layers but the kept output head."""
    names = [n for n, m in fp32.named_modules() if type(m) is nn.Linear and n != "proj_out"]
    diff = sum(float((effective_weight(model.get_submodule(n)) - fp32.get_submodule(n).weight.detach()).pow(2).sum())
               for n in names)
    norm = sum(float(fp32.get_submodule(n).weight.detach().pow(2).sum()) for n in names)
    return math.sqrt(diff / norm)


def generate(pipeline: FramePackPipeline, settings, work: Path) -> torch.Tensor:
    """Decoded frames of every section, generation order, (sections, 3, T, H, W) in [-1, 1]."""
    job = JobDir.create(work / "job", settings, work / "out.mp4")
    pipeline.run(job)
    sections = [pipeline.c.vae.decode(job.load_latents(step)).float().clamp(-1, 1) for step in range(job.finished)]
    return torch.stack(sections)


def scaling_table(stds: tuple[float, ...] = (0.1, 0.02, 0.005, 0.001), size: int = 1024) -> str:
    """Synthetic: e4m3fn rounding error of Gaussian weights of a given std, with and without scale."""
    lines = ["| weight std | e4m3fn, no scale: rel. error | share below 2^-6 (subnormal) "
             "| e4m3fn + per-tensor scale: rel. error |", "|---:|---:|---:|---:|"]
    for std in stds:
        w = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * std
        plain = w.to(FP8).float()
        q, scale = quantize_fp8(w)
        rel = [float((x - w).norm() / w.norm()) for x in (plain, q.float() * scale)]
        sub = float((w.abs() < 2.0**-6).float().mean())
        lines.append(f"| {std:g} | {rel[0]:.2e} | {sub:.0%} | {rel[1]:.2e} |")
    return "\n".join(lines)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((x - ref).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(PIXEL_RANGE**2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="video length of the generation (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torchao", action="store_true", help="leave out the torchao row")
    parser.add_argument("--update-doc", type=Path, help="write the table between this doc's bench:precision markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = FramePackPipeline.from_model("tiny", dtype=torch.float32)
    fp32 = base.c.transformer.eval()
    settings = demo_settings(seconds=args.seconds, steps=args.steps, seed=args.seed)
    inputs = forward_inputs()
    with torch.no_grad():
        ref_out = fp32(*inputs).float()
    ref_video = None
    lines = ["| storage | Linear weights rel. error | transformer output rel. error | video PSNR vs fp32 (dB) "
             "| weight bytes | vs fp32 |", "|---|---:|---:|---:|---:|---:|"]
    fp32_bytes = stored_bytes(fp32)
    for name, apply in modes(torchao_available() and not args.no_torchao):
        model = apply(copy.deepcopy(fp32)).eval()
        with torch.no_grad():
            out = model(*inputs).float()
        error = float((out - ref_out).norm() / ref_out.norm())
        pipeline = FramePackPipeline(dataclasses.replace(base.c, transformer=model))
        with tempfile.TemporaryDirectory() as work:
            video = generate(pipeline, settings, Path(work))
        if ref_video is None:
            ref_video = video
        quality = psnr(video, ref_video)
        size = weight_bytes(model)
        lines.append(f"| {name} | {weight_error(model, fp32):.2e} | {error:.2e} "
                     f"| {'identical' if math.isinf(quality) else f'{quality:.1f}'} | {size:,} | {size / fp32_bytes:.3f} |")
        print(lines[-1], flush=True)
    sections, (frames, height, width) = ref_video.shape[0], ref_video.shape[-3:]
    lines += ["", f"Generation: the demo model (`--model tiny`), {settings.seconds:g} s, {settings.steps} steps, "
              f"seed {settings.seed}: {sections} section(s), {sections * frames} decoded frames of {width}x{height} px. "
              "Linear weights rel. error: ||W_stored - W|| / ||W|| over every Linear the mode stores "
              "(all but the output head). CPU only."]
    lines += ["", "Why the scale: e4m3fn rounding of random Gaussian weights (synthetic, "
              "1024x1024; for scale, PyTorch's default init of a 3072-wide Linear, the 13B model's width, "
              "draws from U(-1/sqrt(3072), 1/sqrt(3072)): std 0.010; the released weights were not available here):", "", scaling_table()]
    from doctable import publish

    publish("\n".join(lines), args.update_doc, "precision", "python benchmarks/precision.py")


if __name__ == "__main__":
    main()
