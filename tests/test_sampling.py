"""Samplers against an analytic flow and against diffusers' Euler scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from framepack.sampling import (
    guided_velocity,
    rescale_guidance,
    sample_euler,
    sample_unipc,
    shift_mu,
    sigma_schedule,
    velocity_denoiser,
)

# Gaussian data x0 ~ N(MU, S^2) per dimension: the flow's x0 predictor and the exact ODE
# trajectory are known in closed form, x_sigma = (1 - sigma) MU + sqrt((1-sigma)^2 S^2 + sigma^2) z.
MU = torch.tensor([0.7, -0.3, 1.2], dtype=torch.float64)
S = torch.tensor([0.5, 0.2, 1.5], dtype=torch.float64)


def gaussian_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sg = sigma.view(-1, 1)
    var = (1 - sg) ** 2 * S**2 + sg**2
    return MU + (1 - sg) * S**2 / var * (x - (1 - sg) * MU)


def exact(z: torch.Tensor, sigma: float) -> torch.Tensor:
    return (1 - sigma) * MU + torch.sqrt((1 - sigma) ** 2 * S**2 + sigma**2) * z


def error_at(sampler, steps: int, z: torch.Tensor, end: float = 0.05, **kwargs) -> float:
    """Integrate from sigma 1 to ``end`` (uniform in log sigma) and compare with the exact state."""
    sigmas = torch.cat([torch.exp(-torch.linspace(0, -math.log(end), steps, dtype=torch.float64)), torch.zeros(1, dtype=torch.float64)])
    states = []
    sampler(gaussian_x0, z.clone(), sigmas, callback=lambda step: states.append(step.x), **kwargs)
    # UniPC reports the state at sigmas[i] after step i; Euler after moving to sigmas[i + 1]
    at_end = states[steps - 1] if sampler is sample_unipc else states[steps - 2]
    return (at_end - exact(z, end)).abs().max().item()


def observed_order(sampler, **kwargs) -> float:
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = np.array([64, 128, 256, 512])
    errors = np.array([error_at(sampler, int(n), z, **kwargs) for n in steps])
    return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0])


@pytest.mark.parametrize(
    "sampler, kwargs, order",
    [
        (sample_euler, {}, 1.0),
        (sample_unipc, {"max_order": 1}, 2.0),  # UniPC-p: order p predictor + corrector = p + 1
        (sample_unipc, {"max_order": 2}, 3.0),
    ],
)
def test_convergence_order(sampler, kwargs, order):
    assert observed_order(sampler, **kwargs) == pytest.approx(order, abs=0.15)


def test_unipc_order_3_is_at_least_third_order_and_most_accurate():
    # Its first two steps are warm-up steps of order 1 and 2, which caps the global order at 3;
    # the error constant is what order 3 buys.
    assert observed_order(sample_unipc, max_order=3) >= 2.8
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for n in (16, 32, 64):
        assert error_at(sample_unipc, n, z, max_order=3) < error_at(sample_unipc, n, z, max_order=2)


def test_unipc_makes_one_call_per_step_and_returns_the_last_x0():
    calls = []

    def denoise(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_x0(x, sigma)

    sigmas = sigma_schedule(25, shift=7.0).double()
    z = torch.randn(2, 3, dtype=torch.float64)
    x0s = []
    result = sample_unipc(denoise, z, sigmas, callback=lambda step: x0s.append(step.x0))
    assert len(calls) == 25 and 0.0 not in calls
    assert torch.equal(result, x0s[-1])


def test_euler_equals_diffusers_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = sigma_schedule(12, shift=3.0)
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))

    def velocity(x, sigma):  # any smooth model will do; both integrate the same one
        return torch.tanh(x @ weight) * (1 + sigma.view(-1, 1))

    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))
    ours = sample_euler(velocity_denoiser(velocity), x.clone(), sigmas)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())
    assert torch.allclose(scheduler.sigmas, sigmas, atol=1e-6)
    theirs = x.clone()
    for t in scheduler.timesteps:
        sigma = scheduler.sigmas[scheduler.index_for_timestep(t)] if scheduler.step_index is None else scheduler.sigmas[scheduler.step_index]
        theirs = scheduler.step(velocity(theirs, sigma.expand(2)), t, theirs, return_dict=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_shift_schedule():
    # every 640 bucket has > 4096 noisy tokens, where mu hits the cap ln 7: s' = 7 s / (1 + 6 s)
    s = torch.linspace(1, 0, 26)
    assert torch.allclose(sigma_schedule(25, tokens=13464), 7 * s / (1 + 6 * s), atol=1e-6)
    assert shift_mu(256) == pytest.approx(0.5) and shift_mu(4096) == pytest.approx(1.15)
    sig = sigma_schedule(10, tokens=1000)
    assert sig[0] == 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    with pytest.raises(ValueError, match="steps"):
        sigma_schedule(0, shift=3)


def test_guidance():
    pos, neg = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(guided_velocity(pos, neg, 1.0), pos)
    assert torch.allclose(guided_velocity(pos, neg, 3.0), neg + 3 * (pos - neg))
    full = rescale_guidance(neg + 3 * (pos - neg), pos, 1.0)
    # rescale 1: each sample's std matches the conditional prediction's
    assert torch.allclose(full.std(dim=(1, 2)), pos.std(dim=(1, 2)), atol=1e-5)
