"""GPU check of the memory planner on the 13B transformer: does the planner's choice stay under a
VRAM budget, and how fast is one step?

On a CUDA machine (no network needed): random ``hunyuan-13b`` weights are made on the machine, then
for each VRAM budget (6, 12, 24 GB) and weight storage (bf16, fp8) the planner picks the
transformer's placement (the best plan with that storage that fits; if none fits, the one needing
the least VRAM, marked "no plan"), the placement is applied with ``framepack.runtime.placement``,
``torch.cuda.set_per_process_memory_fraction`` caps the process at the budget, and the transformer
runs one section of the 640 bucket (608 x 640 px, window 9, released history) a few times. Reported:
predicted and measured peak (``torch.cuda.max_memory_allocated``) and seconds per step. An
out-of-memory error is a row of the table, not a crash.

``--smoke`` runs the same code on CPU: the 13B plans applied to the ``tiny`` preset with tiny inputs
(budgets are only planned, never enforced; one forward per case), so that the script itself is
tested without a GPU.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from framepack import FramePackTransformer, preset
from framepack.model.inputs import HistoryInput
from framepack.planning import plan_sections
from framepack.runtime.placement import offload_blocks, store_weights
from framepack.runtime.plan import Budget, Candidate, Choice, GiB, Job, candidates, usable
from framepack.runtime.sizes import hunyuan_sizes

REPO = Path(__file__).resolve().parents[1]
BUDGETS_GB = (6, 12, 24)
STORAGES = ("bf16", "fp8")
COMMAND = "python benchmarks/gpu_13b.py --update-doc docs/memory.md"


@dataclass(frozen=True)
class Row:
    budget_gb: int
    storage: str
    plan: str  # the transformer's placement, or why there was none
    predicted: int  # bytes, the plan's predicted sample-phase peak
    measured: int | None  # bytes; None when not measured (CPU smoke)
    seconds: float | None  # per step; None after an OOM
    error: str = ""

    def cells(self) -> list[str]:
        gb = lambda n: "-" if n is None else f"{n / GiB:.2f} GB"
        # an OOM's measured peak leaves out the allocation that failed: that case did not fit
        under = ("NO (out of memory)" if self.error.startswith("OOM") else "-" if self.measured is None
                 else "yes" if self.measured <= self.budget_gb * GiB else "NO")
        steps = self.error or ("-" if self.seconds is None else f"{self.seconds:.2f}")
        return [f"{self.budget_gb} GB", self.storage, self.plan, gb(self.predicted), gb(self.measured), under, steps]


def random_transformer(name: str, device: torch.device) -> FramePackTransformer:
    """Random weights in bf16, made in place parameter by parameter (no fp32 copy of the model)."""
    with torch.device("meta"):
        model = FramePackTransformer(preset(name))
    model = model.to(torch.bfloat16).to_empty(device=device)  # cast on meta: bf16 storage, no fp32 copy
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.fill_(1.0)  # norms start as the identity, as at init
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def section_inputs(model: FramePackTransformer, height: int, width: int, text: int, image: int,
                   device: torch.device) -> dict:
    """One section's forward inputs at latent size ``height x width``: the first section of the
    released (inverted) schedule with every history level full, LLaMA/SigLIP-shaped conditioning."""
    cfg = model.config
    plan = plan_sections(2)[0]
    r = lambda *shape: torch.randn(*shape, device=device, dtype=torch.bfloat16)
    index = lambda ids: torch.tensor([ids], device=device)
    history = [HistoryInput(level.kernel, r(1, cfg.in_channels, len(level.indices), height, width), index(level.indices))
               for level in plan.levels]
    return {"latents": r(1, cfg.in_channels, len(plan.window_indices), height, width),
            "timestep": torch.full((1,), 900.0, device=device), "text": r(1, text, cfg.text_embed_dim),
            "text_mask": torch.ones(1, text, dtype=torch.bool, device=device),
            "pooled_text": r(1, cfg.pooled_projection_dim),
            "image_embeds": r(1, image, cfg.image_proj_dim) if cfg.has_image_proj else None,
            "latent_indices": index(plan.window_indices), "history": history,
            "guidance": torch.full((1,), 10_000.0, device=device) if cfg.guidance_embeds else None}


def choose(found: list[Candidate], budget: Budget, storage: str) -> tuple[Choice, int, bool]:
    """The transformer's choice in the best candidate with ``storage`` that fits ``budget`` (the
    planner's own order), else in the one needing the least VRAM; its predicted sample peak; fits?"""
    mine = [c for c in found if dict(c.choices)["transformer"].storage == storage]
    fitting = [c for c in mine if c.vram <= usable(budget.vram) and c.ram <= usable(budget.ram)]
    best = fitting[0] if fitting else min(mine, key=lambda c: c.vram)
    sample = next(p.vram for p in best.phases if p.phase == "sample")
    return dict(best.choices)["transformer"], sample, bool(fitting)


