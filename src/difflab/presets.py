"""The shipped experiment presets, by name: ``difflab train fashion_mnist`` runs ``configs/fashion_mnist.yaml``.

The YAML files exist once, in the repository's ``configs/``. pyproject.toml maps that folder to the package
``difflab.configs`` (``package-dir``), so a wheel carries them as ``difflab/configs/*.yaml``; a checkout (an
editable install) has no such folder inside ``src/difflab`` and reads the repository's ``configs/`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from difflab.errors import DifflabError


def presets_dir() -> Path:
    """The preset folder: ``difflab/configs`` of an installed wheel, else the checkout's ``configs/``."""
    packaged = Path(__file__).with_name("configs")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "configs"


def presets() -> dict[str, Path]:
    """Preset name (the file's stem) -> YAML file, by name."""
    folder = presets_dir()
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def describe(path: Path) -> str:
    """The first comment line of a preset file: what it is."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(text: str | Path) -> Path:
    """A config argument as a file: an existing file, a path (missing files are load_config's to report), or a
    bare name (no folder, no .yaml/.yml) of a preset."""
    path, text = Path(text), str(text)
    is_path = any(sep and sep in text for sep in (os.sep, os.altsep)) or path.suffix in (".yaml", ".yml")
    if path.is_file() or is_path:
        return path
    known = presets()
    if text not in known:
        raise DifflabError(f"no config file or preset named {text!r}; presets: {', '.join(known) or '(none found)'}")
    return known[text]
