"""The main job on any machine: the embedded demo model makes a video from a bundled start image.

``framepack demo`` (``make demo``) runs the *same* pipeline as the 13B model (transformer class,
planner, sampler, job directory, video writer) with the demo model shipped in the package
(``assets/tiny-fast``, the few-step student of ``assets/tiny``: see their MODEL_CARD.md) and reports, per section, the packed context length and
the time taken: the point of FramePack is that both stay constant however long the video grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .components import asset, resolve_model
from .packing import tokens_for
from .planning import SectionPlan
from .settings import DEFAULT_SEED, GenerationSettings


def demo_settings(seconds: float = 5.0, steps: int | None = None, seed: int = DEFAULT_SEED, model: str = "tiny",
                  cache: str = "none") -> GenerationSettings:
    """The bundled start image and its prompt (a held-out scene of the training world), at the
    model's own steps unless ``steps`` is given. Exact by default (benchmarks measure against it);
    ``framepack demo`` passes ``cache="model"``, the model's own step cache (the teacher's passed
    the quality gate, docs/caching.md; the few-step student has none)."""
    prompt = asset("demo", "prompt.txt").read_text().strip()
    return GenerationSettings(image=str(asset("demo", "start.png")), prompt=prompt, model=model, seconds=seconds,
                              steps=resolve_model(model).steps(steps), seed=seed, cache=cache)


def context_tokens(plan: SectionPlan, latent_height: int, latent_width: int, window_kernel=(1, 2, 2)) -> int:
    """Tokens the transformer sees in this section: the noisy window plus every packed level."""
    window = tokens_for(len(plan.window_indices), latent_height, latent_width, window_kernel)
    return window + sum(tokens_for(len(level.indices), latent_height, latent_width, level.kernel) for level in plan.levels)


@dataclass(frozen=True)
class SectionStat:
    index: int  # 1-based, in generation order
    count: int
    context_tokens: int
    seconds: float


def format_report(stats: list[SectionStat], total_seconds: float, frames: int, video: Path) -> str:
    lines = ["| section | context tokens | seconds |", "|---|---|---|"]
    lines += [f"| {s.index}/{s.count} | {s.context_tokens} | {s.seconds:.2f} |" for s in stats]
    tokens = {s.context_tokens for s in stats}
    constant = f"context stays at {tokens.pop()} tokens in every section" if len(tokens) == 1 else "context tokens vary"
    lines += ["", f"{frames} frames in {total_seconds:.1f} s of generation ({constant}).", f"video: {video}"]
    return "\n".join(lines)
