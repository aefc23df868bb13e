"""Inception-v3 pool3 features (2048-d), the feature space of the standard FID (Heusel et al. 2017),
through a maintained package rather than a copy of the network.

Two packages are supported, tried in this order:

- ``pytorch-fid`` (mseitzer/pytorch-fid): ``InceptionV3`` with the FID weights
  ``pt_inception-2015-12-05-6726825d.pth`` (torchvision Inception3 key names);
- ``torch-fidelity`` (toshas/torch-fidelity): ``FeatureExtractorInceptionV3`` with
  ``weights-inception-2015-12-05-6726825d.pth``.

Both packages need torchvision (and pytorch-fid pins a torch release of its own choosing), and both
would download their weights; here the weights always come from a file the user gives, read with
``torch.load(weights_only=True)`` (tensors only, no pickled code) and handed to the package's own
constructor in place of its download.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import torch

from difflab.errors import DifflabError
from difflab.metrics.features import check_images, file_digest

POOL3_DIM = 2048
INSTALL_HINT = ("pip install pytorch-fid (or torch-fidelity); both need a torchvision built for torch "
                f"{torch.__version__.split('+')[0]}")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A file of tensors, refusing anything that would need unpickling of code."""
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"Inception weights {path} do not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:      # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DifflabError(f"{path}: not a plain file of tensors loadable with weights_only=True ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DifflabError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    return state


@contextlib.contextmanager
def weights_instead_of_download(module, state: dict[str, torch.Tensor]):
    """Make ``module.load_state_dict_from_url`` (the name both packages download through) return ``state``."""
    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = lambda *args, **kwargs: state
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


def build_pytorch_fid(state: dict[str, torch.Tensor]):
    module = importlib.import_module("pytorch_fid.inception")
    with weights_instead_of_download(module, state):
        net = module.InceptionV3([module.InceptionV3.BLOCK_INDEX_BY_DIM[POOL3_DIM]])
    # pytorch-fid takes floats in [0, 1], resizes to 299 and returns a list of (B, 2048, 1, 1) blocks
    return net.eval(), lambda images: net(images.float() / 255.0)[0].flatten(1)


def build_torch_fidelity(state: dict[str, torch.Tensor]):
    module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    with weights_instead_of_download(module, state):
        net = module.FeatureExtractorInceptionV3("inception-v3-compat", [str(POOL3_DIM)])
    # torch-fidelity takes uint8 images and returns one tensor per requested feature
    return net.eval(), lambda images: net(images)[0].flatten(1)


BACKENDS = {"pytorch_fid": build_pytorch_fid, "torch_fidelity": build_torch_fidelity}


class InceptionExtractor:
    """Pool3 features of the FID Inception-v3 from ``weights`` (see the module docstring for which file).

    ``backend`` picks the package; by default the first importable one of ``BACKENDS``.
    Grey images are repeated to three channels.
    """

    def __init__(self, weights: str | Path, backend: str | None = None):
        names = [backend] if backend else list(BACKENDS)
        if backend is not None and backend not in BACKENDS:
            raise DifflabError(f"unknown Inception backend {backend!r}; choose one of {sorted(BACKENDS)}")
        failures = []
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as e:    # not installed, or torchvision failing to import beside this torch
                failures.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            self.net, self._forward = BACKENDS[name](load_state_dict(weights))
            self.backend = name
            self.name = f"inception_pool3-{name}-{file_digest(weights)}"
            return
        raise DifflabError(f"Inception-v3 features need a working FID package ({'; '.join(failures)}): "
                           f"{INSTALL_HINT}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = check_images(images)
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != 3:
            raise DifflabError(f"Inception features need 1- or 3-channel images, got shape {tuple(images.shape)}")
        return {"features": self._forward(images)}