def place(master: FramePackTransformer, choice: Choice, device: torch.device, scratch: Path) -> FramePackTransformer:
    """A fresh copy of ``master`` stored and placed as ``choice`` says (quantized on the device: fast).
    Disk offload writes under ``scratch``, which the caller empties after the case."""
    model = copy.deepcopy(master).to(device)
    store_weights(model, choice.storage)
    if choice.placement in ("offload", "disk"):
        model.to("cpu")
        offload_blocks(model, device, "disk" if choice.placement == "disk" else "cpu", scratch,
                       prefetch=device.type == "cuda")
    return model


def run_case(master, found, inputs, budget_gb: int, storage: str, steps: int, device: torch.device,
             scratch: Path) -> Row:
    cuda = device.type == "cuda"
    budget = Budget(budget_gb * GiB, psutil.virtual_memory().total)
    choice, predicted, fits = choose(found, budget, storage)
    summary = f"{choice.placement} {choice.storage}" + ("" if fits else " (no plan fits)")
    model = None
    try:
        model = place(master, choice, device, scratch)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.set_per_process_memory_fraction(budget.vram / torch.cuda.get_device_properties(device).total_memory)
        with torch.inference_mode():
            model(**inputs)  # warm-up: kernels, the offload hooks' first transfers
            times = []
            for _ in range(steps - 1):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(**inputs)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        measured = torch.cuda.max_memory_allocated() if cuda else None
        return Row(budget_gb, storage, summary, predicted, measured, min(times) if times else None)
    except torch.OutOfMemoryError as e:
        measured = torch.cuda.max_memory_allocated() if cuda else None
        return Row(budget_gb, storage, summary, predicted, measured, None, "OOM: " + str(e).split(".")[0][:60])
    except Exception as e:  # noqa: BLE001  (one failed case must not lose the others' rows on a short GPU lease)
        return Row(budget_gb, storage, summary, predicted, None, None, f"error: {type(e).__name__}: {str(e)[:80]}")
    finally:
        del model
        gc.collect()
        for folder in scratch.iterdir():  # a disk-offloaded 13B is 13-26 GB: the GPU machine has 64 GB of disk
            shutil.rmtree(folder, ignore_errors=True)
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


def table(rows: list[Row], device: str) -> str:
    head = ["VRAM budget", "storage", "transformer plan", "predicted peak", "measured peak", "under budget?",
            "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---:|---:|---|---:|"]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + (f"\n\nDevice: {device}. Predicted: the plan's sample-phase peak (whole pipeline as "
                                "planned; only the transformer runs here). Measured: `torch.cuda.max_memory_allocated` "
                                "under `set_per_process_memory_fraction(budget)`. s/step: fastest timed forward. "
                                "GB = 2^30 bytes.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, tiny inputs, budgets not enforced")
    p.add_argument("--steps", type=int, default=3, help="forwards per case (the first is a warm-up)")
    p.add_argument("--time-limit", type=float, default=420.0, help="seconds; no new case starts after 85%% of it")
    p.add_argument("--update-doc", type=Path, default=None, help="write the table into this file's markers")
    args = p.parse_args(argv)
    started = time.monotonic()
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU machine, or use --smoke")
    device = torch.device("cpu" if args.smoke else "cuda")
    name = "tiny" if args.smoke else "hunyuan-13b"
    steps = 1 if args.smoke else max(args.steps, 2)
    # always the 13B plan: the smoke run then applies the same placements (offload too) to the tiny model
    found = candidates(hunyuan_sizes("hunyuan-13b", preset("hunyuan-13b")), Job(resolution=640))
    master = random_transformer(name, device).to("cpu")  # made on the device, kept on the host
    height, width, text, image = (8, 8, 8, 8) if args.smoke else (608 // 8, 640 // 8, 256, 729)
    inputs = section_inputs(master, height, width, text, image, device)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-13b-") as scratch:
        for budget_gb in BUDGETS_GB:
            for storage in STORAGES:
                if time.monotonic() - started > 0.85 * args.time_limit:
                    print(f"time limit: skipped {budget_gb} GB {storage} and later cases")
                    break
                rows.append(run_case(master, found, inputs, budget_gb, storage, steps, device, Path(scratch)))
                print(" | ".join(rows[-1].cells()), flush=True)
    described = "CPU smoke run: the 13B plans applied to the tiny preset (not a GPU measurement)" if args.smoke else torch.cuda.get_device_name()
    report = table(rows, described)
    print(report)
    if args.update_doc:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from doctable import update_doc

        update_doc(args.update_doc, "gpu-13b", report, COMMAND)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
