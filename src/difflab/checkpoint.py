"""Checkpoints: one safetensors file holding model, EMA and optimiser tensors, with the experiment's
config and the training state as JSON in its metadata (and the config also as a readable config.json).

Files are written to a temporary name, flushed to disk and renamed over the old one, so a crash at any
moment leaves the last good checkpoint intact. Nothing is unpickled when loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difflab.config import Config, config_from_json, from_dict, to_dict
from difflab.errors import DifflabError
from difflab.files import atomic_write, write_text

FORMAT = "difflab-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    path: Path
    config: Any                      # the experiment (a ``Config``, or e.g. a classifier experiment)
    state: dict                      # step, images_seen, optimizer param_groups, ...
    tensors: dict[str, torch.Tensor]
    metadata: dict = field(default_factory=dict)   # the file's other JSON records (e.g. "model")
    sha256: str = ""                 # the tensors' checksum as written (verified on load); "" in old files

    def section(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors saved under ``prefix.``, with the prefix removed."""
        start = len(prefix) + 1
        return {k[start:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    @property
    def has_ema(self) -> bool:
        return any(k.startswith("ema.") for k in self.tensors)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding ``checkpoint.safetensors``."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimiser's per-parameter state as flat named tensors, and its param_groups as JSON data."""
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{name}": value.detach().clone().contiguous()
               for index, entries in state["state"].items() for name, value in entries.items()}
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in checkpoint.section("optimizer").items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": checkpoint.state["param_groups"]})


def save_checkpoint(path: str | Path, config: Config | Any, state: dict, model: torch.nn.Module,
                    ema_model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    train_tensors: dict[str, torch.Tensor] | None = None, file_format: str = FORMAT,
                    records: dict | None = None, write_config: bool = True,
                    frozen: dict[str, torch.nn.Module] | None = None) -> Path:
    """``config``: the experiment (a ``Config``, or another experiment dataclass such as a classifier's).
    ``file_format``: the metadata's format tag, which readers check. ``train_tensors``: other training state
    (e.g. the timestep sampler's loss history), saved under ``train.`` (read back with
    ``Checkpoint.section("train")``). ``records``: more JSON-serialisable records for the metadata (the
    model's description under "model"). ``frozen``: modules that belong to the model but are not trained (a
    latent model's autoencoder), saved under ``frozen.NAME.``."""
    path = Path(path)
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"train.{k}": v.detach().contiguous() for k, v in (train_tensors or {}).items()})
    for name, module in (frozen or {}).items():
        tensors.update({f"frozen.{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()})
    if ema_model is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema_model.state_dict().items()})
    state = dict(state)
    if optimizer is not None:
        optim_tensors, state["param_groups"] = optimizer_tensors(optimizer)
        tensors.update(optim_tensors)
    config_json = json.dumps(to_dict(config), indent=1)
    metadata = {"format": file_format, "config": config_json, "state": json.dumps(state),
                "sha256": tensors_digest(tensors),
                **{key: json.dumps(value) for key, value in (records or {}).items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    if write_config:
        write_text(path.with_name("config.json"), config_json + "\n")
    return path


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order: a flipped bit changes it."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        if value.numel():
            digest.update(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_safetensors(path: Path, expected_format: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of a difflab safetensors file, with errors naming the file; the tensors' checksum
    (files written since difflab 0.2) is verified."""
    if not path.is_file():
        raise DifflabError(f"{what} {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DifflabError(f"{path}: not a readable safetensors {what} ({e})") from None
    if metadata.get("format") != expected_format:
        raise DifflabError(f"{path}: not a difflab {what} (metadata format is {metadata.get('format')!r})")
    if "sha256" in metadata and tensors_digest(tensors) != metadata["sha256"]:
        raise DifflabError(f"{path}: corrupt {what} (its tensors do not match the checksum written with them)")
    return tensors, metadata


def read_experiment_file(path: str | Path, file_name: str, file_format: str, what: str,
                         experiment_class: type) -> Checkpoint:
    """A guide's file (noise-aware classifier, CLIP: one safetensors file with the experiment and the training
    state as JSON metadata): its tensors, state and experiment (an ``experiment_class`` in ``Checkpoint.config``).
    ``path`` is the file or the run folder holding ``file_name``."""
    path = Path(path)
    path = path / file_name if path.is_dir() else path
    tensors, metadata = read_safetensors(path, file_format, what)
    try:
        experiment = from_dict(experiment_class, json.loads(metadata["config"]))
        state = json.loads(metadata.get("state", "{}"))
    except (KeyError, json.JSONDecodeError, DifflabError) as e:
        raise DifflabError(f"{path}: missing or invalid {what} config in metadata ({e})") from None
    return Checkpoint(path, experiment, state, tensors)


def load_checkpoint(path: str | Path, file_format: str = FORMAT, config_class: type = Config) -> Checkpoint:
    path = resolve(path)
    tensors, metadata = read_safetensors(path, file_format, "checkpoint")
    config = config_from_json(metadata.get("config", ""), f"{path} (config)", config_class)
    records = {}
    for key in set(metadata) - {"format", "config", "sha256"}:
        try:
            records[key] = json.loads(metadata[key])
        except json.JSONDecodeError as e:
            raise DifflabError(f"{path}: corrupt {key!r} record in metadata ({e})") from None
    state = records.pop("state", None)
    if not isinstance(state, dict) or not isinstance(state.get("step", 0), int) or state.get("step", 0) < 0:
        raise DifflabError(f"{path}: missing or corrupt training state in metadata (the step must be an integer)")
    return Checkpoint(path, config, state, tensors, records, metadata.get("sha256", ""))


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint, prefix: str) -> None:
    """Load ``prefix`` (model or ema) weights, with an error naming the checkpoint on any mismatch."""
    weights = checkpoint.section(prefix)
    if not weights:
        raise DifflabError(f"{checkpoint.path}: holds no '{prefix}' weights")
    bad = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise DifflabError(f"{checkpoint.path}: {prefix} weights hold nan or inf ({bad[0]}, ...)")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DifflabError(f"{checkpoint.path}: {prefix} weights do not fit the network of its config "
                           f"({' '.join(first[:2])[:300]})") from None
