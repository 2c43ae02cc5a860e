"""Step caching: skip the transformer's blocks on denoising steps where their output barely changes.

A section's sampler calls the model once per step. Caches decide, step by step, whether to run all
blocks or to reuse what they did last time. One cache lives for one section (one sampler call):
:func:`section_cache` makes it and tears it down, so nothing carries over from one section to the
next, and the model itself keeps no state.

Methods (``--cache METHOD[:VALUE]``):

* ``teacache[:T]`` -- TeaCache (Liu et al. 2024, "Timestep Embedding Tells: It's Time to Cache for
  Video Diffusion Model") as the FramePack reference applies it: the relative L1 change of the
  first dual-stream block's modulated input, rescaled by the polynomial fitted for HunyuanVideo,
  is accumulated; the blocks run when the sum reaches T (then it restarts from 0), else the image
  stream gets the residual the blocks added last time. The first and last step always run. Our own
  implementation (:class:`TeaCache`).
* ``magcache[:T]`` -- MagCache (Ma et al. 2025, "Magnitude-aware Cache"): skips while the
  accumulated error ``sum |1 - prod(ratio)|`` of the per-step residual magnitude ratios stays
  under T. The ratios are the model's own, measured by ``framepack calibrate-cache``
  (:func:`calibrate_magcache`) and kept in its manifest. Applied with diffusers' hook.
* ``fbcache[:T]`` -- First Block Cache: the first block always runs; the rest are skipped while its
  residual changed by less than T (relative mean absolute difference). diffusers' hook.
* ``taylorseer[:N]`` -- TaylorSeer (Liu et al. 2025): the attention layers run every N-th step
  (after 3 warm-up steps); in between, their outputs are extrapolated by a first-order Taylor
  series. diffusers' hook. The MLPs still run on every step.
* ``model`` -- the model's own recommendation (its manifest's ``cache``; for the released 13B models
  the reference's ``teacache:0.15``, not measured here).

diffusers' hooks learn where a block takes and returns its streams from ``TransformerBlockRegistry``;
our two block classes are registered there (:func:`register_blocks`) rather than the hooks rewritten.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI parses --cache without it
    import torch
    from torch import nn

log = logging.getLogger(__name__)

NONE = "none"
MODEL = "model"  # the model's own default, resolved when the model is known
# method -> (default value, what the value is); the defaults are those the methods' authors use
METHODS: dict[str, tuple[float | None, str]] = {
    NONE: (None, ""),
    "teacache": (0.15, "threshold"),  # FramePack's reference demo
    "magcache": (0.1, "threshold"),  # the threshold of MagCache's FramePack demo
    "fbcache": (0.05, "threshold"),  # diffusers' FirstBlockCacheConfig default
    "taylorseer": (5, "interval"),  # diffusers' TaylorSeerCacheConfig default
}
# The released 13B models: the reference's TeaCache threshold (not measured in this project).
REFERENCE_DEFAULT = "teacache:0.15"

# TeaCache's rescaling polynomial for HunyuanVideo (highest power first), from its authors' fit of
# the output change against the modulated-input change; the FramePack reference uses it as is.
TEACACHE_HUNYUAN_POLY = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

# MagCache's schedule knobs, its authors' defaults (as in diffusers' MagCacheConfig): never skip
# the first 20% of steps, at most three steps in a row.
MAGCACHE_RETENTION = 0.2
MAGCACHE_MAX_SKIPS = 3
TAYLORSEER_WARMUP = 3  # steps computed in full before the first extrapolation (diffusers' default)

MANIFEST_CACHE = "cache"  # manifest key: the model's recommended cache
MANIFEST_RATIOS = "magcache_ratios"  # manifest key: MagCache's per-step magnitude ratios
MANIFEST_RATIO_STEPS = "magcache_steps"  # manifest key: the step count they were measured at


# ---- the setting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` value: a method and its threshold (or TaylorSeer's interval)."""

    method: str
    value: float | None = None

    def __str__(self) -> str:
        return self.method if self.value is None else f"{self.method}:{self.value:g}"

    @property
    def enabled(self) -> bool:
        return self.method not in (NONE, MODEL)


def parse_cache(text: str) -> CacheSpec:
    """``none``, ``model``, or ``METHOD[:VALUE]``; raises ValueError with one line naming the problem."""
    if not isinstance(text, str):
        raise ValueError(f"cache must be a string like 'teacache:0.15', got {text!r}")  # noqa: TRY004 (settings problems are ValueErrors)
    method, sep, raw = text.strip().lower().partition(":")
    choices = ", ".join([*METHODS, MODEL])
    if method == MODEL or method == NONE:
        if sep:
            raise ValueError(f"cache {text!r}: '{method}' takes no value")
        return CacheSpec(method)
    if method not in METHODS:
        raise ValueError(f"unknown cache {method!r}; choose from {choices} (e.g. teacache:0.15)")
    default, meaning = METHODS[method]
    if not sep:
        return CacheSpec(method, default)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"cache {text!r}: the {meaning} must be a number, got {raw!r}") from None
    if meaning == "interval":
        if not (value.is_integer() and 1 <= value <= 100):
            raise ValueError(f"cache {text!r}: the interval must be a whole number of steps from 1 to 100")
        return CacheSpec(method, int(value))
    if not (math.isfinite(value) and 0 <= value <= 10):
        raise ValueError(f"cache {text!r}: the threshold must be a number from 0 to 10, got {raw}")
    return CacheSpec(method, value)


