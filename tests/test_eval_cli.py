"""``difflab eval``: a tiny (untrained) Fashion-MNIST checkpoint sampled and scored end to end, saved samples
scored, bits/dim added, and one-line errors on bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from difflab.build import build_data, build_model
from difflab.checkpoint import save_checkpoint
from difflab.cli import main
from difflab.config import load_config
from difflab.data import load_fashion_mnist

TINY_UNET = ["model.unet.model_channels=8", "model.unet.channel_mult=[1]", "model.unet.num_res_blocks=1",
             "model.unet.attention_resolutions=[]", "model.unet.num_heads=1", "diffusion.timesteps=50"]


def save_untrained(path, config, state):
    """A checkpoint of the config's freshly initialised model, with its model description."""
    denoiser, spec = build_model(config, build_data(config.data))
    return save_checkpoint(path, config, state, denoiser.net, records={"model": spec.to_json()})


def tiny_checkpoint(folder, *overrides):
    config = load_config(None, ["data.dataset=fashion_mnist", *TINY_UNET, *overrides])
    return save_untrained(folder / "checkpoint.safetensors", config, {"step": 7})


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One statistics cache for the whole module: the test set's features are computed once."""
    return tmp_path_factory.mktemp("stats")


def run_eval(capsys, *args):
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_checkpoint_writes_a_report_beside_it(tmp_path, cache_dir, capsys):
    # the config's sampler is used (SampleConfig's default is no longer ancestral: set it)
    checkpoint = tiny_checkpoint(tmp_path, "data.conditional=true", "sample.sampler=ancestral")
    code, out, err = run_eval(capsys, checkpoint, "--n", 20, "--steps", 3, "--cache-dir", cache_dir,
                              "--nll", 2, "--save-samples", tmp_path / "drawn.npz")
    assert code == 0, err
    report_path = tmp_path / "eval_ancestral_3steps_n20.json"
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    for key in ("fid", "kid", "kid_std", "precision", "recall", "is_score", "class_accuracy", "bits_per_dim"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert json.loads(out) == metrics
    assert report["step"] == 7 and report["n"] == 20 and report["sampling"]["steps"] == 3
    assert report["classifier_test_accuracy"] >= 0.92 and report["features"].startswith("fmnist_classifier-")
    assert metrics["nll_images"] == 2 and metrics["bits_per_dim"] > 0
    assert [p.name for p in cache_dir.iterdir() if "32px" in p.name]
    drawn = np.load(tmp_path / "drawn.npz")
    assert drawn["images"].shape == (20, 32, 32, 1) and list(drawn["labels"][:3]) == [0, 1, 2]


def test_eval_saved_samples(tmp_path, cache_dir, capsys):
    # Real training images score far better than uniform noise.
    real = load_fashion_mnist("train", image_size=32)
    np.savez(tmp_path / "real.npz", images=real.data[:300].permute(0, 2, 3, 1).numpy(),
             labels=real.labels[:300].numpy())
    noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", images=noise)
    assert run_eval(capsys, "--samples", tmp_path / "real.npz", "--cache-dir", cache_dir)[0] == 0
    assert run_eval(capsys, "--samples", tmp_path / "noise.npz", "--cache-dir", cache_dir)[0] == 0
    real_report = json.loads((tmp_path / "real_eval.json").read_text())["metrics"]
    noise_report = json.loads((tmp_path / "noise_eval.json").read_text())["metrics"]
    assert real_report["fid"] < 0.1 * noise_report["fid"]
    # noise collapses to one point of feature space: recall 0 (precision alone can be fooled by that)
    assert real_report["recall"] > 0.5 > noise_report["recall"]
    assert real_report["is_score"] > 3 > noise_report["is_score"]
    assert real_report["class_accuracy"] > 0.9 and "class_accuracy" not in noise_report


def one_line_error(capsys, *args):
    code, _, err = run_eval(capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("difflab: error:"), err
    return lines[0]


def test_eval_bad_input(tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, "--samples", tmp_path / "none.npz")
    np.savez(tmp_path / "keys.npz", pictures=np.zeros((4, 28, 28, 1), np.uint8))
    assert "no 'images'" in one_line_error(capsys, "--samples", tmp_path / "keys.npz")
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 28, 28, 1), np.float32))
    assert "uint8" in one_line_error(capsys, "--samples", tmp_path / "float.npz")
    np.savez(tmp_path / "rgb.npz", images=np.zeros((8, 28, 28, 3), np.uint8))
    assert "grey" in one_line_error(capsys, "--samples", tmp_path / "rgb.npz")
    np.savez(tmp_path / "big.npz", images=np.zeros((8, 64, 64, 1), np.uint8))
    assert "64" in one_line_error(capsys, "--samples", tmp_path / "big.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    assert "text.npz" in one_line_error(capsys, "--samples", tmp_path / "text.npz")
    assert "either a checkpoint or --samples" in one_line_error(capsys)
    assert "--nll needs a checkpoint" in one_line_error(capsys, "--samples", tmp_path / "real.npz", "--nll", 3)
    toy = load_config("configs/toy.yaml", ["train.steps=1"])
    save_untrained(tmp_path / "toy" / "checkpoint.safetensors", toy, {"step": 1})
    assert "'toy'" in one_line_error(capsys, tmp_path / "toy")


def test_eval_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "difflab", "eval", "--samples", str(tmp_path / "x.npz")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"difflab: error: samples file {tmp_path / 'x.npz'} does not exist"]


