"""Fashion-MNIST (Xiao et al. 2017) from its IDX files.

Where the files are looked for, in order: the ``path`` given, ``$DIFFLAB_DATA`` (the folder itself or its
``fashion-mnist`` subfolder), Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist), and
the user cache; when none has them and ``download`` is set, they are fetched from the official mirror
into the cache. Plain or gzipped files are accepted.
"""

from __future__ import annotations

import gzip
import os
import struct
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from difflab.data.base import InMemoryData
from difflab.errors import DifflabError
from difflab.superres import downsample

DEBIAN_PATH = Path("/usr/share/datasets/fashion-mnist")
CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab" / "fashion-mnist"
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic 0x0000TTNN, NN big-endian int32 sizes, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code not in IDX_DTYPES:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=IDX_DTYPES[dtype_code], offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, ValueError, EOFError, struct.error) as e:
        raise DifflabError(f"{path}: not a valid IDX file ({e})") from None


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_folders(path: str | os.PathLike | None) -> list[Path]:
    folders = []
    if path:
        folders.append(Path(path))
    if os.environ.get("DIFFLAB_DATA"):
        root = Path(os.environ["DIFFLAB_DATA"])
        folders += [root, root / "fashion-mnist"]
    return folders + [DEBIAN_PATH, CACHE_PATH]


def download(folder: Path = CACHE_PATH) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stems in FILES.values():
        for stem in stems:
            target = folder / (stem + ".gz")
            if not target.exists():
                tmp = target.with_suffix(".part")
                urllib.request.urlretrieve(MIRROR + stem + ".gz", tmp)
                tmp.replace(target)


def locate(split: str, path=None, allow_download: bool = False) -> tuple[Path, Path]:
    if split not in FILES:
        raise DifflabError(f"unknown Fashion-MNIST split {split!r}; choose 'train' or 'test'")
    image_stem, label_stem = FILES[split]
    for folder in candidate_folders(path):
        images, labels = _find(folder, image_stem), _find(folder, label_stem)
        if images and labels:
            return images, labels
    if path and not Path(path).exists():
        raise DifflabError(f"Fashion-MNIST path {path} does not exist")
    if allow_download:
        try:
            download()
        except OSError as e:
            raise DifflabError(f"Fashion-MNIST not found and download failed ({e})") from None
        return _find(CACHE_PATH, image_stem), _find(CACHE_PATH, label_stem)
    searched = ", ".join(str(f) for f in candidate_folders(path))
    raise DifflabError(f"Fashion-MNIST {split} files not found in: {searched} "
                       "(apt-get install dataset-fashion-mnist, or set data.download: true)")


def resize_images(images: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (N, C, h, w) to (N, C, size, size): zero-pad around the centre, resize (antialiased bilinear), or
    average blocks (``area``: the downsampler of cascades, for a base model of their low resolution)."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if size < max(h, w):
            raise DifflabError(f"cannot pad {h}x{w} images to {size}x{size}; use data.resize: resize")
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top))
    if mode == "resize":
        out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return out.round().clamp(0, 255).to(torch.uint8)
    if mode == "area":                      # a cascade's downsampler (difflab.superres.downsample): block means
        if h % size or w % size:
            raise DifflabError(f"data.resize 'area' averages whole blocks: {size} must divide {h}x{w}")
        return downsample(images.float(), size).round().clamp(0, 255).to(torch.uint8)
    raise DifflabError(f"unknown resize mode {mode!r}; choose 'pad', 'resize' or 'area'")


def load_fashion_mnist(split: str = "train", path=None, image_size: int = 32, resize: str = "pad",
                       allow_download: bool = False) -> InMemoryData:
    image_file, label_file = locate(split, path, allow_download)
    images = torch.from_numpy(read_idx(image_file).copy())[:, None]      # (N, 1, 28, 28) uint8
    labels = torch.from_numpy(read_idx(label_file).astype(np.int64))
    if images.ndim != 4 or len(images) != len(labels):
        raise DifflabError(f"{image_file}: expected N 28x28 images matching {len(labels)} labels, "
                           f"got shape {tuple(images.shape)}")
    return InMemoryData(resize_images(images, image_size, resize), labels, num_classes=10,
                        name=f"fashion_mnist/{split}", class_names=CLASS_NAMES)
