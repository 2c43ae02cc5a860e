"""The memory planner: where each component lives, in what format, and the predicted peaks.

Pure: from component sizes (:mod:`framepack.runtime.sizes`, counted on the meta device), the job's
geometry (resolution bucket, window, CFG batch) and a budget (GPU and host memory), it returns a
frozen :class:`MemoryPlan` or raises :class:`NoPlanError` naming the smallest budget that works.
Nothing here touches a GPU; every number is a prediction (docs/memory.md gives the formulas).

The search: every combination of per-component choices is a candidate; a candidate's predicted
peaks do not depend on the budget, so "the best candidate that fits" is monotone: more memory
never gives a worse plan. Candidates are ordered by :func:`order_key`, the degradation ladder
resident -> used once (phase) -> VAE tiling -> block offload -> fp8 -> int8 -> disk (quality
before speed; streaming weights from disk every step is the last resort).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import astuple, dataclass
from typing import Literal

from ..packing import ContextSchedule, context_bound
from .sizes import ComponentSize, ModelSizes, ParamGroup, TransformerGeometry, VaeGeometry

GiB = 1 << 30  # "GB" in what we print: binary gigabytes, as GPU memory is counted

Storage = Literal["bf16", "fp8", "int8"]
Placement = Literal["resident", "phase", "offload", "disk"]
Phase = Literal["encode", "sample", "decode"]
PHASES: tuple[Phase, ...] = ("encode", "sample", "decode")
STORAGES: tuple[Storage, ...] = ("bf16", "fp8", "int8")
PLACEMENTS: tuple[Placement, ...] = ("resident", "phase", "offload", "disk")

# ---- constants of the predictions (each is a stated assumption, see docs/memory.md) ---------------

ACT_BYTES = 2  # activations in bf16 on the GPU
SCALE_BYTES = 4  # fp32 scales: one per tensor (fp8) or per row (int8), as runtime.placement stores them
PREFETCH_GROUPS = 2  # block offload with prefetch: the running block and the next one on the GPU
MARGIN = 0.10  # kept free of every budget: allocator fragmentation and the error of these estimates
CUDA_CONTEXT = GiB // 2  # CUDA context, cuBLAS / cuDNN workspaces and kernels: on the GPU, outside torch
RUNTIME_RAM = 5 * GiB // 2  # Python, torch with its CUDA libraries, transformers, diffusers: host RSS
RUNTIME_RAM_CPU = GiB  # the same without CUDA (torch's CPU build): what a one-pool (CPU) run pays instead
# a one-pool run has no CUDA context and the smaller runtime: taken off the phases' device + host totals
NO_CUDA = CUDA_CONTEXT + RUNTIME_RAM - RUNTIME_RAM_CPU
# VAE: activations of one decoder call at full resolution, in tensors of the top stage's width. The
# last upsampler takes a 2x-wide stage to full size (interpolated input, its causal padding, the
# conv output: 3 tensors of 2x width) and the top ResNets keep input, norm, padded copy and output:
# about 6; 8 allows for cuDNN's workspace and GroupNorm's fp32 statistics.
VAE_TOP_TENSORS = 8
VAE_CAUSAL_PAD = 2  # causal conv: 2 replicated frames in front of every call
# diffusers builds the mid-block's causal mask over all L latent tokens of a call as a bool L x L,
# a float32 L x L (torch.where with Python floats) and its bf16 copy: 1 + 4 + 2 bytes per entry
VAE_MASK_BYTES = 1 + 4 + 2
# decoded video of one section on the GPU: tiles kept until blended (overlap (256/192)^2 ~ 1.8),
# the blended result, its float32 copy and the clamp: ~14 bytes per value
VAE_OUTPUT_BYTES = 14
HOST_FRAME_BYTES = 12  # the decoded section on the host: float32 copy, clamp, uint8 frames
RGB = 3


# ---- the job and the budget ---------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What the memory depends on besides the model: resolution bucket, window, CFG batch."""

    resolution: int = 640
    window: int = 9
    batch: int = 1  # 2 with real CFG (cfg != 1): both branches in one forward

    def __post_init__(self) -> None:
        if self.resolution < 16:
            raise ValueError(f"resolution must be >= 16, got {self.resolution}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.batch not in (1, 2):
            raise ValueError(f"batch must be 1 or 2, got {self.batch}")


@dataclass(frozen=True)
class Budget:
    vram: int  # bytes of GPU memory the job may use
    ram: int  # bytes of host memory
    # one pool (a CPU run, unified memory): a phase's device and host bytes together must fit ``ram``
    unified: bool = False

    def __post_init__(self) -> None:
        if self.vram <= 0 or self.ram <= 0:
            raise ValueError(f"memory budgets must be > 0, got {self.vram / GiB:g} GB VRAM, {self.ram / GiB:g} GB RAM")

    @classmethod
    def gb(cls, vram: float, ram: float) -> "Budget":
        return cls(int(vram * GiB), int(ram * GiB))

    @classmethod
    def shared(cls, gb: float) -> "Budget":
        """One pool of ``gb`` GB for everything (a CPU run)."""
        return cls(int(gb * GiB), int(gb * GiB), unified=True)


def usable(budget_bytes: int) -> int:
    """What a plan may fill of a budget: all but the safety margin."""
    return int(budget_bytes * (1 - MARGIN))


def one_pool_peak(phases: Iterable[PhasePeak]) -> int:
    """What one pool (a CPU run) must hold: the largest device + host bytes of a phase, less what a
    CPU process does not load (:data:`NO_CUDA`)."""
    return max(p.vram + p.ram for p in phases) - NO_CUDA


def within(budget: Budget, phases: Iterable[PhasePeak]) -> bool:
    """Do the phases' predicted peaks fit the usable part of ``budget``? One pool holds each
    phase's sum; otherwise the GPU and the host each hold their own."""
    phases = tuple(phases)
    if budget.unified:
        return one_pool_peak(phases) <= usable(budget.ram)
    return (max(p.vram for p in phases) <= usable(budget.vram)
            and max(p.ram for p in phases) <= usable(budget.ram))


def needed_budget(peak: int) -> int:
    """The smallest budget whose usable part holds ``peak`` (inverse of :func:`usable`)."""
    return math.ceil(peak / (1 - MARGIN))


# ---- bytes of weights ---------------------------------------------------------------------------


def group_bytes(group: ParamGroup, storage: Storage) -> int:
    """Stored bytes of a parameter group: bf16 everywhere, or its Linear weights in 8 bits with
    fp32 scales (per tensor for fp8, per row for int8) and everything else in bf16."""
    if storage == "bf16":
        return 2 * group.params
    scales = group.linear_tensors if storage == "fp8" else group.linear_rows
    return group.linear_params + SCALE_BYTES * scales + 2 * (group.params - group.linear_params)


def weight_bytes(size: ComponentSize, storage: Storage) -> int:
    return group_bytes(size.rest, storage) + sum(group_bytes(b, storage) for b in size.blocks)


def streamed_bytes(size: ComponentSize, storage: Storage) -> int:
    """On the device while a block-offloaded component runs: its rest (one group, on for the whole
    forward) and the largest :data:`PREFETCH_GROUPS` blocks."""
    blocks = sorted((group_bytes(b, storage) for b in size.blocks), reverse=True)
    return group_bytes(size.rest, storage) + sum(blocks[:PREFETCH_GROUPS])


# ---- activations --------------------------------------------------------------------------------


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    from ..images import buckets

    return buckets(resolution)


def transformer_tokens(geometry: TransformerGeometry, latent_height: int, latent_width: int, window: int) -> int:
    """Tokens of one forward: the packed image stream at its full-history bound (the start anchor,
    the noisy window and every context level: ``packing.context_bound``), SigLIP and text tokens."""
    image = context_bound(ContextSchedule.parse(geometry.context_schedule), latent_height, latent_width, window,
                          anchors=1, patch=geometry.patch)
    return image + geometry.image_tokens + geometry.text_tokens


def transformer_work(geometry: TransformerGeometry, tokens: int, batch: int) -> int:
    """Activations of the largest block (single-stream, inference), in (B, L, D) tensors: the
    residual x and its modulation m, the attention output, the MLP pre-activation (r = mlp_ratio)
    and its GELU (r), their concatenation (1 + r) and proj_out's result: 5 + 2r (13 at r = 4).
    Attention is assumed to run in SDPA's flash or memory-efficient kernel (CUDA, bf16), whose
    memory is linear in L: no L x L matrix. Plus the fp32 RoPE tables (cos, sin) of the sequence."""
    tensors = 5 + 2 * geometry.mlp_ratio
    hidden = batch * tokens * geometry.inner_dim * ACT_BYTES
    rope = 2 * batch * tokens * geometry.head_dim * 4
    return int(tensors * hidden) + rope


def vae_call_bytes(geometry: VaeGeometry, latents: int, height: int, width: int) -> int:
    """One decoder (or encoder) call over ``latents`` latent frames of ``height x width`` pixels:
    the top stage's activations plus, where the VAE has one, the mid-block's causal mask."""
    frames = (latents - 1) * geometry.temporal + 1 + VAE_CAUSAL_PAD
    conv = VAE_TOP_TENSORS * geometry.top_channels * frames * height * width * ACT_BYTES
    mask = 0
    if geometry.causal_attention:
        tokens = latents * math.ceil(height / geometry.spatial) * math.ceil(width / geometry.spatial)
        mask = tokens * tokens * VAE_MASK_BYTES
    return conv + mask


def decode_latents(window: int) -> int:
    """Latents one section decodes: its window, the next window for the overlap blend, and the
    start latent on the last section (``planning.decode_span``)."""
    return 2 * window + 1


def vae_decode_work(geometry: VaeGeometry, window: int, height: int, width: int, tile: int | None) -> int:
    latents = decode_latents(window)
    per_call = min(latents, geometry.frames_per_call or latents)
    h, w = (height, width) if tile is None else (min(tile, height), min(tile, width))
    frames = (latents - 1) * geometry.temporal + 1
    output = RGB * frames * height * width * VAE_OUTPUT_BYTES
    return vae_call_bytes(geometry, per_call, h, w) + output


def vae_encode_work(geometry: VaeGeometry, height: int, width: int, tile: int | None) -> int:
    """The start image (one latent frame); tiled like the decode when tiling is on."""
    h, w = (height, width) if tile is None else (min(tile, height), min(tile, width))
    return vae_call_bytes(geometry, 1, h, w)


def host_decode_bytes(window: int, height: int, width: int, temporal: int) -> int:
    frames = (decode_latents(window) - 1) * temporal + 1
    return RGB * frames * height * width * HOST_FRAME_BYTES


def kept_tile_bytes(geometry: VaeGeometry, window: int, height: int, width: int) -> int:
    """The decoded temporal tiles kept on the host for the next section's decode
    (``framepack.tile_reuse``): at most two calls' tiles (5 latents every 3) in float32."""
    if geometry.frames_per_call is None:
        return 0
    tiles = -(-decode_latents(window) // (geometry.frames_per_call - 2))
    frames = (geometry.frames_per_call - 1) * geometry.temporal + 1
    return 2 * tiles * RGB * frames * height * width * 4


# ---- choices, plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    placement: Placement = "resident"
    storage: Storage = "bf16"
    tile: int | None = None  # VAE only: tile size in pixels; None = whole frames


@dataclass(frozen=True)
class ComponentPlan:
    name: str
    params: int
    choice: Choice
    weight_bytes: int  # all its parameters as stored
    gpu_bytes: int  # of those, on the GPU while it runs (all, or rest + prefetched blocks)


@dataclass(frozen=True)
class PhasePeak:
    phase: Phase
    vram: int  # predicted peak bytes
    ram: int


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    job: Job
    budget: Budget | None  # None: the best plan regardless of budget
    components: tuple[ComponentPlan, ...]
    phases: tuple[PhasePeak, ...]
    key: tuple[int, ...]  # order_key: smaller is better (quality first, then speed)

    @property
    def peak_vram(self) -> int:
        return max(p.vram for p in self.phases)

    @property
    def peak_ram(self) -> int:
        return max(p.ram for p in self.phases)

    def fits(self, budget: Budget) -> bool:
        return within(budget, self.phases)

    def component(self, name: str) -> ComponentPlan:
        return next(c for c in self.components if c.name == name)


class NoPlanError(ValueError):
    """No candidate fits; ``smallest`` is a budget that does (the VRAM or RAM asked, the other raised)."""

    def __init__(self, message: str, smallest: Budget) -> None:
        super().__init__(message)
        self.smallest = smallest


# ---- candidates ---------------------------------------------------------------------------------


def options(size: ComponentSize, tiles: tuple[int, ...] = ()) -> list[Choice]:
    """Every choice offered for a component: block offload where it has blocks, 8-bit storage
    where it is quantizable, tiles for the VAE where it can tile."""
    placements = PLACEMENTS if size.blocks else ("resident", "phase")
    storages = STORAGES if size.quantizable else ("bf16",)
    tile_options: tuple[int | None, ...] = (None, *tiles) if size.role == "vae" else (None,)
    return [Choice(p, s, t) for p in placements for s in storages for t in tile_options]


STEPS: tuple[tuple[Phase, str], ...] = (
    ("encode", "text"), ("encode", "image"), ("encode", "vae"), ("sample", "transformer"), ("decode", "vae"),
)
"""Each phase's steps, in order, named by the role of the component that runs."""


@dataclass(frozen=True)
class Footprint:
    """Bytes of a component under one choice: all its weights, and on the GPU while it runs."""

    weights: int
    running: int


def footprint(size: ComponentSize, choice: Choice) -> Footprint:
    weights = weight_bytes(size, choice.storage)
    running = streamed_bytes(size, choice.storage) if choice.placement in ("offload", "disk") else weights
    return Footprint(weights, running)


def on_gpu(choice: Choice, foot: Footprint, runs: bool) -> int:
    """Bytes of a component on the GPU during a step (``runs``: it is the step's component)."""
    if choice.placement == "resident":
        return foot.weights
    return foot.running if runs else 0


def on_host(choice: Choice, foot: Footprint, runs: bool) -> int:
    """Bytes of a component in host memory during a step. Pinned host copies (offload) stay; a
    component used in phases is on the host while it does not run; disk offload stages its rest
    and the prefetched blocks while it runs (files in the page cache do not count: the kernel
    drops them under pressure)."""
    if choice.placement == "resident":
        return 0
    if choice.placement == "offload":
        return foot.weights
    if choice.placement == "phase":
        return 0 if runs else foot.weights
    return foot.running if runs else 0


@dataclass(frozen=True)
class _Work:
    """Activation bytes on the GPU and the host for each step role."""

    gpu: dict[tuple[Phase, str], int]
    host: dict[tuple[Phase, str], int]


def _work(sizes: ModelSizes, job: Job, tile: int | None) -> _Work:
    tg, vg = sizes.transformer_geometry, sizes.vae_geometry
    spatial = vg.spatial
    worst_tokens = max(transformer_tokens(tg, h // spatial, w // spatial, job.window)
                       for h, w in bucket_sizes(job.resolution))
    h, w = max(bucket_sizes(job.resolution), key=lambda b: b[0] * b[1])
    text = max((e.work_bytes for e in sizes.encoders if e.role == "text"), default=0)
    image = max((e.work_bytes for e in sizes.encoders if e.role == "image"), default=0)
    gpu = {
        ("encode", "text"): text,
        ("encode", "image"): image,
        ("encode", "vae"): vae_encode_work(vg, h, w, tile),
        ("sample", "transformer"): transformer_work(tg, worst_tokens, job.batch),
        ("decode", "vae"): vae_decode_work(vg, job.window, h, w, tile),
    }
    host = {step: 0 for step in STEPS}
    host[("decode", "vae")] = host_decode_bytes(job.window, h, w, vg.temporal) + kept_tile_bytes(vg, job.window, h, w)
    return _Work(gpu, host)


def peaks(sizes: ModelSizes, job: Job, choices: dict[str, Choice], work: _Work | None = None,
          feet: dict[tuple[str, Choice], Footprint] | None = None) -> tuple[PhasePeak, ...]:
    """Predicted peak VRAM and RAM of each phase: the largest over its steps of the weights on the
    GPU (resp. host) during that step plus the step's activations and the fixed costs."""
    work = work or _work(sizes, job, choices[sizes.vae.name].tile)
    parts = [(c.role, choices[c.name], feet[(c.name, choices[c.name])] if feet else footprint(c, choices[c.name]))
             for c in sizes.components]
    has_image = any(e.role == "image" for e in sizes.encoders)
    vram = {phase: 0 for phase in PHASES}
    ram = {phase: 0 for phase in PHASES}
    for step in STEPS:
        phase, role = step
        if role == "image" and not has_image:
            continue
        gpu = CUDA_CONTEXT + work.gpu[step] + sum(on_gpu(ch, f, r == role) for r, ch, f in parts)
        host = RUNTIME_RAM + work.host[step] + sum(on_host(ch, f, r == role) for r, ch, f in parts)
        vram[phase], ram[phase] = max(vram[phase], gpu), max(ram[phase], host)
    return tuple(PhasePeak(p, vram[p], ram[p]) for p in PHASES)


STORAGE_RANK = {"bf16": 0, "fp8": 1, "int8": 2}


def order_key(sizes: ModelSizes, choices: dict[str, Choice],
              feet: dict[tuple[str, Choice], Footprint] | None = None) -> tuple[int, ...]:
    """Smaller is better. Lexicographic, worst degradation first:

    1. bytes streamed from disk (disk offload is the last resort; with it, fewer bytes is faster);
    2. the transformer's storage (bf16 < fp8 < int8), then the encoders' (quality);
    3. the transformer block-offloaded to host memory, then the encoders (speed: every step, or
       once per job, the weights cross PCIe);
    4. VAE tile size (none < 256 < 128 px: smaller tiles, more overlap work and seams to blend);
    5. the transformer moved off the GPU between phases, then the encoders used once and moved off.
    """
    t = choices[sizes.transformer.name]
    others = [(c, choices[c.name]) for c in (*sizes.encoders, sizes.vae)]
    disk = sum((feet[(c.name, choices[c.name])] if feet else footprint(c, choices[c.name])).weights
               for c in sizes.components if choices[c.name].placement == "disk")
    vae_tile = choices[sizes.vae.name].tile
    return (
        disk,
        STORAGE_RANK[t.storage],
        sum(STORAGE_RANK[ch.storage] for _, ch in others),
        int(t.placement == "offload"),
        sum(ch.placement == "offload" for _, ch in others),
        0 if vae_tile is None else 1_000_000 // vae_tile,
        int(t.placement == "phase"),
        sum(ch.placement == "phase" for _, ch in others),
    )


@dataclass(frozen=True)
class Candidate:
    choices: tuple[tuple[str, Choice], ...]
    phases: tuple[PhasePeak, ...]
    key: tuple[int, ...]

    @property
    def vram(self) -> int:
        return max(p.vram for p in self.phases)

    @property
    def ram(self) -> int:
        return max(p.ram for p in self.phases)

    def fits(self, budget: Budget) -> bool:
        return within(budget, self.phases)


def candidates(sizes: ModelSizes, job: Job) -> list[Candidate]:
    """Every combination of choices with its peaks and key, best key first."""
    vae_tiles = sizes.vae_geometry.tiles
    per_component = [options(c, vae_tiles) for c in sizes.components]
    works = {tile: _work(sizes, job, tile) for tile in (None, *vae_tiles)}
    feet = {(c.name, ch): footprint(c, ch) for c, opts in zip(sizes.components, per_component) for ch in opts}
    found = []
    for combo in itertools.product(*per_component):
        choices = {c.name: ch for c, ch in zip(sizes.components, combo)}
        work = works[choices[sizes.vae.name].tile]
        found.append(Candidate(tuple(choices.items()), peaks(sizes, job, choices, work, feet),
                               order_key(sizes, choices, feet)))
    return sorted(found, key=lambda c: c.key)


def _plan_of(sizes: ModelSizes, job: Job, budget: Budget | None, candidate: Candidate) -> MemoryPlan:
    choices = dict(candidate.choices)
    components = tuple(
        ComponentPlan(c.name, c.params, choices[c.name], *astuple(footprint(c, choices[c.name])))
        for c in sizes.components
    )
    return MemoryPlan(sizes.model, job, budget, components, candidate.phases, candidate.key)


def plan_memory(sizes: ModelSizes, job: Job, budget: Budget, found: list[Candidate] | None = None) -> MemoryPlan:
    """The best candidate whose predicted peaks fit the usable part of ``budget``.

    Raises :class:`NoPlanError` when none fits, naming the smallest budget that works: the VRAM
    needed with the RAM given, else the RAM needed with the VRAM given, else both.
    """
    found = found if found is not None else candidates(sizes, job)
    for candidate in found:  # best first
        if candidate.fits(budget):
            return _plan_of(sizes, job, budget, candidate)
    smallest = smallest_budget(found, budget)
    if budget.unified:
        raise NoPlanError(
            f"no memory plan for {sizes.model} fits {budget.ram / GiB:.1f} GB of memory (predicted, {MARGIN:.0%} "
            f"kept free): the smallest that works is {smallest.ram / GiB:.1f} GB", smallest)
    raise NoPlanError(
        f"no memory plan for {sizes.model} fits {budget.vram / GiB:.1f} GB VRAM and {budget.ram / GiB:.1f} GB RAM "
        f"(predicted, {MARGIN:.0%} kept free): the smallest that works is {smallest.vram / GiB:.1f} GB VRAM "
        f"with {smallest.ram / GiB:.1f} GB RAM",
        smallest,
    )


def _round_up_tenth(nbytes: int) -> int:
    """Up to the next 0.1 GB, so that the budget we name is one a user can type and it still plans."""
    return int(math.ceil(nbytes / GiB * 10 - 1e-9) / 10 * GiB) + 1


def smallest_budget(found: list[Candidate], budget: Budget) -> Budget:
    """A budget, rounded up to 0.1 GB, that some candidate fits: the least VRAM with the RAM asked
    if any candidate fits that RAM, else the least RAM with the VRAM asked, else the pair of the
    candidate needing the least VRAM (then RAM). One pool: the least device + host total."""
    if budget.unified:
        least = _round_up_tenth(needed_budget(min(one_pool_peak(c.phases) for c in found)))
        return Budget(least, least, unified=True)
    ram_ok = [c for c in found if c.ram <= usable(budget.ram)]
    if ram_ok:
        return Budget(_round_up_tenth(needed_budget(min(c.vram for c in ram_ok))), budget.ram)
    vram_ok = [c for c in found if c.vram <= usable(budget.vram)]
    if vram_ok:
        return Budget(budget.vram, _round_up_tenth(needed_budget(min(c.ram for c in vram_ok))))
    best = min(found, key=lambda c: (c.vram, c.ram))
    return Budget(_round_up_tenth(needed_budget(best.vram)), _round_up_tenth(needed_budget(best.ram)))


# ---- presentation -------------------------------------------------------------------------------

PLACEMENT_TEXT = {
    "resident": "resident on the GPU",
    "phase": "on the GPU only while it runs",
    "offload": "block offload from RAM, prefetch",
    "disk": "block offload from disk, prefetch",
}
ONE_POOL_TEXT = {  # a CPU run: nothing moves between two memories, only disk offload streams
    "resident": "resident",
    "phase": "resident (used in one phase)",
    "offload": "resident (block offload from RAM is a no-op)",
    "disk": "block offload from disk",
}


def gb(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GB"


def _budget_text(budget: Budget | None) -> str:
    if budget is None:
        return ""
    if budget.unified:
        return f"; budget {gb(budget.ram)} of memory shared by device and host (device = host: add the columns)"
    return f"; budget {gb(budget.vram)} VRAM, {gb(budget.ram)} RAM"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as markdown tables: components, then the predicted peak of each phase."""
    job = plan.job
    lines = [f"memory plan for {plan.model}: {job.resolution} bucket (worst case), window {job.window}, batch {job.batch}"
             + _budget_text(plan.budget), "",
             "| component | parameters | placement | storage | weights | on GPU while running |",
             "|---|---:|---|---|---:|---:|"]
    texts = ONE_POOL_TEXT if plan.budget is not None and plan.budget.unified else PLACEMENT_TEXT
    for c in plan.components:
        storage = c.choice.storage + (f", tiles {c.choice.tile} px" if c.choice.tile else "")
        lines.append(f"| {c.name} | {c.params / 1e9:.3f} B | {texts[c.choice.placement]} | {storage} "
                     f"| {gb(c.weight_bytes)} | {gb(c.gpu_bytes)} |")
    lines += ["", "| phase | peak VRAM | peak RAM |", "|---|---:|---:|"]
    lines += [f"| {p.phase} | {gb(p.vram)} | {gb(p.ram)} |" for p in plan.phases]
    if plan.budget is not None and plan.budget.unified:
        lines += ["", f"One pool (device = host): largest phase total {gb(one_pool_peak(plan.phases))} (the columns "
                  f"added, less the CUDA context and CUDA libraries a CPU run does not load)."]
    lines += ["", f"Predicted, not measured; GB = 2^30 bytes; {MARGIN:.0%} of each budget kept free."]
    return "\n".join(lines)
