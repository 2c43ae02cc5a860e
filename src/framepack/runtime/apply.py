"""Apply a :class:`~framepack.runtime.plan.MemoryPlan` to a loaded pipeline, from outside it.

The planner decides (``runtime/plan.py``), ``runtime/placement.py`` has the mechanisms; this file
maps one onto the other for the components of a :class:`~framepack.pipeline.FramePackPipeline`
(``pipeline.c``), which it expects loaded on the host (CPU):

* storage: ``fp8`` / ``int8`` -> ``placement.store_weights`` on that component's modules (after any
  dtype cast, which would undo it); ``bf16`` means "as loaded" (the ``--dtype`` asked for);
* ``resident``: moved to the device now;
* ``phase`` (the encoders, the VAE): left on the host; the encoder object in ``pipeline.c`` is
  replaced by a thin wrapper whose ``encode`` / ``decode`` runs under ``placement.used_once``;
  a ``phase`` transformer moves to the device at its first forward (a pre-hook) and back to the
  host when another component is about to run on the device;
* ``offload`` / ``disk``: ``placement.offload_blocks`` (prefetch on a side stream on CUDA), for the
  transformer and LLaMA (the components with blocks); disk folders are remembered by the returned :class:`Placement` and removed by its ``close()``;
* the VAE's ``tile``: diffusers' tiling of HunyuanVideo's VAE at that tile size.

What ran where: every path above ran on CPU (device ``cpu``, where moving is a no-op) in
tests/test_apply_plan.py, with outputs equal to the unplaced pipeline's. Nothing here has run on
a GPU yet: the device moves, prefetch streams and the predicted peaks are unverified on CUDA.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .placement import offload_blocks, store_weights, used_once
from .plan import Choice, MemoryPlan

log = logging.getLogger(__name__)

# Component names as runtime.sizes measures them (the names a MemoryPlan carries)
TRANSFORMER = "transformer"
LLAMA = "text encoder (LLaMA)"
CLIP = "text encoder 2 (CLIP)"
SIGLIP = "image encoder (SigLIP)"
VAE = "VAE"
BLOCK_OFFLOADED = (TRANSFORMER, LLAMA)  # the components with blocks (runtime.sizes), which diffusers groups
TILE_OVERLAP = 4  # tiles step by 3/4 of their size, as diffusers' defaults do (256 px tiles, 192 px stride)


@dataclass
class Placement:
    """What :func:`apply_plan` did that needs undoing: disk offload folders and replaced encoders."""

    folders: list[Path] = field(default_factory=list)
    restore: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Remove the disk offload folders; put the original encoder objects back."""
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)
        self.folders.clear()

    def __enter__(self) -> Placement:  # noqa: PYI034  (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _OnDevice:
    """An encoder or VAE object whose modules are on the device only during ``encode`` / ``decode``.

    Every other attribute is the wrapped object's (``preview_map``, ``dropped_tokens``, ...).
    """

    def __init__(self, inner: Any, modules: list[nn.Module], device: torch.device,
                 before: Callable[[], None]) -> None:
        self._inner, self._modules, self._device, self._before = inner, modules, device, before

    @contextmanager
    def _there(self) -> Iterator[None]:
        self._before()  # e.g. a phase transformer leaves the device first
        with ExitStack() as stack:
            for module in self._modules:
                stack.enter_context(used_once(module, self._device))
            yield

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        with self._there():
            return self._inner.encode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        with self._there():
            return self._inner.decode(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _module_dtype(module: nn.Module) -> torch.dtype:
    """The compute dtype of a loaded module: its first floating parameter's (bf16 if stored float8)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return torch.bfloat16 if dtype.itemsize < 2 else dtype


def _store(module: nn.Module, choice: Choice) -> None:
    if choice.storage != "bf16":  # bf16 = the dtype it was loaded in
        store_weights(module, choice.storage, _module_dtype(module))


def _vae_module(vae: Any) -> nn.Module:
    return vae if isinstance(vae, nn.Module) else vae.vae  # our small VAE, or HunyuanVAE's diffusers model


def _tile(vae: Any, tile: int) -> None:
    module = _vae_module(vae)
    if not hasattr(module, "enable_tiling"):
        raise ValueError(f"the plan decodes in {tile} px tiles, but this VAE ({type(module).__name__}) cannot tile")
    stride = tile * (TILE_OVERLAP - 1) // TILE_OVERLAP
    module.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                         tile_sample_stride_height=stride, tile_sample_stride_width=stride)


def _component_modules(c: Any) -> dict[str, list[nn.Module]]:
    """The modules behind each planned component name, for the components this pipeline has."""
    found: dict[str, list[nn.Module]] = {TRANSFORMER: [c.transformer], VAE: [_vae_module(c.vae)]}
    if hasattr(c.text, "llama"):
        found[LLAMA], found[CLIP] = [c.text.llama], [c.text.clip]
    if c.image is not None and hasattr(c.image, "model"):
        found[SIGLIP] = [c.image.model]
    return found


def load_options(plan: MemoryPlan | None) -> dict[str, Any]:
    """``load_components`` keywords for a run under ``plan`` (loaded on the host, then placed):
    the transformer's block weights read straight into fp8 when the plan stores it in fp8 (no
    full-precision copy on the way), and left unread in the file's pages when the plan also
    streams it from disk (``mapped``: the offload copies them group by group)."""
    choice = None if plan is None else plan.component(TRANSFORMER).choice
    if choice is None or choice.storage != "fp8":
        return {"storage_dtype": None, "mapped": False}
    return {"storage_dtype": torch.float8_e4m3fn, "mapped": choice.placement == "disk"}


def apply_plan(pipeline: Any, plan: MemoryPlan, device: str | torch.device,
               offload_dir: str | Path | None = None) -> Placement:
    """Place ``pipeline.c``'s components as ``plan`` says; returns what to ``close()`` after the run.

    The components must be loaded on the host (CPU). ``offload_dir``: where disk offload writes
    (default: the system's temporary directory). A planned component this pipeline lacks, or a
    component the plan does not name, is a one-line ``ValueError``.
    """
    import tempfile

    device = torch.device(device)
    c = pipeline.c
    modules = _component_modules(c)
    planned = {p.name: p.choice for p in plan.components}
    if set(planned) != set(modules):
        raise ValueError(f"the memory plan names {sorted(planned)}, but this pipeline has {sorted(modules)}")
    placement = Placement()

    try:
        for name, choice in planned.items():  # storage first: on the host, after the load's dtype cast
            for module in modules[name]:
                _store(module, choice)

        def offload(module: nn.Module, choice: Choice) -> None:
            """Block offload (diffusers' hooks) of a component with blocks (the planner offers it
            only to those: the transformer and LLaMA, whose ``layers`` diffusers groups)."""
            folder = offload_blocks(module, device, "disk" if choice.placement == "disk" else "cpu",
                                    path=offload_dir or tempfile.gettempdir(), prefetch=device.type == "cuda")
            if folder is not None:
                placement.folders.append(folder)

        transformer, t_choice = c.transformer, planned[TRANSFORMER]
        if t_choice.placement == "resident":
            transformer.to(device)
        elif t_choice.placement == "phase":
            def onto_device(module: nn.Module, args: object) -> None:
                if module.device != device:
                    module.to(device)

            transformer.register_forward_pre_hook(onto_device)
        else:
            offload(transformer, t_choice)

        def transformer_off() -> None:
            if t_choice.placement == "phase" and transformer.device != torch.device("cpu"):
                transformer.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()

        def wrap(attribute: str, names: list[str]) -> None:
            """Resident modules go to the device now, block-offloaded ones get their hooks; the
            modules used in phases are wrapped to visit the device per call."""
            visiting = [m for n in names for m in modules[n] if planned[n].placement == "phase"]
            for n in names:
                if planned[n].placement == "resident":
                    for m in modules[n]:
                        m.to(device)
                elif planned[n].placement in ("offload", "disk"):
                    if n not in BLOCK_OFFLOADED:
                        raise ValueError(f"the plan offloads the {n} block by block; framepack does that for "
                                         f"{' and '.join(BLOCK_OFFLOADED)} only")
                    for m in modules[n]:
                        offload(m, planned[n])
            original = getattr(c, attribute)
            setattr(c, attribute, _OnDevice(original, visiting, device, transformer_off))
            placement.restore.append(lambda: setattr(c, attribute, original))

        wrap("text", [n for n in (LLAMA, CLIP) if n in modules])
        if SIGLIP in modules:
            wrap("image", [SIGLIP])
        wrap("vae", [VAE])
        if planned[VAE].tile is not None:
            _tile(c.vae, planned[VAE].tile)
        log.info("memory plan applied on %s: %s", device,
                 ", ".join(f"{n} {ch.placement}/{ch.storage}" + (f"/tiles {ch.tile}" if ch.tile else "")
                           for n, ch in planned.items()))
    except BaseException:  # half placed: no disk folder left behind, encoders back
        placement.close()
        raise
    return placement
