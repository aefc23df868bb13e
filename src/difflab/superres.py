"""Cascades: the low-resolution conditioning of a super-resolution stage and its noise-conditioning augmentation
(Ho, Saharia, Chan, Fleet, Norouzi & Salimans 2021, "Cascaded Diffusion Models for High Fidelity Image
Generation", Sec. 3-4; Saharia et al. 2022, "Imagen", Sec. 2.5).

- ``downsample``: the one downsampler of a cascade, used to make the training pairs and nowhere else differently:
  the average over each block of pixels (``area``; a box filter, antialiased for integer factors).
- The augmentation level ``a`` in [0, 1] names a point of a variance-preserving path of the low-resolution image
  z_0: z_a = alpha(a) z_0 + sigma(a) eps with alpha = cos(pi a / 2), sigma = sin(pi a / 2) (the cosine path;
  a = 0 is the clean image, 1 pure noise). In VE terms that is x = z_0 + s n with s = tan(pi a / 2), z = x /
  sqrt(1 + s^2), which is how the truncated cascade reads it off a base model's sampler.
- Gaussian augmentation (CDM, Sec. 4.1): during training a is drawn per example, uniform in [0, max_level], and
  the model is told a; at sampling a is chosen (a sweep). Non-truncated conditioning runs the base to z_0 and then
  draws z_a ~ q(z_a | z_0); truncated conditioning stops the base's reverse process at level a and passes its
  z_a on (CDM, Sec. 4.2 and Alg. 1-2): both have the same distribution when the base is exact.
- Gaussian blur augmentation (CDM, for their higher-resolution stages): the low-resolution image blurred with
  a Gaussian of standard deviation a * max_blur low-resolution pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "gaussian", "blur")


def downsample(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, C, H, W) averaged down to (B, C, size, size)."""
    return F.interpolate(images, size=(size, size), mode="area")


def path_coefficients(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) = (cos, sin)(pi a / 2) of augmentation levels a in [0, 1], each (B,)."""
    angle = 0.5 * math.pi * level.double()
    return torch.cos(angle), torch.sin(angle)


def level_of_sigma(sigma: float | torch.Tensor) -> torch.Tensor:
    """The augmentation level of a VE noise level s: a = (2 / pi) atan(s)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64)) * 2 / math.pi


def sigma_of_level(level: float | torch.Tensor) -> torch.Tensor:
    """The VE noise level s = tan(pi a / 2) of an augmentation level a < 1."""
    return torch.tan(0.5 * math.pi * torch.as_tensor(level, dtype=torch.float64))


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def gaussian_augment(low: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_a = alpha(a) z_0 + sigma(a) eps: a draw of q(z_a | z_0) given eps."""
    alpha, sigma = path_coefficients(level)
    return per_image(alpha, low) * low + per_image(sigma, low) * noise


def truncated_condition(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """z_a from a base model's sampler stopped at VE level s: x / sqrt(1 + s^2) (level a = level_of_sigma(s))."""
    return x / math.sqrt(1 + sigma ** 2)


def gaussian_kernels(std: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2 radius + 1) normalised 1-D Gaussian kernels of standard deviations ``std`` (0: the identity)."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    safe = std.double().clamp(min=1e-12)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None] / safe) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def blur_augment(low: torch.Tensor, level: torch.Tensor, max_blur: float) -> torch.Tensor:
    """Each image blurred by a separable Gaussian of std a * max_blur pixels (reflect padding; a = 0 keeps it)."""
    radius = max(1, math.ceil(3 * max_blur))
    b, c, h, w = low.shape
    kernels = gaussian_kernels(level * max_blur, radius).to(low.dtype)              # (B, K)
    x = low.reshape(1, b * c, h, w)
    weights = kernels.repeat_interleave(c, dim=0)                                   # (B C, K)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), weights[:, None, None, :], groups=b * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), weights[:, None, :, None], groups=b * c)
    return x.reshape(b, c, h, w)


def augment(low: torch.Tensor, kind: str, level: torch.Tensor, noise: torch.Tensor | None = None,
            max_blur: float = 1.0) -> torch.Tensor:
    """The low-resolution conditioning image after augmentation ``kind`` at levels ``level`` (B,)."""
    if kind == "gaussian":
        return gaussian_augment(low, level, noise)
    if kind == "blur":
        return blur_augment(low, level, max_blur)
    if kind == "none":
        return low
    raise ValueError(f"unknown augmentation {kind!r}; choose one of {AUGMENTATIONS}")
