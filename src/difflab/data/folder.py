"""A folder of images (PNG, JPEG, WebP, BMP), resized on the short side and centre-cropped, held as uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from difflab.data.base import InMemoryData
from difflab.errors import DifflabError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 (channels, size, size)."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.Resampling.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise DifflabError(f"{path}: cannot read image ({e})") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def load_image_folder(path, image_size: int = 32, channels: int = 3) -> InMemoryData:
    root = Path(path)
    if not root.is_dir():
        raise DifflabError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DifflabError(f"image folder {root} holds no {'/'.join(sorted(EXTENSIONS))} files")
    images = np.stack([load_image(p, image_size, channels) for p in files])
    return InMemoryData(torch.from_numpy(images), name=f"folder/{root.name}")