def resolve_cache(text: str, manifest: Mapping[str, Any]) -> CacheSpec:
    """The spec that runs: ``model`` becomes the manifest's recommendation (else the reference's)."""
    spec = parse_cache(text)
    if spec.method != MODEL:
        return spec
    resolved = parse_cache(str(manifest.get(MANIFEST_CACHE, REFERENCE_DEFAULT)))
    if resolved.method == MODEL:
        raise ValueError(f"the model's manifest recommends cache {MODEL!r}, which names no method")
    return resolved


def magcache_ratios(manifest: Mapping[str, Any], model: str) -> list[float]:
    """The model's calibrated MagCache ratios; a one-line error when it has none."""
    ratios = manifest.get(MANIFEST_RATIOS)
    if not ratios:
        raise ValueError(f"model {model!r} has no calibrated MagCache ratios: run "
                         f"'framepack calibrate-cache --model {model}' first, or pick another --cache")
    return [float(r) for r in ratios]


# ---- TeaCache (ours) -----------------------------------------------------------------------------------


def rescaled_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """TeaCache's estimate of the output change: poly(mean|cur - prev| / mean|prev|)."""
    rel_l1 = float((current - previous).abs().mean() / previous.abs().mean())
    return sum(c * rel_l1 ** (len(TEACACHE_HUNYUAN_POLY) - 1 - i) for i, c in enumerate(TEACACHE_HUNYUAN_POLY))


class TeaCache:
    """TeaCache for one section of ``steps`` model calls; pass it to the model as ``cache=``.

    The batch (both CFG branches) shares one decision: the change is measured over the whole batch.
    ``decisions`` records, per call, whether the blocks ran.
    """

    def __init__(self, threshold: float, steps: int) -> None:
        self.threshold, self.steps = threshold, steps
        self.decisions: list[bool] = []
        self._accumulated = 0.0
        self._previous_input: torch.Tensor | None = None
        self._residual: torch.Tensor | None = None

    def __call__(
        self,
        img: torch.Tensor,
        modulated: Callable[[], torch.Tensor],
        blocks: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        step = len(self.decisions)
        current = modulated()
        if step == 0 or step >= self.steps - 1 or self._residual is None:
            compute, self._accumulated = True, 0.0
        else:
            self._accumulated += rescaled_change(current, self._previous_input)
            compute = self._accumulated >= self.threshold
            if compute:
                self._accumulated = 0.0
        self._previous_input = current
        self.decisions.append(compute)
        if not compute:
            return img + self._residual
        out = blocks(img)
        self._residual = out - img
        return out


# ---- diffusers' hooks ------------------------------------------------------------------------------------


def register_blocks() -> None:
    """Tell diffusers' cache hooks where our blocks take and return the image and conditioning streams."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    from .model.blocks import DualStreamBlock, SingleStreamBlock

    for cls in (DualStreamBlock, SingleStreamBlock):
        TransformerBlockRegistry.register(
            cls, TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1)
        )


def _hook_names() -> tuple[str, ...]:
    from diffusers.hooks import first_block_cache, mag_cache, taylorseer_cache

    return (first_block_cache._FBC_LEADER_BLOCK_HOOK, first_block_cache._FBC_BLOCK_HOOK,
            mag_cache._MAG_CACHE_LEADER_BLOCK_HOOK, mag_cache._MAG_CACHE_BLOCK_HOOK,
            taylorseer_cache._TAYLORSEER_CACHE_HOOK)


def _apply_hooks(model: nn.Module, spec: CacheSpec, steps: int, ratios: Sequence[float] | None) -> None:
    import torch
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
        apply_taylorseer_cache,
    )

    register_blocks()
    if spec.method == "fbcache":
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=float(spec.value)))
    elif spec.method == "magcache":
        if not ratios:
            raise ValueError("MagCache needs the model's calibrated ratios (framepack calibrate-cache)")
        apply_mag_cache(model, MagCacheConfig(
            threshold=float(spec.value), max_skip_steps=MAGCACHE_MAX_SKIPS, retention_ratio=MAGCACHE_RETENTION,
            num_inference_steps=steps, mag_ratios=torch.tensor(list(ratios), dtype=torch.float32)))
    elif spec.method == "taylorseer":
        # factors in the model's dtype: diffusers' bf16 default would round fp32 models' features
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(
            cache_interval=int(spec.value), disable_cache_before_step=TAYLORSEER_WARMUP,
            taylor_factors_dtype=next(model.parameters()).dtype))
    else:
        raise ValueError(f"{spec.method!r} is not applied through diffusers' hooks")


@contextmanager
def _diffusers_hooks(model: nn.Module, spec: CacheSpec, steps: int, ratios: Sequence[float] | None) -> Iterator[None]:
    """diffusers' hooks on ``model`` for one section, removed afterwards (other hooks, e.g. group
    offloading, stay). Their state starts fresh with each application."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    had_registry = {m for m in model.modules() if hasattr(m, "_diffusers_hook")}
    try:
        _apply_hooks(model, spec, steps, ratios)
        _set_cache_context(model, CacheContext(name="framepack"))
        yield
    finally:
        for name in _hook_names():
            HookRegistry.check_if_exists_or_initialize(model).remove_hook(name, recurse=True)
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and module not in had_registry and not registry.hooks:
                # leave the module as it was: no registry, no instance-level forward
                del module._diffusers_hook
                module.__dict__.pop("forward", None)


