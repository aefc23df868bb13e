"""Text-to-image through the core interface (issue #18): captions as a ``Caption`` record field, a ``TextUNet``
(GLIDE's jointly trained transformer or the frozen MiniLM) reading them by cross-attention and in the time
embedding, the empty caption the same null condition in training (dropout) and sampling (guidance)."""

from __future__ import annotations

import json

import torch

from difflab.conditioning import CAPTION_FIELD, Caption, Cond, drop_conditions, with_null
from difflab.denoiser import Denoiser, VPPrecond
from difflab.guidance import ClassifierFreeGuidance
from difflab.nets.registry import load_network, resolve_network
from difflab.schedules import NoiseSchedule

GLIDE = {"kind": "glide", "width": 32, "layers": 1, "heads": 2, "max_length": 24}
UNET = {"model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
        "num_heads": 2, "groups": 8}


def tiny_text_unet(encoder: dict = GLIDE):
    options = resolve_network("text_unet", {"text_encoder": encoder, "unet": UNET}, (1, 8, 8), 1, None)
    net = load_network("text_unet", options)
    torch.manual_seed(0)
    with torch.no_grad():                                  # wake the zero-initialised layers
        for p in net.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net, options


def caption_field(net, dropout: float = 0.2) -> Caption:
    null = net.tokenize([""])[0]
    return Caption(CAPTION_FIELD, dropout, len(null), tuple(null.tolist()))


class Recorder(torch.nn.Module):
    """Wraps a network and keeps the caption tokens of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t, cond=None):
        self.seen.append(cond[CAPTION_FIELD].clone())
        return self.net(x, t, cond)


def test_the_fitted_unet_attends_to_the_encoders_tokens_and_adds_its_pooled_vector():
    net, options = tiny_text_unet()
    unet = options["unet"]
    assert unet["cross_attention"] and unet["context_dim"] == GLIDE["width"] == unet["pooled_dim"]
    assert net.consumes == (CAPTION_FIELD,)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    tokens = net.tokenize(["a dark sneaker", "a bright bag"])
    out = net(x, t, Cond(caption=tokens))
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, t, Cond(caption=net.tokenize(["a bright bag", "a dark sneaker"]))))


def test_padding_tokens_do_not_change_the_output():
    """A caption padded to the model's length and the same caption with no padding at all give the same
    denoiser output: padded positions are masked in the text encoder and in the U-Net's cross-attention."""
    for encoder in (GLIDE, {"kind": "minilm", "max_length": 16}):
        net, _ = tiny_text_unet(encoder)
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([250.0, 40.0])
        tokens = net.tokenize(["a plain shirt", "a plain shirt"])
        length = int((tokens[0] != 0).sum())
        assert length < tokens.shape[1]
        torch.testing.assert_close(net(x, t, Cond(caption=tokens[:, :length])), net(x, t, Cond(caption=tokens)),
                                   rtol=1e-5, atol=1e-6)


def test_the_null_caption_is_the_same_in_training_and_in_guidance():
    """Dropout in training and the unconditional pass of classifier-free guidance both feed the empty caption's
    tokens, those the network makes of "" itself; no caption at all means the same."""
    net, _ = tiny_text_unet()
    field = caption_field(net)
    empty = net.tokenize([""])
    tokens = net.tokenize(["a dark ankle boot", "a small bag", "a light dress", "a patterned shirt"])

    dropped = drop_conditions(Cond(caption=tokens), {CAPTION_FIELD: Caption(CAPTION_FIELD, 1.0, field.max_length,
                                                                            field.null_tokens)},
                              torch.Generator().manual_seed(0))
    assert torch.equal(dropped[CAPTION_FIELD], empty.expand(4, -1))

    recorder = Recorder(net)
    schedule = NoiseSchedule.from_name("cosine", 1000)
    denoiser = Denoiser(recorder, VPPrecond(schedule, "v"), {CAPTION_FIELD: field})
    ClassifierFreeGuidance(denoiser, 2.0)(torch.randn(4, 1, 8, 8), 1.0, Cond(caption=tokens))
    passed = torch.cat(recorder.seen)
    assert any(torch.equal(passed[i:i + 4], empty.expand(4, -1)) for i in range(0, len(passed), 4))
    assert any(torch.equal(passed[i:i + 4], tokens) for i in range(0, len(passed), 4))
    nulled = with_null(Cond(caption=tokens), {CAPTION_FIELD: field})
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0)
    torch.testing.assert_close(net(x, t, nulled), net(x, t, None), rtol=0, atol=0)


