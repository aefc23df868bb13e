"""A folder of images (PNG, JPEG, WebP, BMP), resized on the short side and centre-cropped, held as uint8.

When every image sits in a subfolder of the root (``root/Sneaker/*.png``, ``root/Boot/*.png``), the
subfolders are the classes: labels are their indices in sorted order and their names are the class names
(``data.conditional: true`` then trains a class-conditional model, ``difflab sample --class Boot``).
``data.stream: true`` reads them from disk for every batch instead (``StreamedImageFolder``).
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


def folder_index(path) -> tuple[list[Path], torch.Tensor | None, tuple[str, ...]]:
    """The folder's image files (sorted), and their labels and class names when every image sits in a
    subfolder (None and () otherwise)."""
    root = Path(path)
    if not root.is_dir():
        raise DifflabError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not files:
        raise DifflabError(f"image folder {root} holds no {'/'.join(sorted(EXTENSIONS))} files")
    if any(p.parent == root for p in files):                     # images at the top level: no classes
        return files, None, ()
    names = sorted({p.relative_to(root).parts[0] for p in files})
    return files, torch.tensor([names.index(p.relative_to(root).parts[0]) for p in files]), tuple(names)


def load_image_folder(path, image_size: int = 32, channels: int = 3) -> InMemoryData:
    files, labels, names = folder_index(path)
    images = torch.from_numpy(np.stack([load_image(p, image_size, channels) for p in files]))
    return InMemoryData(images, labels, num_classes=len(names) or None, name=f"folder/{Path(path).name}",
                        class_names=names)


class StreamedImageFolder:
    """The images of a folder read from disk batch by batch, for data sets larger than memory
    (``data.stream: true``): the same files, order, labels and pixels as ``load_image_folder``, so the same
    batches (tested), at the cost of decoding every image each time it is drawn."""

    is_image = True

    def __init__(self, path, image_size: int = 32, channels: int = 3):
        self.files, self.labels, self.class_names = folder_index(path)
        self.num_classes = len(self.class_names) or None
        self.image_size, self.channels, self.name = image_size, channels, f"folder/{Path(path).name}"

    def __len__(self) -> int:
        return len(self.files)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``InMemoryData.batch``: images scaled to [-1, 1] and their labels."""
        images = np.stack([load_image(self.files[i], self.image_size, self.channels) for i in indices.tolist()])
        x = torch.from_numpy(images).float() / 127.5 - 1.0
        return x, self.labels[indices] if self.labels is not None else None
