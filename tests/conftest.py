import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))   # 2 cores; helpers pass 1


@pytest.fixture
def image_folder(tmp_path):
    """Eight small RGB images of different sizes in a folder."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        size = (12 + i, 10 + 2 * i)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Tiny 2-D batches: one thread is several times faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
