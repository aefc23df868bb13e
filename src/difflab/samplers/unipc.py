"""UniPC: Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models", with data prediction and B(h) = e^h - 1 ("bh2"), in sigma space.

The predictor UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M) (``dpm_solver.dpmpp_2m_step``; rho = 1/2 in
Eq. 9 gives the same update). The corrector UniC (Alg. 1, Eq. 8) re-solves the step that produced x_i
once the network output D_i at x_i is known, adding it as one more point of the polynomial fit:

    x_i^c = (sigma_i / sigma_{i-1}) x_{i-1} + (1 - sigma_i / sigma_{i-1}) D_{i-1}
            - B(h) (sum_k rho_k (D_{i-1-k} - D_{i-1}) / r_k + rho_p (D_i - D_{i-1})),

h = lambda_i - lambda_{i-1} (lambda = -log sigma), r_k = (lambda_{i-1-k} - lambda_{i-1}) / h, B(h) = expm1(-h),
and rho the solution of R rho = g with R_{jk} = r_k^j and g_j = j! phi_{j+1}(-h) / B(h) (Eq. 8; the phi
recursion of the authors' code; rho = 1/2 for order 1). Tested to match diffusers' UniPCMultistepScheduler.
D_i is not recomputed at the corrected x_i (that is what makes the corrector free: N network evaluations for
N steps). The corrector's order is the predictor's of the step it corrects (the first step is first order),
and the last step to sigma = 0 is the denoised x_0, as in ``sample_dpmpp_2m``. Signature as in
``difflab.samplers.ddim``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from difflab.samplers.dpm_solver import dpmpp_2m_step
from difflab.conditioning import Cond
from difflab.samplers.noise import PerSampleNoise


def unic_coefficients(h: float, rks: list[float]) -> list[float]:
    """rho of UniC for the points r_1..r_{p-1} and r_p = 1 (the new output), data prediction with
    B(h) = expm1(-h): the solution of R rho = g (the paper's Eq. 8 and its reference code)."""
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1                                   # phi_2-type term
    factorial, g = 1, []
    for j in range(1, len(rks) + 1):
        g.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if len(rks) == 1:
        return [0.5]
    rk = torch.tensor(rks, dtype=torch.float64)
    r_matrix = torch.stack([rk ** j for j in range(len(rks))])              # (p, p): row j holds r_k^j
    return torch.linalg.solve(r_matrix, torch.tensor(g, dtype=torch.float64)).tolist()


def unic_step(x_prev: torch.Tensor, sigma_prev: float, sigma: float, outputs: list[torch.Tensor],
              sigmas_of_outputs: list[float], new_output: torch.Tensor) -> torch.Tensor:
    """x_i^c from x_{i-1} (at sigma_prev), the outputs D up to D_{i-1} (``outputs[-1]``, at sigma_prev;
    ``outputs[-2]`` optional) and the new D_i at the predicted x_i."""
    h = math.log(sigma_prev / sigma)
    d0 = outputs[-1]
    x = (sigma / sigma_prev) * x_prev - math.expm1(-h) * d0
    older = [(o, s) for o, s in zip(outputs[:-1], sigmas_of_outputs[:-1])]
    rks = [(math.log(sigma_prev / s)) / h for _, s in older] + [1.0]         # (lambda_s - lambda_{i-1}) / h
    rho = unic_coefficients(h, rks)
    correction = rho[-1] * (new_output - d0)
    for (o, _), r, rho_k in zip(older, rks[:-1], rho[:-1]):
        correction = correction + rho_k * (o - d0) / r
    return x - math.expm1(-h) * correction


@torch.no_grad()
def sample_unipc(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, noise: PerSampleNoise,
                 cond: Cond | None = None,
                 callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """UniPC-2 (UniP-2 + UniC): N network evaluations for N steps; ``noise`` is unused."""
    sigmas = sigmas.tolist()
    outputs: list[torch.Tensor] = []             # D at each step's (uncorrected) x, at most the last two
    output_sigmas: list[float] = []
    x_prev, h_prev = None, None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        d = model(x, sigma, cond)
        if outputs:                                                        # UniC on the step just taken
            x = unic_step(x_prev, sigmas[i - 1], sigma, outputs, output_sigmas, d)
        outputs, output_sigmas = (outputs + [d])[-2:], (output_sigmas + [sigma])[-2:]
        x_prev = x
        if sigma_next == 0:
            x = d
        else:
            x, h_prev = dpmpp_2m_step(x, sigma, sigma_next, d, outputs[0] if len(outputs) == 2 else None, h_prev)
        if callback is not None:
            callback(i, x)
    return x
