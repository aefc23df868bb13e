"""Data sets: Fashion-MNIST, image folders and 2-D toy sets, all held in memory (``InMemoryData``)."""

from difflab.data.base import InMemoryData, to_uint8_images
from difflab.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from difflab.data.folder import load_image_folder
from difflab.data.toy import TOY_SETS, load_toy

__all__ = ["CLASS_NAMES", "InMemoryData", "TOY_SETS", "load_fashion_mnist", "load_image_folder", "load_toy",
           "to_uint8_images"]