@contextmanager
def section_cache(model: nn.Module, spec: CacheSpec, steps: int,
                  ratios: Sequence[float] | None = None) -> Iterator[TeaCache | None]:
    """The step cache of one section of ``steps`` model calls.

    Yields the object to pass to the model as ``cache=`` (TeaCache), or None when there is none to
    pass (caching off, or diffusers' hooks, which sit on the model until the section ends).
    """
    if not spec.enabled:
        yield None
    elif spec.method == "teacache":
        yield TeaCache(float(spec.value), steps)
    else:
        with _diffusers_hooks(model, spec, steps, ratios):
            yield None


# ---- counting and calibration ------------------------------------------------------------------------------


@contextmanager
def count_evaluations(model: nn.Module) -> Iterator[list[int]]:
    """Counts full evaluations: calls that reached the last block's attention projection.

    Yields a one-element list holding the count. TaylorSeer extrapolates the attention but still runs
    the MLPs, so its count is an upper bound on the saving.
    """
    counter = [0]
    last = model.single_transformer_blocks[-1] if len(model.single_transformer_blocks) else model.transformer_blocks[-1]
    handle = last.attn.to_q.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


@contextmanager
def record_residual_norms(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Per model call, the per-token norms (B, Limg) of the residual the blocks add to the image stream."""
    import torch

    norms: list[torch.Tensor] = []
    entering: list[torch.Tensor] = []
    first, last = model.transformer_blocks[0], model.single_transformer_blocks[-1]

    def before(module: nn.Module, args: tuple) -> None:
        entering.append(args[0])

    def after(module: nn.Module, args: tuple, output: tuple) -> None:
        norms.append(torch.linalg.vector_norm((output[0] - entering.pop()).float(), dim=-1))

    handles = [first.register_forward_pre_hook(before), last.register_forward_hook(after)]
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()


def magnitude_ratios(norms: Sequence[torch.Tensor], steps: int) -> list[float]:
    """MagCache's ratios: per step, mean over tokens of |r_t| / |r_t-1|, averaged over sections.

    ``norms`` are consecutive sections of ``steps`` calls each; step 0 has no predecessor (ratio 1).
    """
    if not norms or len(norms) % steps:
        raise ValueError(f"{len(norms)} recorded calls are not whole sections of {steps} steps")
    sums = [0.0] * steps
    sections = len(norms) // steps
    for s in range(sections):
        for t in range(1, steps):
            prev, cur = norms[s * steps + t - 1], norms[s * steps + t]
            sums[t] += float((cur / (prev + 1e-8)).mean())
    return [1.0] + [round(v / sections, 5) for v in sums[1:]]


def write_manifest_ratios(manifest: Path, ratios: Sequence[float], steps: int) -> None:
    """Put the ratios into a model's framepack.json (atomically; other keys kept)."""
    from .components import rewrite_manifest

    rewrite_manifest(manifest, lambda data: {**data, MANIFEST_RATIOS: list(ratios), MANIFEST_RATIO_STEPS: steps})


def calibrate_magcache(pipeline, settings, workdir: Path) -> list[float]:
    """Generate ``settings`` (caching off) with ``pipeline`` in ``workdir`` and measure MagCache's ratios."""
    from .jobs import JobDir

    settings = settings.replace(cache=NONE)
    job = JobDir.create(workdir / "job", settings, workdir / "calibration.mp4")
    with record_residual_norms(pipeline.c.transformer) as norms:
        pipeline.run(job)
    return magnitude_ratios(norms, settings.steps)


def manifest_path(model: str) -> Path:
    """The framepack.json that ``calibrate-cache`` writes into: the demo model's, or a model directory's."""
    from .components import EMBEDDED_MODELS, MANIFEST, NAMED_MODELS, asset

    if model in NAMED_MODELS:
        raise ValueError(f"{model!r} is a hub model with no manifest to write into: download it into a model "
                         f"directory with a {MANIFEST} and calibrate that")
    path = asset(model) if model in EMBEDDED_MODELS else Path(model).expanduser()
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise ValueError(f"{path} has no {MANIFEST}: not a framepack model directory")
    return manifest
