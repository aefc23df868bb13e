"""Per-sample noise for the samplers: ``difflab.noise.PerSampleNoise`` (shared with the likelihood bound)."""

from difflab.noise import PerSampleNoise

__all__ = ["PerSampleNoise"]
