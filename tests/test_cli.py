"""The command line: a toy run end to end, and one-line errors (exit code 2, no traceback) on bad input."""

import json
import os
import subprocess
import sys

import numpy as np

from difflab.cli import main

SMALL = ["--set", "train.steps=30", "--set", "data.num_points=2000", "--set", "model.mlp.hidden=32",
         "--set", "sample.steps=10", "--quiet"]


def run_cli(*args):
    """difflab in a subprocess, to see exactly what a user sees."""
    return subprocess.run([sys.executable, "-m", "difflab", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_train_sample_info(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "configs/toy.yaml", "--set", f"train.out_dir={out}", *SMALL]) == 0
    assert (out / "checkpoint.safetensors").exists() and (out / "samples" / "final.png").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 30 and "images_per_s" in lines[-1]
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "50", "--steps", "20", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    assert "ema weights" in err
    points = np.load(tmp_path / "s" / "samples.npz")["points"]
    assert points.shape == (50, 2) and np.isfinite(points).all()
    assert main(["info", str(out / "checkpoint.safetensors")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"]["step"] == 30 and info["has_ema"]


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("difflab: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_config_file(tmp_path):
    assert_clean_error(run_cli("train", tmp_path / "nope.yaml"), "nope.yaml", "does not exist")


def test_unknown_config_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  bach_size: 3\n")
    assert_clean_error(run_cli("train", config), "bad.yaml", "train.bach_size")


def test_wrong_value_type(tmp_path):
    assert_clean_error(run_cli("train", "configs/toy.yaml", "--set", "train.batch_size=big"), "train.batch_size")


def test_invalid_yaml(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train: [unclosed\n")
    assert_clean_error(run_cli("train", config), "broken.yaml", "invalid YAML")


def test_missing_and_corrupt_checkpoint(tmp_path):
    assert_clean_error(run_cli("sample", tmp_path / "none.safetensors"), "none.safetensors", "does not exist")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    assert_clean_error(run_cli("sample", corrupt), "corrupt.safetensors")
    assert_clean_error(run_cli("info", corrupt), "corrupt.safetensors")


def test_resume_without_checkpoint(tmp_path):
    assert_clean_error(run_cli("train", "configs/toy.yaml", "--set", f"train.out_dir={tmp_path}/x", "--resume"),
                       "--resume", "does not exist")


def test_corrupt_image_in_folder(tmp_path, image_folder):
    (image_folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 nonsense")
    result = run_cli("train", "configs/fashion_mnist.yaml", "--set", "data.dataset=folder",
                     "--set", f"data.path={image_folder}", "--set", f"train.out_dir={tmp_path}/r")
    assert_clean_error(result, "zz_broken.jpg")


def test_class_on_unconditional_model(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "configs/toy.yaml", "--set", f"train.out_dir={out}", *SMALL[:-1], "--set",
                 "train.steps=2", "--quiet"]) == 0
    assert_clean_error(run_cli("sample", out, "--class", "3"), "not class-conditional")
