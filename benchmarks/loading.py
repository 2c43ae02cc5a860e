"""Peak host memory while loading ``FramePackTransformer`` checkpoints (CPU only).

What it measures: a mid-size FramePack transformer (the 13B model's layer shapes with fewer
heads and blocks; a few hundred MB of weights) is saved with random weights into a temporary
directory, in the forms people load: bf16 shards written by our ``save_pretrained``, one bf16
file, and one float8_e4m3fn file with per-tensor ``scale_weight`` scalars as ComfyUI / kijai's
"scaled" files ship them (the blocks' linear weights in float8, the rest in bf16, plus ComfyUI's
``scaled_fp8`` marker). Each load then runs in a fresh Python process, which reports

- its RSS after ``import torch; import framepack`` (the baseline, before anything is read),
- its peak RSS (``ru_maxrss``) once ``FramePackTransformer.from_pretrained`` has returned,
- the bytes of the loaded model's parameters and buffers (what stays resident).

``ratio`` = (peak - baseline) / resident bytes; goal: <= 1.2 in every row of our loader. The last
row is framepack's loader before lazy loading, for comparison (kept here, not in the package): it
kept each whole file mapped while copying its tensors out, so the file's pages added to the peak.

Everything runs on the CPU; on a CUDA device the same loader writes each tensor straight to the
GPU (or pinned host memory), which this script does not measure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from framepack import FramePackTransformer, TransformerConfig
from framepack.model.io import FP8, FP8_MAX, fp8_weight_names

REPO = Path(__file__).resolve().parents[1]
DTYPES: dict[str, torch.dtype | None] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8}
MiB = 1 << 20


@dataclass(frozen=True)
class Case:
    checkpoint: str  # key of make_checkpoints' result
    dtype: str  # compute dtype asked for
    storage: str | None = None  # "fp8": float8 storage of the blocks' weights
    eager: bool = False  # the whole-state-dict reference, not our loader

    @property
    def label(self) -> str:
        if self.eager:
            return f"{self.dtype}, previous loader (reference)"
        return "fp8 storage, bf16 compute" if self.storage == "fp8" else self.dtype


CASES = (
    Case("bf16 shards", "fp32"),
    Case("bf16 shards", "bf16"),
    Case("bf16 shards", "bf16", storage="fp8"),
    Case("bf16 file", "bf16"),
    Case("fp8 scaled file", "bf16", storage="fp8"),
    Case("fp8 scaled file", "bf16"),
    Case("bf16 file", "bf16", eager=True),
)


@dataclass(frozen=True)
class Measurement:
    baseline: int  # RSS after the imports, bytes
    peak: int  # peak RSS of the process, bytes
    resident: int  # bytes of the loaded model's tensors
    seconds: float

    @property
    def increase(self) -> int:
        return self.peak - self.baseline

    @property
    def ratio(self) -> float:
        return self.increase / self.resident


# ---- the checkpoints ------------------------------------------------------------------------------


def mid_config(heads: int = 8, layers: int = 2, single_layers: int = 2) -> TransformerConfig:
    """The 13B preset's shapes (head dim 128, text dim 4096, ...) with fewer heads and blocks."""
    return TransformerConfig(num_attention_heads=heads, num_layers=layers, num_single_layers=single_layers,
                             num_refiner_layers=1)


