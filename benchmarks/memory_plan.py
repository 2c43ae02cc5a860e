"""The memory planner's choices for the 13B model at 6-80 GB of VRAM, as Markdown tables.

    .venv/bin/python benchmarks/memory_plan.py                     # print the tables
    .venv/bin/python benchmarks/memory_plan.py --write docs/memory.md  # and put them in the doc

Offline and pure: component sizes come from the configs on the meta device; every number is the
planner's prediction, nothing runs on a GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from doctable import update_doc  # noqa: E402

from framepack.runtime.plan import NoPlanError, Budget, Job, MemoryPlan, candidates, gb, plan_memory  # noqa: E402
from framepack.runtime.sizes import model_sizes  # noqa: E402

VRAM_BUDGETS = (6, 8, 12, 16, 24, 48, 80)
RAM_BUDGETS = (16, 32, 64)
SHORT = {"resident": "resident", "phase": "while running", "offload": "offload RAM", "disk": "offload disk"}


def describe(plan: MemoryPlan, name: str) -> str:
    choice = plan.component(name).choice
    return f"{SHORT[choice.placement]}, {choice.storage}"


def small_encoders(plan: MemoryPlan) -> str:
    kinds = {SHORT[c.choice.placement] for c in plan.components if "CLIP" in c.name or "SigLIP" in c.name}
    return " / ".join(sorted(kinds))


def table(model: str, ram: float, resolution: int, window: int) -> str:
    sizes = model_sizes(model)
    job = Job(resolution, window, 1 if sizes.cfg == 1 else 2)
    found = candidates(sizes, job)
    rows = ["| VRAM | transformer | LLaMA | CLIP, SigLIP | VAE | peak VRAM encode / sample / decode | peak RAM |",
            "|---:|---|---|---|---|---|---:|"]
    for vram in VRAM_BUDGETS:
        try:
            plan = plan_memory(sizes, job, Budget.gb(vram, ram), found)
        except NoPlanError as exc:
            rows.append(f"| {vram} GB | no plan: {exc.smallest.vram / 2**30:.1f} GB VRAM needed | | | | | |")
            continue
        vae = plan.component("VAE").choice
        tiles = f"tiles {vae.tile} px" if vae.tile else "whole frames"
        peaks = " / ".join(gb(p.vram) for p in plan.phases)
        rows.append(f"| {vram} GB | {describe(plan, 'transformer')} | {describe(plan, 'text encoder (LLaMA)')} | "
                    f"{small_encoders(plan)} | {SHORT[vae.placement]}, {tiles} | {peaks} | {gb(plan.peak_ram)} |")
    return f"With {ram:g} GB of RAM ({model}, {job.resolution} bucket, window {job.window}, batch {job.batch}):\n\n" + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="framepack-i2v")
    p.add_argument("--resolution", type=int, default=640)
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--write", type=Path, help="put the tables between the bench:memory-plan markers of this file")
    args = p.parse_args()
    body = "\n\n".join(table(args.model, ram, args.resolution, args.window) for ram in RAM_BUDGETS)
    print(body)
    if args.write:
        update_doc(args.write, "memory-plan", body, "python benchmarks/memory_plan.py --write docs/memory.md")


if __name__ == "__main__":
    main()
