"""Flow-matching sampling: sigma schedules, guidance, and samplers over a denoiser.

A *denoiser* is any callable ``x0 = denoise(x, sigma)`` with x (B, ...) and sigma (B,). Flow
matching here means ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and a model that predicts the
velocity ``v = noise - x0``, so ``x0 = x - sigma * v`` and the probability-flow ODE is
``dx/dsigma = (x - x0(x, sigma)) / sigma``. Samplers integrate it from sigma = 1 to 0; they know
nothing about models, sections or progress bars (progress goes out through ``callback``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """What a sampler reports after each step: step i of n, the state x, and the x0 prediction."""

    i: int
    n: int
    x: torch.Tensor
    x0: torch.Tensor


StepCallback = Callable[[Step], None]

TIMESTEP_SCALE = 1000.0  # the model's timestep and guidance units: sigma * 1000

# Sequence-length-dependent shift (as used by Flux-style flow models and the FramePack reference):
# mu grows linearly from 0.5 at 256 tokens to 1.15 at 4096 tokens, capped at ln(7).
_MU_AT = ((256, 0.5), (4096, 1.15))
MAX_SHIFT = 7.0


def shift_mu(tokens: int, max_shift: float = MAX_SHIFT) -> float:
    """mu(L) = k * L + b through the two anchor points, capped at ln(max_shift)."""
    (x1, y1), (x2, y2) = _MU_AT
    k = (y2 - y1) / (x2 - x1)
    return min(k * tokens + (y1 - k * x1), math.log(max_shift))


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """Time shift ``s' = e^mu / (e^mu + 1/s - 1)``, written so that s = 0 maps to 0 exactly."""
    e = math.exp(mu)
    return e * sigmas / (e * sigmas + (1.0 - sigmas))


def sigma_schedule(steps: int, tokens: int | None = None, shift: float | None = None) -> torch.Tensor:
    """``steps + 1`` sigmas from 1 to 0 (fp32), shifted by ``shift`` or by mu(tokens)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift is not None and not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift is None and tokens is None:
        raise ValueError("give either the noisy token count or an explicit shift")
    mu = math.log(shift) if shift is not None else shift_mu(tokens)
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), mu)


# ---- guidance -----------------------------------------------------------------------------------------


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, rescale: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules ...", eq. 15-16):
    match the per-sample std of the guided prediction to the conditional one, blended by ``rescale``.
    """
    if rescale == 0:
        return guided
    dims = list(range(1, guided.ndim))
    matched = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * matched + (1.0 - rescale) * guided


def guided_velocity(v_pos: torch.Tensor, v_neg: torch.Tensor | None, cfg: float, rescale: float = 0.0) -> torch.Tensor:
    """Real classifier-free guidance ``neg + cfg * (pos - neg)``; plain ``pos`` when cfg == 1."""
    if v_neg is None or cfg == 1.0:
        return v_pos
    return rescale_guidance(v_neg + cfg * (v_pos - v_neg), v_pos, rescale)


def velocity_denoiser(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Denoiser:
    """Turn a velocity model ``v(x, sigma)`` into a denoiser ``x0 = x - sigma * v`` (in fp32)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        v = velocity(x, sigma).float()
        return x.float() - v * sigma.float().view(-1, *([1] * (x.ndim - 1)))

    return denoise


# ---- samplers ---------------------------------------------------------------------------------------------


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.device).expand(x.shape[0])


def sample_euler(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: StepCallback | None = None
) -> torch.Tensor:
    """First-order Euler on the flow ODE: ``x += (s_next - s) * v`` with ``v = (x - x0) / s``."""
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, _per_sample(s, x))
        x = x + (s_next - s) * (x - x0) / s
        if callback is not None:
            callback(Step(i, n, x, x0))
    return x


def _unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[list[float], list[float]]:
    """UniPC-bh1 predictor and corrector weights (Zhao et al. 2023, "UniPC", algorithm 1/2).

    ``rks`` are the step ratios r_k = (lambda_k - lambda_prev) / h of the previous evaluations
    (plus 1.0 for the current point); ``hh = -h`` in the lambda = -log(sigma) variable. B(h) = hh.
    Returns (rhos_p for the order-1 predictor differences, rhos_c for the corrector).
    """
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.tensor(rows, dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    if order == 1:
        return [], [0.5]
    rhos_p = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
    rhos_c = torch.linalg.solve(R, bt).tolist()
    return rhos_p, rhos_c


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepCallback | None = None,
    max_order: int = 3,
) -> torch.Tensor:
    """UniPC (bh1, data prediction) for flow matching, order up to ``max_order``.

    Uses lambda = -log(sigma) as the time variable of an exponential integrator whose linear
    part is exact for ``dx/dsigma = (x - x0) / sigma``. One denoiser call per step (the corrector
    reuses the next step's evaluation); sigma = 0 is never evaluated, and, as in the FramePack
    reference, the last x0 prediction is returned.
    """
    n = len(sigmas) - 1
    order = max(1, min(max_order, n - 1))
    lambdas = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    x0_prev = [denoise(x, _per_sample(sigmas[0], x))]
    steps_prev = [0]
    if callback is not None:
        callback(Step(0, n, x, x0_prev[-1]))
    for i in range(1, n):
        k = min(i, order)  # warm up: the first steps have fewer previous evaluations
        j0 = steps_prev[-1]
        h = lambdas[i] - lambdas[j0]
        hh = -h
        rks = [(lambdas[steps_prev[-(m + 1)]] - lambdas[j0]) / h for m in range(1, k)] + [1.0]
        diffs = [(x0_prev[-(m + 1)] - x0_prev[-1]) / rks[m - 1] for m in range(1, k)]
        rhos_p, rhos_c = _unipc_coefficients(rks, hh, k)
        ratio = float(sigmas[i] / sigmas[j0])
        # exponential-integrator (DDIM) step from the last x0, then the predictor's correction
        base = ratio * x - math.expm1(hh) * x0_prev[-1]
        x_pred = base - hh * sum((r * d for r, d in zip(rhos_p, diffs)), torch.zeros_like(x)) if diffs else base
        x0_now = denoise(x_pred, _per_sample(sigmas[i], x))
        # corrector: the same base, now using the fresh evaluation as the newest point
        correction = sum((r * d for r, d in zip(rhos_c[:-1], diffs)), torch.zeros_like(x))
        x = base - hh * (correction + rhos_c[-1] * (x0_now - x0_prev[-1]))
        x0_prev = (x0_prev + [x0_now])[-order:]
        steps_prev = (steps_prev + [i])[-order:]
        if callback is not None:
            callback(Step(i, n, x, x0_now))
    return x0_prev[-1]


SAMPLERS = {"unipc": sample_unipc, "euler": sample_euler}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}") from None
