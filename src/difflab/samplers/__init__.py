"""Samplers: one short function each.

- ``sample_ancestral(denoiser, x_T, schedule, noise, cond=None, ...)``: DDPM's chain on a discrete schedule;
- the sigma-space samplers, all ``sample_X(model, x, sigmas, noise, cond=None, ...) -> x_0`` with
  ``model(x, sigma, cond)`` = D(x; sigma, cond) (``difflab.denoiser.Denoiser`` or a wrapper of it, such as
  guidance), x VE-scaled at sigmas[0], and sigmas from ``sigmas.build_sigmas`` / ``sigmas.sigma_grid``
  (decreasing, ending in 0). Among them the score-based ``sample_langevin``
  (annealed Langevin dynamics) and ``sample_pc`` (predictor-corrector), which call the network several
  times per noise level.

``SAMPLERS`` maps the names of ``SampleConfig.sampler`` to them, ``SAMPLER_OPTIONS`` names the keyword
arguments (also ``SampleConfig`` fields) each one takes beyond the common ones.
"""

from difflab.samplers.ancestral import sample_ancestral
from difflab.samplers.consistency import sample_consistency
from difflab.samplers.ddim import ddim_invert, sample_ddim, sample_euler_ancestral, slerp
from difflab.samplers.dpm_solver import sample_dpmpp_2m
from difflab.samplers.generate import generate
from difflab.samplers.karras import sample_euler, sample_heun
from difflab.samplers.langevin import sample_langevin, sample_pc
from difflab.samplers.nfe import CountingModel, steps_for_nfe
from difflab.samplers.repaint import sample_repaint
from difflab.samplers.unipc import sample_unipc
from difflab.samplers.noise import PerSampleNoise
from difflab.samplers.sigmas import SPACINGS, build_sigmas, karras_sigmas, logsnr_sigmas, prior_std, sigma_grid

SAMPLERS = {
    "ancestral": sample_ancestral,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "euler-ancestral": sample_euler_ancestral,
    "langevin": sample_langevin,
    "pc": sample_pc,
    "consistency": sample_consistency,
}
DISCRETE_SAMPLERS = ("ancestral",)          # take (denoiser, x_T, NoiseSchedule); the others work in sigma space

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
SAMPLER_OPTIONS = {
    "ancestral": ("variance",),
    "ddim": ("eta",),
    "euler": _CHURN,
    "heun": _CHURN,
    "dpmpp-2m": (),
    "unipc": (),
    "euler-ancestral": ("eta",),
    "langevin": ("langevin_steps", "step_size"),
    "pc": ("langevin_steps", "snr"),
    "consistency": (),
}

__all__ = ["DISCRETE_SAMPLERS", "SAMPLERS", "SAMPLER_OPTIONS", "SPACINGS", "CountingModel", "PerSampleNoise",
           "build_sigmas", "ddim_invert", "sigma_grid", "generate", "karras_sigmas", "logsnr_sigmas", "prior_std",
           "sample_ancestral", "sample_consistency", "sample_ddim", "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral",
           "sample_heun", "sample_langevin", "sample_pc", "sample_repaint", "sample_unipc", "slerp", "steps_for_nfe"]
