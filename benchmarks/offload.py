"""Block offload (diffusers group offloading) vs the resident model, on CPU: outputs and seconds.

The demo transformer (``--model tiny``) on fixed inputs (benchmarks/precision.py's section at
128 px), resident and with ``offload_blocks`` to CPU memory and to disk, 1 and 2 blocks per group,
in fp32 and with fp8 storage. Per row: the largest absolute difference from the resident model of
the same storage (must be 0: moving bytes does not change them) and the median seconds per forward.

On CPU the onload device is the CPU itself, so "offload to CPU" moves nothing and measures the
hooks' overhead; "offload to disk" reads every group's safetensors file on each forward. CUDA
streams (``prefetch=True``) cannot run here and are not measured.

Run: ``python benchmarks/offload.py [--update-doc docs/precision-and-offload.md]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from precision import forward_inputs  # noqa: E402

from framepack.components import asset  # noqa: E402
from framepack.model.transformer import FramePackTransformer  # noqa: E402
from framepack.runtime.placement import offload_blocks, store_weights  # noqa: E402


def timed_forwards(model: nn.Module, inputs: tuple, repeats: int) -> tuple[torch.Tensor, str]:
    """(output of the first call, "median wall / median CPU seconds per call"); every call's
    output must be the same. CPU seconds (all threads of this process) hold up better than wall
    time on a machine shared with other work."""
    outputs, wall, cpu = [], [], []
    with torch.no_grad():
        outputs.append(model(*inputs).float())  # untimed: the first call pays one-time costs (and writes the files)
        for _ in range(repeats):
            began, began_cpu = time.perf_counter(), time.process_time()
            outputs.append(model(*inputs).float())
            wall.append(time.perf_counter() - began)
            cpu.append(time.process_time() - began_cpu)
    assert all(torch.equal(o, outputs[0]) for o in outputs), "a forward changed between calls"
    return outputs[0], f"{statistics.median(wall):.3f} / {statistics.median(cpu):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="forwards per row (default 5; the median is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared machine more threads make timings erratic)")
    parser.add_argument("--update-doc", type=Path, help="write the table between this doc's bench:offload markers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fp32 = FramePackTransformer.from_pretrained(asset("tiny", "transformer")).eval()
    inputs = forward_inputs()
    lines = ["| storage | placement | blocks per group | files on disk | max abs diff vs resident | s / forward (wall / CPU) |",
             "|---|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as disk:
        for storage in ("fp32", "fp8"):
            base = store_weights(copy.deepcopy(fp32), storage, torch.float32)
            resident, seconds = timed_forwards(base, inputs, args.repeats)
            lines.append(f"| {storage} | resident | - | - | - | {seconds} |")
            for target in ("cpu", "disk"):
                for per_group in (1, 2):
                    model = copy.deepcopy(base)
                    directory = offload_blocks(model, "cpu", target, disk, blocks_per_group=per_group)
                    out, seconds = timed_forwards(model, inputs, args.repeats)
                    files = "-" if directory is None else str(len(list(directory.glob("*.safetensors"))))
                    diff = float((out - resident).abs().max())
                    lines.append(f"| {storage} | offload to {target} | {per_group} | {files} | {diff:.1e} | {seconds} |")
                    print(lines[-1], flush=True)
    cfg = fp32.config
    lines += ["", f"The demo transformer: {cfg.num_layers} dual-stream + {cfg.num_single_layers} single-stream blocks "
              "(each group of blocks one file, plus one for the embedders and the output head); one section's "
              f"inputs at 128 px, median of {args.repeats} forwards, torch threads: {args.threads}, onload device CPU; "
              f"load average {os.getloadavg()[0]:.1f} at the end (a shared machine: times are rough). "
              "CPU only: CUDA streams and prefetch were not exercised."]
    from doctable import publish

    publish("\n".join(lines), args.update_doc, "offload", "python benchmarks/offload.py")


if __name__ == "__main__":
    main()
