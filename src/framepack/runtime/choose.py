"""The memory plan of one run: a budget from the device (or the user), then the planner.

``runtime/plan.py`` plans for a budget; this file decides the budget of a run, the one piece of
policy shared by ``framepack generate --memory`` and the web app's "GPU memory to preserve":

* CUDA: the budget is the GPU's free memory (``torch.cuda.mem_get_info``) less what the user
  asks to preserve, or the number of GB asked; host memory is what psutil reports available.
* any other device (CPU, Apple's unified memory): weights, activations and the runtime share one
  pool, the host's. A plan is made only when a budget is asked (``--memory GB``); then every
  phase's device and host peaks together must fit it (:class:`~framepack.runtime.plan.Budget`
  ``unified``). Without one the components stay resident, as they load (the demo's fast path).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .plan import Budget, GiB, Job, MemoryPlan, plan_memory

if TYPE_CHECKING:
    import torch

    from ..settings import GenerationSettings

log = logging.getLogger(__name__)

DEFAULT_PRESERVE_GB = 6.0  # the reference's default "GPU memory to preserve"


def run_budget(device: torch.device, memory_gb: float | None = None, preserve_gb: float = 0.0) -> Budget | None:
    """The budget of a run on ``device``, or None (no plan: everything resident).

    ``memory_gb``: the device memory the run may use, as asked (None: CUDA's free memory less
    ``preserve_gb``; elsewhere no plan). A ValueError (one line) when nothing is left to plan with.
    """
    import psutil

    if preserve_gb < 0:
        raise ValueError(f"GPU memory to preserve must be >= 0 GB, got {preserve_gb:g}")
    if device.type != "cuda":
        return None if memory_gb is None else Budget.shared(memory_gb)
    ram = psutil.virtual_memory().available
    if memory_gb is None:
        import torch

        free = torch.cuda.mem_get_info(device)[0]
        memory = free - int(preserve_gb * GiB)
        if memory <= 0:
            raise ValueError(f"{device} has {free / GiB:.1f} GB free; preserving {preserve_gb:g} GB leaves nothing "
                             "to run in")
        return Budget(memory, ram)
    return Budget(int(memory_gb * GiB), ram)


def generation_plan(settings: GenerationSettings, budget: Budget) -> MemoryPlan:
    """The memory plan of a generation's model and geometry for ``budget``; raises NoPlanError
    (a ValueError: one line) naming the smallest budget that works, or ValueError for a model
    that cannot be sized offline."""
    from ..components import resolve_model
    from .sizes import model_sizes

    source = resolve_model(settings.model)
    sizes = model_sizes(settings.model)
    batch = 1 if source.cfg(settings.cfg) == 1 else 2
    job = Job(resolution=source.resolution(settings.resolution), window=settings.window, batch=batch)
    return plan_memory(sizes, job, budget)


def plan_for_run(settings: GenerationSettings, device: torch.device, memory_gb: float | None = None,
                 preserve_gb: float = 0.0) -> MemoryPlan | None:
    """The plan a run on ``device`` applies, or None where it runs without one (see the module
    docstring). A budget no plan fits raises NoPlanError; so does a model that cannot be sized
    offline when a budget was asked (without one, that run just goes unplanned, logged)."""
    budget = run_budget(device, memory_gb, preserve_gb)
    if budget is None:
        return None
    from .plan import NoPlanError

    try:
        return generation_plan(settings, budget)
    except NoPlanError:
        raise
    except ValueError as exc:
        if memory_gb is not None:
            raise
        log.info("no memory plan: %s", exc)
        return None
