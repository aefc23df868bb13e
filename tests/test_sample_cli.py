"""``difflab sample`` around a class-conditional image model: classes by name, grid layout, one PNG per
sample; ``difflab --version``."""

import numpy as np
import pytest
from PIL import Image

from difflab import __version__
from difflab.cli import main
from test_classifier_guidance import fake_fashion_mnist  # noqa: F401  (a fixture)


@pytest.fixture
def conditional_run(fake_fashion_mnist, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    code = main(["train", "configs/fashion_mnist.yaml", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", "data.conditional=true", "--set", f"train.out_dir={out}", "--set", "train.steps=2",
                 "--set", "train.max_minutes=null", "--set", "train.batch_size=8", "--set",
                 "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1]", "--set",
                 "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1", "--set",
                 "train.sample_every=1000000", "--set", "sample.steps=2"])
    assert code == 0
    return out


def test_classes_by_name_grid_layout_and_one_png_per_sample(conditional_run, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(conditional_run), "--n", "6", "--class", "ankle boot", "--nrow", "3",
                 "--scale", "2", "--each", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as saved:
        assert saved["labels"].tolist() == [9] * 6                      # "Ankle boot" is class 9
    grid = Image.open(out / "samples.png")
    assert grid.size == (2 * (3 * 30 + 2), 2 * (2 * 30 + 2))           # 3 columns x 2 rows of 28 + 2 padding
    singles = sorted((out / "samples").glob("*.png"))
    assert len(singles) == 6 and Image.open(singles[0]).size == (56, 56)
    assert main(["sample", str(conditional_run), "--n", "2", "--class", "7", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(conditional_run), "--n", "2", "--class", "Hat", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'Hat'" in err and "Sneaker" in err
    assert main(["sample", str(conditional_run), "--n", "2", "--class", "10", "--out", str(out)]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"difflab {__version__}"
