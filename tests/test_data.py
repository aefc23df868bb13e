import gzip
import struct

import numpy as np
import pytest
import torch

from difflab.data import TOY_SETS, load_fashion_mnist, load_image_folder, load_toy, to_uint8_images
from difflab.data.fashion_mnist import DEBIAN_PATH, read_idx
from difflab.errors import DifflabError

needs_debian_copy = pytest.mark.skipif(not (DEBIAN_PATH / "t10k-images-idx3-ubyte.gz").exists(),
                                       reason="apt-get install dataset-fashion-mnist (.ci/run installs it)")


@needs_debian_copy
def test_fashion_mnist_from_debian_package():
    test = load_fashion_mnist("test", image_size=32)
    assert test.data.shape == (10000, 1, 32, 32) and test.data.dtype == torch.uint8
    assert sorted(test.labels.unique().tolist()) == list(range(10))
    assert test.data[:, :, :2].max() == 0                         # zero padding around the 28x28 image
    native = load_fashion_mnist("test", image_size=28)
    assert torch.equal(native.data, test.data[:, :, 2:30, 2:30])
    resized = load_fashion_mnist("test", image_size=32, resize="resize")
    assert resized.data.shape == (10000, 1, 32, 32) and resized.data[:, :, :2].max() > 0
    x, y = test.batch(torch.tensor([0, 1]))
    assert x.min() >= -1 and x.max() <= 1 and y.shape == (2,)


def write_idx(path, array):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_user_path(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(5))
    data = load_fashion_mnist("train", path=tmp_path, image_size=28)
    assert np.array_equal(data.data[:, 0].numpy(), images) and data.labels.tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(read_idx(tmp_path / "train-labels-idx1-ubyte.gz"), np.arange(5))


def test_corrupt_idx_file_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DifflabError, match="train-images-idx3-ubyte"):
        load_fashion_mnist("train", path=tmp_path)


def test_image_folder(image_folder):
    data = load_image_folder(image_folder, image_size=8, channels=3)
    assert data.data.shape == (8, 3, 8, 8) and data.data.dtype == torch.uint8
    grey = load_image_folder(image_folder, image_size=8, channels=1)
    assert grey.data.shape == (8, 1, 8, 8)


def test_corrupt_image_is_named(image_folder):
    (image_folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DifflabError, match="broken.png"):
        load_image_folder(image_folder, image_size=8)


@pytest.mark.parametrize("name", sorted(TOY_SETS))
def test_toy_sets_are_seeded_and_unit_scale(name):
    a, b = load_toy(name, 5000, seed=3), load_toy(name, 5000, seed=3)
    assert torch.equal(a.data, b.data) and a.data.shape == (5000, 2)
    assert 0.4 < a.data.std().item() < 1.6


def test_uint8_round_trip():
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = images.float() / 127.5 - 1
    assert torch.equal(to_uint8_images(x), images)
