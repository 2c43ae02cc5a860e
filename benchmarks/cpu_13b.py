"""The released 13B transformer, end to end on this CPU machine, as the memory planner decides.

Two steps, both offline:

``make``: random ``hunyuan-13b`` weights written once as float8 shards in the released layout
(``config.json``, ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` and the index), tensor by
tensor (never the whole model in memory): the blocks' Linear weights as float8 e4m3fn with a
per-tensor ``weight_scale`` (our fp8 format, see model/io.py), everything else in bf16; beside it
small random encoders and VAE in the released layouts at the real models' widths (LLaMA hidden
4096, CLIP 768, SigLIP 1152: what the transformer consumes), and a ``framepack.json``. About
13 GB on disk; a few minutes.

``run``: for each budget, ``framepack generate --device cpu --dtype bf16 --memory GB`` in a fresh
process: one section (33 frames) at 64 x 64 px with 2 steps, the plan chosen and applied by the
generate command itself (a CPU run plans one pool of memory: runtime.choose). Measured: the
process's peak resident set (``ru_maxrss``, the kernel's high-water mark, which includes loading),
and its wall time. The encoders are small (their real sizes would add LLaMA's 7.5 GB in fp8);
the transformer is the real 13B size, so the weights streamed per step are the real ones.

    python benchmarks/cpu_13b.py make --dir /var/tmp/framepack-13b-random
    python benchmarks/cpu_13b.py run --dir /var/tmp/framepack-13b-random --update-doc docs/memory.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = Path(tempfile.gettempdir()) / "framepack-13b-random"
BUDGETS_GB = (16, 8)
SHARD_BYTES = 2 << 30  # ~2 GB shards: what make holds in memory at once
COMMAND = "python benchmarks/cpu_13b.py run --update-doc docs/memory.md"
PROMPT = "a red circle moves to the right"


# ---- make -------------------------------------------------------------------------------------------


def _random_tensor(shape: tuple[int, ...], name: str, fp8: bool, gen):
    """One parameter: norms' weights 1 (their init), the rest N(0, 0.02); float8 with its
    per-tensor scale for the blocks' Linear weights, bf16 otherwise."""
    import torch

    from framepack.model.io import quantize_fp8

    if len(shape) == 1 and re.search(r"norm[^.]*\.weight$", name):  # a norm's scale, not a modulation Linear
        return {name: torch.ones(shape, dtype=torch.bfloat16)}
    value = torch.empty(shape).normal_(0.0, 0.02, generator=gen)
    if not fp8:
        return {name: value.to(torch.bfloat16)}
    weight, scale = quantize_fp8(value)
    return {name: weight, name.removesuffix("weight") + "weight_scale": scale}


def make_transformer(directory: Path, preset_name: str = "hunyuan-13b") -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from framepack import FramePackTransformer, preset
    from framepack.model.io import INDEX_NAME, SHARD_PATTERN, fp8_weight_names

    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = FramePackTransformer(preset(preset_name))
    fp8 = fp8_weight_names(model)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # shards of whole tensors up to SHARD_BYTES, in state-dict order (each block in one or two)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * (1 if name in fp8 else 2)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(tqdm(shards, desc="13B fp8 shards", unit="shard"), start=1):
        filename = SHARD_PATTERN.format(suffix=f"-{i:05d}-of-{len(shards):05d}")
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensors.update(_random_tensor(shapes[name], name, name in fp8, gen))
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        for name, tensor in tensors.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
        del tensors
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True) + "\n")
    model.config.save(directory / "config.json")