def random_model(cfg: TransformerConfig, seed: int = 0) -> FramePackTransformer:
    """Random bf16 weights, made without an fp32 copy (uniform: cheaper than normal, same memory)."""
    with torch.device("meta"):
        model = FramePackTransformer(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.uniform_(-0.05, 0.05, generator=generator)
    return model.eval()


def scaled_fp8_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model as a ComfyUI / kijai "scaled" float8 file: the blocks' linear weights quantized
    per tensor with a float32 ``<module>.scale_weight``, everything else kept, a ``scaled_fp8`` marker."""
    state: dict[str, torch.Tensor] = {}
    quantized = fp8_weight_names(model)
    for name, tensor in model.state_dict().items():
        if name in quantized:
            scale = tensor.float().abs().max().clamp(min=1e-12) / FP8_MAX
            state[name] = (tensor.float() / scale).to(FP8)
            state[name.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            state[name] = tensor.contiguous()
    state["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    return state


def make_checkpoints(directory: Path, cfg: TransformerConfig, seed: int = 0) -> dict[str, Path]:
    from safetensors.torch import save_file

    model = random_model(cfg, seed)
    size = sum(t.nbytes for t in model.state_dict().values())
    paths = {"bf16 shards": directory / "bf16-shards", "bf16 file": directory / "bf16-file",
             "fp8 scaled file": directory / "fp8" / "framepack_fp8_e4m3fn_scaled.safetensors"}
    model.save_pretrained(paths["bf16 shards"], max_shard_size=size // 3 + 1)  # three shards
    model.save_pretrained(paths["bf16 file"])
    paths["fp8 scaled file"].parent.mkdir(parents=True)
    cfg.save(paths["fp8 scaled file"].parent / "config.json")
    save_file(scaled_fp8_state(model), str(paths["fp8 scaled file"]))
    return paths


# ---- one load, in a fresh process -----------------------------------------------------------------


def current_rss() -> int:
    import psutil  # a dependency of accelerate ([models])

    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    """This process's peak RSS in bytes.

    Linux: VmHWM. Not ``ru_maxrss``, which a process inherits from its parent across fork and exec
    (the benchmark's parent holds a model, so every child would report the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def eager_load(source: Path, dtype: torch.dtype) -> FramePackTransformer:
    """framepack's loader before lazy loading: each file open through safe_open (one mapping of the
    whole file) while its tensors are copied out into a state dict, then ``load_state_dict``."""
    from safetensors import safe_open

    from framepack.model.io import weight_files

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(dtype=dtype, copy=True)
    with torch.device("meta"):
        model = FramePackTransformer(TransformerConfig.from_file(source / "config.json"))
    model.load_state_dict(state, strict=True, assign=True)
    return model


def child(source: Path, case: Case) -> Measurement:
    baseline = current_rss()
    start = time.perf_counter()
    if case.eager:
        model = eager_load(source, DTYPES[case.dtype])
    else:
        model = FramePackTransformer.from_pretrained(
            source, dtype=DTYPES[case.dtype], storage_dtype=DTYPES[case.storage] if case.storage else None
        )
    seconds = time.perf_counter() - start
    resident = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    return Measurement(baseline, peak_rss(), resident, seconds)


def measure(source: Path, case: Case) -> Measurement:
    """Run one load in a fresh interpreter (peak RSS is per process)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(source), json.dumps(vars(case))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load of {source} ({case.label}) failed: {done.stderr.strip()[-2000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def baseline_only() -> int:
    """RSS of a process that has only imported torch and framepack."""
    code = "import torch, framepack, psutil; print(psutil.Process().memory_info().rss)"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


# ---- report ---------------------------------------------------------------------------------------


def report(cfg: TransformerConfig, rows: Sequence[tuple[Case, Measurement]], baseline: int) -> str:
    with torch.device("meta"):
        params = sum(p.numel() for p in FramePackTransformer(cfg).parameters())
    lines = [
        "## Peak host memory while loading (CPU only)",
        "",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}",
        f"- model: {params / 1e6:.1f}M parameters (inner dim {cfg.inner_dim}, {cfg.num_layers} dual + "
        f"{cfg.num_single_layers} single + {cfg.num_refiner_layers} refiner blocks, text dim {cfg.text_embed_dim}), "
        "random weights",
        f"- RSS after `import torch; import framepack`: {baseline / MiB:.0f} MiB; each load runs in a fresh process",
        "- ratio = (peak RSS - RSS before loading) / bytes that stay resident; goal <= 1.2",
        "- load times are from the page cache (the files were just written), on a shared machine",
        "",
        "| checkpoint | loaded as | resident (MiB) | peak RSS increase (MiB) | ratio | load (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case, m in rows:
        lines.append(f"| {case.checkpoint} | {case.label} | {m.resident / MiB:.0f} | {m.increase / MiB:.0f} "
                     f"| {m.ratio:.2f} | {m.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heads", type=int, default=8, help="attention heads (x 128 = inner dim)")
    p.add_argument("--layers", type=int, default=2, help="dual-stream blocks")
    p.add_argument("--single-layers", type=int, default=2)
    p.add_argument("--update-doc", type=Path, default=None,
                   help="replace the <!-- bench:loading --> block of this Markdown file with the report")
    p.add_argument("--child", nargs=2, metavar=("SOURCE", "CASE"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        m = child(Path(args.child[0]), Case(**json.loads(args.child[1])))
        print(json.dumps(vars(m)))
        return 0
    cfg = mid_config(args.heads, args.layers, args.single_layers)
    with tempfile.TemporaryDirectory(prefix="framepack-loading-") as tmp:
        paths = make_checkpoints(Path(tmp), cfg)
        rows = [(case, measure(paths[case.checkpoint], case)) for case in CASES]
    body = report(cfg, rows, baseline_only())
    print(body)
    if args.update_doc is not None:
        sys.path.insert(0, str(Path(__file__).parent))
        from doctable import update_doc

        command = "python benchmarks/loading.py" + (f" --update-doc {args.update_doc}")
        update_doc(args.update_doc, "loading", body, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
