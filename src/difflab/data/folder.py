"""A folder of images (PNG, JPEG, WebP, BMP), resized on the short side and centre-cropped, held as uint8.

When every image sits in a subfolder of the root (``root/Sneaker/*.png``, ``root/Boot/*.png``), the
subfolders are the classes: labels are their indices in sorted order and their names are the class names
(``data.conditional: true`` then trains a class-conditional model, ``difflab sample --class Boot``).
"""

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
    images = torch.from_numpy(np.stack([load_image(p, image_size, channels) for p in files]))
    if any(p.parent == root for p in files):                     # images at the top level: no classes
        return InMemoryData(images, name=f"folder/{root.name}")
    names = sorted({p.relative_to(root).parts[0] for p in files})
    labels = torch.tensor([names.index(p.relative_to(root).parts[0]) for p in files])
    return InMemoryData(images, labels, num_classes=len(names), name=f"folder/{root.name}",
                        class_names=tuple(names))
