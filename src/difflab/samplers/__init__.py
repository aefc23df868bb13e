"""Samplers: one short function each, ``sample_X(denoiser, x, schedule, noise, y=None, ...) -> x_0``."""

from difflab.samplers.ancestral import sample_ancestral
from difflab.samplers.generate import generate
from difflab.samplers.noise import PerSampleNoise

SAMPLERS = {"ancestral": sample_ancestral}

__all__ = ["SAMPLERS", "PerSampleNoise", "generate", "sample_ancestral"]
