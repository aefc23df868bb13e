"""Presets by name (``difflab train fashion_mnist``), ``difflab presets``, the wheel that ships them, and help
texts that show each option's default."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from difflab.cli import build_parser, main
from difflab.config import load_config
from difflab.presets import presets, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_preset_name_is_the_configs_file():
    assert resolve_config("fashion_mnist").resolve() == (ROOT / "configs" / "fashion_mnist.yaml").resolve()
    assert load_config(resolve_config("fmnist_latent")) == load_config(ROOT / "configs" / "fmnist_latent.yaml")
    assert sorted(presets()) == sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))


def test_files_and_paths_are_not_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").write_text("name: mine\n")                     # an existing file wins over the preset
    assert resolve_config("toy") == Path("toy")
    for text in ("nope.yaml", "sub/toy", "toy.yml"):                   # paths are load_config's to report
        assert resolve_config(text) == Path(text)


def test_presets_command_lists_names_and_first_comment(capsys):
    assert main(["presets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert {"fashion_mnist", "fmnist_latent", "toy"} <= set(lines)
    assert "Latent diffusion on Fashion-MNIST" in lines["fmnist_latent"]


def test_unknown_preset_is_one_line_exit_2(capsys):
    assert main(["train", "fashoin_mnist"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("difflab: error: no config file or preset named 'fashoin_mnist'; "
                                               "presets: "), err
    assert "fashion_mnist, " in err[0] and "fmnist_latent" in err[0]
    assert main(["train-classifier", "nope"]) == 2
    assert "no config file or preset named 'nope'" in capsys.readouterr().err


def help_of(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    return " ".join(capsys.readouterr().out.split())                  # unwrapped


def test_help_shows_defaults(capsys):
    sample = help_of("sample", capsys)
    assert "number of samples (default: 64)" in sample and "(default: 0.6)" in sample
    assert "--weights {ema,model} the checkpoint's EMA weights or its raw model weights (default: ema)" in sample
    assert "keeps the value in the checkpoint's config" in sample
    assert "number of samples to draw (default: 10000)" in help_of("eval", capsys)
    assert "preset" in help_of("train", capsys)
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:                       # no junk defaults from unset options and flags
        text = help_of(command, capsys)
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text


def test_pyproject_lists_every_package():
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {".".join(init.parent.relative_to(ROOT / "src").parts) for init in (ROOT / "src").rglob("__init__.py")}
    assert set(listed) == found | {"difflab.configs"}


def test_wheel_ships_the_presets(tmp_path):
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    shutil.copytree(ROOT / "configs", source / "configs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, capture_output=True)
    wheel, = (tmp_path / "wheel").glob("difflab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"difflab/configs/{path.name}" for path in (ROOT / "configs").glob("*.yaml")} <= names
    assert "difflab/presets.py" in names and "difflab/assets/fmnist_classifier.safetensors" in names
