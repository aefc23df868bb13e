"""Control images ("hints") computed from images, for ControlNet (Zhang et al. 2023, Sec. 4 and App.: Canny
edges, segmentation-like masks, user sketches); each maps images in [-1, 1] (B, C, H, W) to hints in [0, 1]
(B, 1, H, W), one image at a time and deterministically, so a training step can compute them on the fly:

- ``canny``: Canny's edge detector (scikit-image) on the grey image scaled to [0, 1], Gaussian ``sigma``, the
  hysteresis thresholds scikit-image chooses for float images (10% and 20% of the maximum), as {0, 1};
- ``silhouette``: the pixels brighter than ``threshold`` (of the [0, 1] grey range), holes filled, as {0, 1};
- ``sketch``: the grey image averaged over ``factor`` x ``factor`` blocks and enlarged back (nearest), a coarse
  impression of shapes and shading (the image size must be divisible by ``factor``).

scikit-image (and SciPy, which it brings) is an optional dependency: ``pip install difflab[control]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError

HINTS = ("canny", "silhouette", "sketch")
LUMA = (0.299, 0.587, 0.114)     # ITU-R BT.601 weights of R, G, B


@dataclass(frozen=True)
class HintOptions:
    kind: str = "canny"                 # canny | silhouette | sketch
    canny_sigma: float = 1.0            # canny: the Gaussian smoothing before the gradients
    silhouette_threshold: float = 0.05  # silhouette: grey level (in [0, 1]) above which a pixel is the object
    sketch_factor: int = 4              # sketch: block size of the low-resolution image

    @classmethod
    def of(cls, source) -> "HintOptions":
        """The options of anything that names them: a ``ControlConfig``, or a model's ``ControlImage``."""
        return cls(source.hint, source.canny_sigma, source.silhouette_threshold, source.sketch_factor)

    def check(self, image_size: int | None = None) -> None:
        if self.kind not in HINTS:
            raise DifflabError(f"unknown control hint {self.kind!r}; choose one of {', '.join(HINTS)}")
        if self.canny_sigma < 0 or not 0 <= self.silhouette_threshold < 1 or self.sketch_factor < 1:
            raise DifflabError(f"control hint options out of range: canny_sigma {self.canny_sigma} (at least 0), "
                               f"silhouette_threshold {self.silhouette_threshold} (in [0, 1)), sketch_factor "
                               f"{self.sketch_factor} (at least 1)")
        if self.kind == "sketch" and image_size is not None and image_size % self.sketch_factor:
            raise DifflabError(f"control sketch_factor {self.sketch_factor} must divide the image size {image_size}")


def grey(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (B, C, H, W) as grey levels in [0, 1], float64 (B, H, W)."""
    x = (images.detach().double().cpu().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 3:
        x = sum(w * x[:, c] for c, w in enumerate(LUMA))[:, None]
    elif x.shape[1] != 1:
        raise DifflabError(f"control hints need grey or RGB images, got {x.shape[1]} channels")
    return x[:, 0].numpy()


def canny_edges(images: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    from skimage.feature import canny

    edges = np.stack([canny(image, sigma=sigma) for image in grey(images)])
    return torch.from_numpy(edges).float()[:, None]


def silhouettes(images: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    from scipy.ndimage import binary_fill_holes

    masks = np.stack([binary_fill_holes(image > threshold) for image in grey(images)])
    return torch.from_numpy(masks).float()[:, None]


def sketches(images: torch.Tensor, factor: int = 4) -> torch.Tensor:
    x = torch.from_numpy(grey(images)).float()[:, None]
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


def make_hints(images: torch.Tensor, options: HintOptions) -> torch.Tensor:
    """The hints of ``options.kind`` for images in [-1, 1] (B, C, H, W): (B, 1, H, W) in [0, 1], on the CPU."""
    options.check(images.shape[-1])
    try:
        if options.kind == "canny":
            return canny_edges(images, options.canny_sigma)
        if options.kind == "silhouette":
            return silhouettes(images, options.silhouette_threshold)
    except ImportError:
        raise DifflabError(f"control hint {options.kind!r} needs scikit-image: pip install 'difflab[control]'") from None
    return sketches(images, options.sketch_factor)