def make(root: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))  # the layouts' writers, shared with the tests
    from tiny_hub import write_flux_redux, write_hunyuan_video

    from framepack import preset

    cfg = preset("hunyuan-13b")
    if not (root / "transformer" / "config.json").is_file():
        make_transformer(root / "transformer")
    write_hunyuan_video(root / "HunyuanVideo", text_dim=cfg.text_embed_dim, pooled_dim=cfg.pooled_projection_dim)
    write_flux_redux(root / "flux_redux_bfl", image_dim=cfg.image_proj_dim)
    manifest = {"transformer": "transformer", "hunyuan": "HunyuanVideo", "redux": "flux_redux_bfl",
                "mode": "inverted", "resolution": 640}
    (root / "framepack.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"made {root} ({sum(f.stat().st_size for f in root.rglob('*') if f.is_file()) / 2**30:.1f} GiB)")


# ---- run --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    budget_gb: float
    plan: str  # the transformer's placement and storage, as the generate command logged it
    predicted_gb: float | None  # the plan's largest phase total (one pool)
    peak_rss_gb: float
    seconds: float
    ok: bool
    error: str = ""

    def cells(self) -> list[str]:
        predicted = "-" if self.predicted_gb is None else f"{self.predicted_gb:.1f} GB"
        within = "yes" if self.peak_rss_gb <= self.budget_gb else "NO"
        return [f"{self.budget_gb:g} GB", self.plan, predicted, f"{self.peak_rss_gb:.2f} GB", within,
                f"{self.seconds:.0f}", "yes" if self.ok else f"NO: {self.error}"]


# A fresh parent per case: RUSAGE_CHILDREN is the largest resident set among *its* children, so
# each case's number is that generate process's own high-water mark (Linux counts in KiB).
_MEASURE = """
import json, resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True, check=False)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": result.returncode, "stderr": result.stderr, "peak": peak}))
"""


def run_one(root: Path, budget_gb: float, work: Path) -> Row:
    """One generate in a fresh process, its peak RSS and wall time."""
    from PIL import Image

    image = work / "start.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(image)
    out = work / f"budget-{budget_gb:g}.mp4"
    cmd = [sys.executable, "-m", "framepack", "generate", "--model", str(root), "--image", str(image),
           "--prompt", PROMPT, "--seconds", "1", "--steps", "2", "--resolution", "64", "--device", "cpu",
           "--dtype", "bf16", "--memory", f"{budget_gb:g}", "--out", str(out), "--overwrite", "-v"]
    started = time.perf_counter()
    measured = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    result = json.loads(measured.stdout)
    peak = result["peak"]
    log = result["stderr"]
    found = re.search(r"\| transformer \| [^|]+ \| ([^|]+) \| ([^|]+) \|", log)
    plan = f"{found.group(1).strip()}, {found.group(2).strip()}" if found else "-"
    total = re.search(r"largest phase total ([0-9.]+) GB", log)
    error = "" if result["rc"] == 0 else (log.strip().splitlines() or ["?"])[-1][:100]
    return Row(budget_gb, plan, float(total.group(1)) if total else None, peak / 2**30, seconds,
               result["rc"] == 0 and out.is_file(), error)


def table(rows: list[Row]) -> str:
    head = ["budget (--memory)", "transformer plan", "predicted (one pool)", "peak RSS (measured)",
            "within budget?", "seconds", "video made?"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---|---:|---|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + (
        "\n\n`framepack generate --device cpu --dtype bf16 --memory GB`, one section (33 frames, 64 x 64 px, 2 steps) "
        "of random `hunyuan-13b` weights saved as fp8 shards (12.9 B parameters), small encoders at the real "
        "widths; this machine: 2 CPU cores, 24 GB RAM, no GPU. Peak RSS: the generate process's `ru_maxrss` "
        "(loading included). Seconds: the whole command. GB = 2^30 bytes.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("step", choices=["make", "run"])
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the random model (default {DEFAULT_DIR})")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS_GB), help="GB (--memory of each run)")
    p.add_argument("--update-doc", type=Path, default=None, help="write the table into this file's markers")
    args = p.parse_args(argv)
    if args.step == "make":
        make(args.dir)
        return 0
    if not (args.dir / "framepack.json").is_file():
        p.error(f"no model in {args.dir}: run `python benchmarks/cpu_13b.py make --dir {args.dir}` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu-13b-") as work:
        for budget in args.budgets:
            rows.append(run_one(args.dir, budget, Path(work)))
            print(" | ".join(rows[-1].cells()), flush=True)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from doctable import publish

    publish(table(rows), args.update_doc, "cpu-13b", COMMAND)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
