"""difflab: a PyTorch toolkit for diffusion models.

Layers, each depending only on those above it in this list:
``schedules`` and ``diffusion`` (the math), ``nets`` (networks), ``denoiser`` and ``losses``,
``samplers``, ``train``, ``pipelines``, ``cli``.
"""

from difflab.denoiser import Denoiser, Prediction
from difflab.errors import DifflabError
from difflab.schedules import NoiseSchedule, space_timesteps

__version__ = "0.1.0"
__all__ = ["Denoiser", "DifflabError", "NoiseSchedule", "Prediction", "space_timesteps"]
