"""The web app's memory plans: what a worker applies to a job, and what the page's panel shows.

The policy is ``runtime.choose`` (shared with ``framepack generate``): on a CUDA device a job is
planned for the GPU's free memory less the "GPU memory to preserve" of its submission; on any
other device there is no plan and every component stays resident, as it loaded. This module only
adds what the app needs around it: workers without a known device, and the panel's text, which
names the model as the page does (a model directory's path stays on the server).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..runtime.choose import DEFAULT_PRESERVE_GB, plan_for_run
from ..runtime.plan import format_plan

if TYPE_CHECKING:
    import torch

    from ..runtime.plan import MemoryPlan
    from ..settings import GenerationSettings

log = logging.getLogger(__name__)

NO_PLAN = ("CPU runs keep every component resident (no memory plan); the GPU memory to preserve "
           "applies to CUDA workers only.")
BUSY = "A worker is loading a model now; the memory plan is shown once it has loaded (change a value to refresh)."
# Why a plan is made under the workers' load lock: sizing a model (runtime.sizes) builds its modules under
# accelerate's init_empty_weights, which patches torch.nn.Module for the whole process, so a load in
# another thread would make its parameters on the meta device; and it imports the same lazily
# imported transformers / diffusers classes as a load does, which is not safe from two threads.


def plans_memory(device: torch.device | None) -> bool:
    """Whether jobs on ``device`` are planned (runtime.choose: CUDA only, without an asked budget)."""
    return device is not None and device.type == "cuda"


def job_plan(settings: GenerationSettings, device: torch.device | None,
             preserve_gb: float | None = None) -> MemoryPlan | None:
    """The memory plan a worker on ``device`` applies to a job, or None (the components stay as loaded).

    ``preserve_gb``: the job's "GPU memory to preserve" (None: a job queued without one gets the
    reference's default). A budget no plan fits raises NoPlanError, one line, which fails the job.
    """
    if not plans_memory(device):
        return None
    assert device is not None  # for the type checker: plans_memory said so
    return plan_for_run(settings, device, preserve_gb=DEFAULT_PRESERVE_GB if preserve_gb is None else preserve_gb)


def plan_panel(settings: GenerationSettings, devices: Iterable[torch.device | None], preserve_gb: float,
               model_name: str) -> str:
    """The "Memory plan" panel (Markdown): for each distinct device of the app's workers, the plan a
    job of ``settings`` would get now, or why it gets none. ``model_name`` replaces the model
    argument (a server path for a model directory) wherever the plan's text would name it."""
    parts: list[str] = []
    unplanned = False
    for device in dict.fromkeys(devices):  # two workers on one GPU: one plan
        if not plans_memory(device):
            unplanned = True
            continue
        try:
            plan = job_plan(settings, device, preserve_gb)
        except ValueError as exc:  # NoPlanError, or nothing left after preserving: the job would fail so
            parts.append(f"**{device}**: {exc}")
            continue
        if plan is None:
            parts.append(f"**{device}**: this model cannot be sized offline; its components load on the GPU whole")
        else:
            parts.append(f"**{device}**, planned for its free memory now less {preserve_gb:g} GB preserved:\n\n"
                         + format_plan(plan))
    if unplanned:
        parts.insert(0, NO_PLAN)
    # the plan's title and a NoPlanError name the model by its argument: a directory's path, here
    return "\n\n".join(parts).replace(settings.model, model_name)