def test_training_scores_its_previews_when_asked(tmp_path, cache_dir, capsys, monkeypatch):
    """train.eval_samples: every preview also logs FID/KID/precision/recall of that many samples."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(cache_dir.parent))
    out = tmp_path / "run"
    settings = [f"train.out_dir={out}", "train.steps=4", "train.sample_every=2", "train.eval_samples=12",
                "train.num_sample_images=4", "train.max_minutes=null", "train.batch_size=8", "sample.steps=2",
                *TINY_UNET]
    assert main(["train", "configs/fashion_mnist.yaml", "--quiet", *sum((["--set", s] for s in settings), [])]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval_fid" in r]
    assert [r["step"] for r in scored] == [2, 4, 4]                  # steps 2 and 4, and the final preview
    assert all(np.isfinite(r["eval_fid"]) and r["eval_samples"] == 12 for r in scored)
    capsys.readouterr()
    assert main(["train", "configs/toy.yaml", "--set", f"train.out_dir={tmp_path / 'toy'}", "--set",
                 "train.eval_samples=12", "--set", "train.steps=1"]) == 2
    assert "train.eval_samples" in capsys.readouterr().err


def test_eval_against_an_own_reference_folder(tmp_path, cache_dir, capsys):
    """Samples that are the reference folder's own images score FID ~0; other images score worse."""
    from PIL import Image

    train = load_fashion_mnist("train", image_size=28)
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(200):
        Image.fromarray(train.data[i, 0].numpy()).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "same.npz", images=train.data[:200].permute(0, 2, 3, 1).numpy())
    np.savez(tmp_path / "other.npz", images=train.data[1000:1200].permute(0, 2, 3, 1).numpy())
    for name in ("same", "other"):
        assert run_eval(capsys, "--samples", tmp_path / f"{name}.npz", "--reference", folder,
                        "--cache-dir", cache_dir)[0] == 0
    same = json.loads((tmp_path / "same_eval.json").read_text())
    other = json.loads((tmp_path / "other_eval.json").read_text())
    assert same["metrics"]["fid"] < 1e-6 < other["metrics"]["fid"]
    assert str(folder) in same["reference"]
    assert "--nll" in one_line_error(capsys, "--samples", tmp_path / "same.npz", "--reference", folder, "--nll", 3)
    assert "Inception" in one_line_error(capsys, "--samples", tmp_path / "same.npz", "--inception-weights",
                                         tmp_path / "missing.pth")
