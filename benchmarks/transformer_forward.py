"""Forward time of ``framepack.FramePackTransformer`` against diffusers' independent port.

What it measures: one forward pass of our packed transformer and of diffusers'
``HunyuanVideoFramepackTransformer3DModel`` with the SAME weights (ours, copied into diffusers
through the state dict by ``tests/reference.py``'s ``diffusers_twin``) on the SAME inputs
(``random_inputs``: a window of noisy frames with full 1x/2x/4x history context, SigLIP image
tokens and LLaMA-like text), on CPU (default) or ``--device cuda``, under ``torch.inference_mode()``.

For every dtype both models are warmed up, then run alternately (the order swaps every pair so
neither model always runs first) and the script reports the median wall time of each, the ratio
ours/diffusers (ratio of the medians and the median of the per-pair ratios), and the max relative
error between the two outputs, ``max|ours - diffusers| / max|diffusers|``.

Goal: ratio ours/diffusers <= 1.0 in every row, i.e. our port is no slower than diffusers'.

The default model is a CPU-sized HunyuanVideo (inner dim 512) with the real head dim and RoPE
axes; run ``--help`` for the knobs. Timings on a shared machine are noisy: compare the per-pair
ratio, and repeat with more ``--repeats`` when rows are close to 1.0.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from framepack import FramePackTransformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Row:
    dtype: str
    ours_ms: float
    diffusers_ms: float
    pair_ratio: float  # median over pairs of ours / diffusers
    max_rel_err: float

    @property
    def ratio_of_medians(self) -> float:
        return self.ours_ms / self.diffusers_ms


# ---- setup ----------------------------------------------------------------------------------------


def load_reference() -> Any:
    """``tests/reference.py`` (the diffusers bridge), imported from the repo's tests dir."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import reference  # noqa: PLC0415  (needs the path above)

    return reference


def quiet_diffusers() -> None:
    """diffusers warns on every ``.to(dtype)`` of a model it did not load; the cast is intended here."""
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415

    diffusers_logging.set_verbosity_error()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=7, help="timed ours/diffusers pairs per dtype")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs of each model per dtype")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--markdown-out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--update-doc", type=Path, default=None,
                   help="replace the <!-- bench:transformer_forward --> block of this Markdown file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="also time ours with its blocks compiled (runtime.compile, as generate --compile) "
                        "against diffusers uncompiled: one more row per dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...; on CUDA each timing is synchronized")
    m = p.add_argument_group("model")
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--head-dim", type=int, default=128)
    m.add_argument("--rope-axes", type=int, nargs=3, default=[16, 56, 56], metavar=("T", "Y", "X"))
    m.add_argument("--layers", type=int, default=4, help="dual-stream blocks")
    m.add_argument("--single-layers", type=int, default=8)
    m.add_argument("--refiner-layers", type=int, default=2)
    m.add_argument("--text-embed-dim", type=int, default=512)
    m.add_argument("--pooled-dim", type=int, default=256)
    m.add_argument("--image-proj-dim", type=int, default=256)
    i = p.add_argument_group("inputs")
    i.add_argument("--frames", type=int, default=9, help="noisy latent frames in the window")
    i.add_argument("--latent-size", type=int, nargs=2, default=[16, 16], metavar=("H", "W"))
    i.add_argument("--history-frames", type=int, nargs=3, default=[2, 2, 16], metavar=("N1", "N2", "N4"))
    i.add_argument("--text-len", type=int, default=64, help="text tokens, all valid")
    i.add_argument("--image-tokens", type=int, default=64)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1, --warmup >= 0")
    return args


def model_config(args: argparse.Namespace) -> TransformerConfig:
    return TransformerConfig(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        rope_axes_dim=tuple(args.rope_axes),
        num_layers=args.layers,
        num_single_layers=args.single_layers,
        num_refiner_layers=args.refiner_layers,
        text_embed_dim=args.text_embed_dim,
        pooled_projection_dim=args.pooled_dim,
        image_proj_dim=args.image_proj_dim,
    )


def make_inputs(reference: Any, cfg: TransformerConfig, args: argparse.Namespace) -> dict:
    height, width = args.latent_size
    return reference.random_inputs(
        cfg,
        batch=args.batch,
        frames=args.frames,
        height=height,
        width=width,
        text_len=args.text_len,
        image_tokens=args.image_tokens,
        valid_text=[args.text_len] * args.batch,
        seed=args.seed,
        history_frames=tuple(args.history_frames),
    )


def to_device(inputs: dict, device: torch.device) -> dict:
    """``inputs`` with every tensor (those inside the history levels too) on ``device``."""
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    out = {k: move(v) for k, v in inputs.items()}
    out["history"] = [replace(h, latents=move(h.latents), indices=move(h.indices)) for h in inputs["history"]]
    return out


