"""``difflab plot``: a run's curves from metrics.jsonl, one panel per logged series."""

import json

import pytest
from PIL import Image

from difflab.errors import DifflabError
from difflab.pipelines.plot import HEIGHT, plot_run, series


def write_metrics(folder, records):
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_one_panel_per_logged_series(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, [{"step": s, "loss": 1 / s, "lr": 1e-3, "images_per_s": 100 + s} for s in range(1, 30)])
    image = Image.open(plot_run(run))
    assert image.size[1] == 3 * HEIGHT                      # loss, lr, throughput
    write_metrics(run, [{"step": 5, "loss": 0.2, "lr": 1e-3, "images_per_s": 90},
                        {"step": 5, "eval_fid": 12.0, "eval_samples": 100}, {"step": 10, "eval_fid": 8.0}])
    assert Image.open(plot_run(run, tmp_path / "c.png")).size[1] == 4 * HEIGHT


def test_log_scale_series_drop_non_positive_and_non_finite_values():
    records = [{"step": 1, "loss": 0.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5}, {"lr": 1}]
    assert series(records, "loss", log=True) == [(3.0, 0.5)]
    assert series(records, "loss", log=False) == [(1.0, 0.0), (3.0, 0.5)]


def test_a_folder_without_metrics_is_one_clear_error(tmp_path):
    with pytest.raises(DifflabError, match="metrics.jsonl does not exist"):
        plot_run(tmp_path)
    write_metrics(tmp_path, [{"step": 1, "other": 2}])
    with pytest.raises(DifflabError, match="no loss"):
        plot_run(tmp_path)


def test_difflab_plot_from_the_command_line(tmp_path, capsys):
    from difflab.cli import main

    write_metrics(tmp_path, [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}])
    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").is_file()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_csv_log_beside_metrics_jsonl_keeps_its_columns_on_resume(tmp_path):
    import csv

    from difflab.cli import main

    out = tmp_path / "toy"
    args = ["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={out}", "--set", "train.csv_log=true",
            "--set", "train.log_every=2", "--set", "train.sample_every=1000"]
    assert main([*args, "--set", "train.steps=4"]) == 0
    assert main([*args, "--set", "train.steps=6", "--resume"]) == 0
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in jsonl if "loss" in r] == [2, 4, 6]
    assert float(rows[-1]["loss"]) == pytest.approx(jsonl[-1]["loss"])


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    """train.tensorboard: every logged number reaches TensorBoard at its step, a resumed run included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from difflab.cli import main

    out = tmp_path / "toy"
    args = ["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={out}", "--set", "train.tensorboard=true",
            "--set", "train.log_every=2", "--set", "train.sample_every=1000"]
    assert main([*args, "--set", "train.steps=4"]) == 0
    assert main([*args, "--set", "train.steps=6", "--resume"]) == 0
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    scalars = {}
    for events in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    assert [step for step, _ in scalars["loss"]] == [r["step"] for r in jsonl] == [2, 4, 6]
    for (_, value), record in zip(scalars["loss"], jsonl):
        assert value == pytest.approx(record["loss"], rel=1e-6)
    assert {"lr", "images_per_s"} <= set(scalars)


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import sys

    from difflab.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)        # import fails as if not installed
    code = main(["train", "configs/toy.yaml", "--quiet", "--set", f"train.out_dir={tmp_path / 'toy'}",
                 "--set", "train.tensorboard=true", "--set", "train.steps=2"])
    assert code == 2
    assert "pip install 'difflab[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "toy" / "model.safetensors").exists()