def test_gradients_train_the_glide_encoder_with_the_unet():
    net, _ = tiny_text_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 900.0])
    net(x, t, Cond(caption=net.tokenize(["a bag", "a boot"]))).square().mean().backward()
    assert all(p.grad is not None for p in net.text_encoder.parameters())


# -- from the command line ------------------------------------------------------------------------------------
from test_classifier_guidance import fake_fashion_mnist  # noqa: E402,F401  (a fixture)

TINY = ["--set", "train.steps=3", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
        "--set", "model.text_unet.unet.model_channels=8", "--set", "model.text_unet.unet.channel_mult=[1, 2]",
        "--set", "model.text_unet.unet.attention_resolutions=[14]", "--set", "model.text_unet.unet.num_heads=1",
        "--set", "model.text_unet.unet.groups=8", "--set", "train.num_sample_images=4", "--set", "sample.steps=2"]


def test_train_and_sample_with_prompts_from_the_command_line(fake_fashion_mnist, tmp_path, capsys):  # noqa: F811
    import numpy as np

    from difflab.cli import main

    run = tmp_path / "glide"
    assert main(["train", "fmnist_text_glide", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", f"train.out_dir={run}", *TINY]) == 0
    assert (run / "samples" / "final.png").is_file()
    assert len((run / "samples" / "final.txt").read_text().splitlines()) == 4          # the preview's captions

    def draw(*prompts: str, name: str, guidance: str = "2") -> np.ndarray:
        args = ["sample", str(run), "--n", "4", "--guidance", guidance, "--out", str(tmp_path), "--name", name,
                "--weights", "model"]                          # after 3 steps the EMA is still the zero output
        assert main(args + [item for p in prompts for item in ("--prompt", p)]) == 0
        with np.load(tmp_path / f"{name}.npz") as saved:
            return saved["images"]

    boots = draw("a dark ankle boot", name="a")
    assert np.array_equal(boots, draw("a dark ankle boot", name="b"))                  # seeded
    assert not np.array_equal(boots, draw("a bright bag", name="c"))
    mixed = draw("a dark ankle boot", "a bright bag", name="d")                         # taken in turn
    assert np.array_equal(mixed[0::2], boots[0::2])
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--prompt", "a bag", "--class", "Bag", "--out", str(tmp_path)]) == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_prompt_on_a_class_model_is_one_clear_error(fake_fashion_mnist, tmp_path, capsys):  # noqa: F811
    from difflab.cli import main

    run = tmp_path / "plain"
    assert main(["train", "configs/fashion_mnist.yaml", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", f"train.out_dir={run}", "--set", "train.steps=1", "--set", "train.max_minutes=null",
                 "--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1]", "--set",
                 "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1",
                 "--set", "train.sample_every=1000000", "--set", "sample.steps=2"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--prompt", "a bag", "--out", str(tmp_path)]) == 2
    assert "not a text-to-image model" in capsys.readouterr().err


def test_frozen_minilm_run_caches_the_caption_embeddings(fake_fashion_mnist, tmp_path):  # noqa: F811
    """Imagen-style: the data's captions encoded once into RUN/text_embeddings.safetensors, which a resumed run
    reuses; the checkpoint holds no MiniLM weights."""
    from safetensors import safe_open

    from difflab.cli import main

    run = tmp_path / "minilm"
    args = ["train", "fmnist_text_minilm", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
            "--set", f"train.out_dir={run}", *TINY]
    assert main(args) == 0
    cache = run / "text_embeddings.safetensors"
    assert cache.is_file()
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        assert not any("bert" in key.lower() or "encoder.layer" in key for key in f.keys())
    before = cache.stat().st_mtime_ns
    assert main(args + ["--set", "train.steps=4", "--resume"]) == 0                  # the later --set wins
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert cache.stat().st_mtime_ns == before                                  # read back, not recomputed
