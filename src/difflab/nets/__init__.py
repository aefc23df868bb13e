"""Networks only: they map (x, t, y) to an output and know nothing of diffusion."""

from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, UNetConfig

__all__ = ["MLP", "MLPConfig", "UNet", "UNetConfig"]