def token_counts(cfg: TransformerConfig, inputs: dict) -> tuple[int, int]:
    """(image-stream tokens incl. history, conditioning tokens) of one sample."""

    def tokens(shape: Sequence[int], kernel: Sequence[int]) -> int:
        t, h, w = shape[-3:]
        return -(-t // kernel[0]) * -(-h // kernel[1]) * -(-w // kernel[2])

    img = tokens(inputs["latents"].shape, cfg.patch)
    img += sum(tokens(level.latents.shape, level.kernel) for level in inputs["history"])
    image = inputs["image_embeds"]
    cond = inputs["text"].shape[1] + (image.shape[1] if image is not None else 0)
    return img, cond


# ---- measurement ----------------------------------------------------------------------------------


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    """Wall time of one call in ms, and its result; CUDA work is waited for on both sides (kernels
    launch asynchronously, so an unsynchronized timer would measure only the launches)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - start) * 1e3, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def bench_dtype(
    reference: Any, base: FramePackTransformer, inputs: dict, name: str, args: argparse.Namespace,
    compiled: bool = False,
) -> Row:
    """Warm up, then time ``args.repeats`` alternating pairs of ours and diffusers in ``name``
    (``compiled``: ours with its blocks compiled; the warm-up, at least one run, compiles)."""
    dtype = DTYPES[name]
    ours = copy.deepcopy(base).cast(dtype).eval()
    if compiled:
        from framepack.runtime.compile import compile_blocks

        compile_blocks(ours)
    twin = reference.diffusers_twin(ours).to(args.device)  # same config, our weights, cast to ours' dtype
    ours.to(args.device)
    run_ours: Callable[[], torch.Tensor] = lambda: ours(**inputs)  # noqa: E731
    run_theirs: Callable[[], torch.Tensor] = lambda: reference.run_diffusers(twin, inputs)  # noqa: E731
    with torch.inference_mode():
        for _ in range(max(args.warmup, 1 if compiled else 0)):
            run_ours()
            run_theirs()
        ours_ms: list[float] = []
        theirs_ms: list[float] = []
        for i in range(args.repeats):
            if i % 2 == 0:
                t_ours, out_ours = timed(run_ours)
                t_theirs, out_theirs = timed(run_theirs)
            else:
                t_theirs, out_theirs = timed(run_theirs)
                t_ours, out_ours = timed(run_ours)
            ours_ms.append(t_ours)
            theirs_ms.append(t_theirs)
    assert out_ours.shape == out_theirs.shape, (out_ours.shape, out_theirs.shape)
    return Row(
        dtype=name + (", ours compiled" if compiled else ""),
        ours_ms=statistics.median(ours_ms),
        diffusers_ms=statistics.median(theirs_ms),
        pair_ratio=statistics.median(o / t for o, t in zip(ours_ms, theirs_ms)),
        max_rel_err=rel_err(out_ours, out_theirs),
    )


# ---- report ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"


def header(model: FramePackTransformer, inputs: dict, args: argparse.Namespace) -> list[str]:
    import diffusers  # noqa: PLC0415  (optional dependency, only needed when the script runs)

    cfg = model.config
    img, cond = token_counts(cfg, inputs)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return [
        f"## FramePackTransformer vs diffusers HunyuanVideoFramepackTransformer3DModel ({device_name(args.device)} forward)",
        "",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}",
        f"- device: {device_name(args.device)}; CPU: {cpu_model()}",
        f"- model: inner dim {cfg.inner_dim} ({cfg.num_attention_heads} heads x {cfg.attention_head_dim}), "
        f"{cfg.num_layers} dual + {cfg.num_single_layers} single + {cfg.num_refiner_layers} refiner layers, "
        f"text dim {cfg.text_embed_dim}, pooled {cfg.pooled_projection_dim}, "
        f"image proj {cfg.image_proj_dim}; {params:.1f}M parameters",
        f"- inputs: batch {args.batch}, latents {args.frames}x{args.latent_size[0]}x{args.latent_size[1]}, "
        f"history frames 1x/2x/4x {'/'.join(map(str, args.history_frames))}, "
        f"{args.text_len} text tokens (all valid), {args.image_tokens} image tokens "
        f"-> {img} image-stream + {cond} conditioning tokens",
        f"- {args.warmup} warm-up runs each, then {args.repeats} alternating pairs; medians; "
        "goal: ours/diffusers <= 1.0",
        "",
    ]


def table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| dtype | ours (ms) | diffusers (ms) | ratio of medians | median pair ratio | max rel err |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dtype} | {r.ours_ms:.1f} | {r.diffusers_ms:.1f} | {r.ratio_of_medians:.3f} "
            f"| {r.pair_ratio:.3f} | {r.max_rel_err:.2e} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reference = load_reference()
    quiet_diffusers()
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    base = FramePackTransformer(cfg).eval()
    inputs = to_device(make_inputs(reference, cfg, args), torch.device(args.device))
    head = header(base, inputs, args)
    print("\n".join(head), flush=True)
    rows = [bench_dtype(reference, base, inputs, name, args) for name in args.dtypes]
    if args.compile:
        rows += [bench_dtype(reference, base, inputs, name, args, compiled=True) for name in args.dtypes]
    lines = table(rows)
    print("\n".join(lines))
    if args.markdown_out is not None:
        args.markdown_out.write_text("\n".join(head + lines) + "\n")
    if args.update_doc is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from doctable import update_doc

        command = "python benchmarks/transformer_forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
        name = "transformer_forward" + ("" if torch.device(args.device).type == "cpu" else "-cuda")
        update_doc(args.update_doc, name, "\n".join(head + [""] + lines), command.strip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
