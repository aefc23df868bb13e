"""Networks only: they map (x, t, y) to an output and know nothing of diffusion."""

from difflab.nets.autoencoder import Autoencoder, AutoencoderConfig
from difflab.nets.dit import DiT, DiTConfig
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.noisy_classifier import NoisyClassifier, NoisyClassifierConfig
from difflab.nets.unet import UNet, UNetConfig, UNetEncoder

__all__ = ["Autoencoder", "AutoencoderConfig", "DiT", "DiTConfig", "MLP", "MLPConfig", "NoisyClassifier", "NoisyClassifierConfig", "UNet", "UNetConfig", "UNetEncoder"]
