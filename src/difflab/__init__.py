"""difflab: a PyTorch toolkit for diffusion models.

Layers, each depending only on those above it in this list:
``schedules`` and ``diffusion`` (the math), ``conditioning`` (the condition record), ``nets`` (networks),
``denoiser`` (D(x; sigma, cond) and its preconditionings), ``guidance`` and ``losses``, ``samplers``,
``train``, ``pipelines``, ``cli``.
"""

from difflab.conditioning import ClassLabel, Cond, Condition
from difflab.denoiser import Denoiser, EDMPrecond, VPPrecond
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, space_timesteps

__version__ = "0.2.0"
__all__ = ["ClassLabel", "Cond", "Condition", "Denoiser", "DifflabError", "EDMPrecond", "NoiseSchedule",
           "VPPrecond", "space_timesteps"]
