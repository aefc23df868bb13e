"""unCLIP (Ramesh et al. 2022): the prior over a frozen CLIP's image embeddings given the text embedding, the
decoder of images given the image embedding, and the pipeline and variations. The null embedding is the same in
training (dropout) and sampling (guidance); the two-candidate choice keeps the higher dot product exactly; a
variation decodes its own image's embedding; the embedding cache equals a fresh encoding; the command line
trains, samples and varies end to end on fake data, and refuses bad input in one line."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from difflab.cli import main
from difflab.conditioning import (CAPTION_FIELD, IMAGE_EMBED_FIELD, TEXT_EMBED_FIELD, ClipEmbedding, Cond,
                                  drop_conditions, with_null)
from difflab.denoiser import Denoiser, VPPrecond
from difflab.guidance import ClassifierFreeGuidance
from difflab.nets.registry import load_network, resolve_network
from difflab.schedules import NoiseSchedule
from test_classifier_guidance import write_idx

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)
PRIORS = {"prior_transformer": {"width": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0},
          "prior_mlp": {"hidden": 16, "depth": 2}, "prior_regression": {"hidden": 16, "depth": 2}}


def tiny_prior(kind: str, dim: int = 8):
    net = load_network(kind, resolve_network(kind, PRIORS[kind], (dim,), dim, None))
    torch.manual_seed(0)
    with torch.no_grad():                                  # wake the zero-initialised output layers
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


class Recorder(torch.nn.Module):
    """Wraps a network and keeps the condition records of every call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    @property
    def consumes(self):
        return self.net.consumes

    def forward(self, x, t, cond=None):
        self.seen.append(dict(cond) if cond is not None else None)
        return self.net(x, t, cond)


# -- networks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_prior_networks_read_the_text_embedding_and_no_embedding_is_zeros(kind):
    net = tiny_prior(kind)
    x, t = torch.randn(3, 8), torch.tensor([0.0, 400.0, 999.0])
    z_t = torch.randn(3, 8)
    out = net(x, t, Cond(text_embed=z_t))
    assert out.shape == (3, 8) and net.consumes == (TEXT_EMBED_FIELD,)
    assert not torch.allclose(out, net(x, t, Cond(text_embed=z_t.flip(0))))
    assert torch.equal(net(x, t, None), net(x, t, Cond(text_embed=torch.zeros(3, 8))))
    if kind == "prior_regression":               # a deterministic map of z_t: the noised input and t are ignored
        assert torch.equal(out, net(torch.randn(3, 8), t.flip(0), Cond(text_embed=z_t)))
    else:
        assert not torch.allclose(out, net(torch.randn(3, 8), t, Cond(text_embed=z_t)))


def test_decoder_reads_the_image_embedding_in_the_time_embedding_and_as_four_tokens():
    unet = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
            "num_heads": 1, "groups": 4}
    for text in (None, {"kind": "glide", "width": 16, "layers": 1, "heads": 2, "max_length": 24}):
        options = resolve_network("unclip_decoder", {"embed_dim": 8, "text_encoder": text, "unet": unet},
                                  (1, 8, 8), 1, None)
        fitted = options["unet"]
        assert fitted["cross_attention"] and fitted["pooled_dim"] == 8 + (16 if text else 0)
        net = load_network("unclip_decoder", options)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert net.consumes == ((IMAGE_EMBED_FIELD, CAPTION_FIELD) if text else (IMAGE_EMBED_FIELD,))
        assert net.to_tokens.out_features == 4 * net.context_dim
        x, t, z = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 600.0]), torch.randn(2, 8)
        out = net(x, t, Cond(image_embed=z))
        assert out.shape == x.shape and not torch.allclose(out, net(x, t, Cond(image_embed=z.flip(0))))
        assert torch.equal(net(x, t, None), net(x, t, Cond(image_embed=torch.zeros(2, 8))))


# -- the null embedding: one value in training and in guidance --------------------------------------------------
def test_prior_dropout_and_guidance_use_the_same_null_embedding():
    from difflab.train.objectives import DiffusionObjective
    from difflab.train.timesteps import UniformTimesteps
    from difflab.losses import simple_loss

    field = ClipEmbedding(TEXT_EMBED_FIELD, 0.5, 8, math.sqrt(8))
    recorder = Recorder(tiny_prior("prior_transformer"))
    denoiser = Denoiser(recorder, VPPrecond(SCHEDULE, "x0"), {TEXT_EMBED_FIELD: field})
    z_t = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1) * math.sqrt(8)
    null = field.null_like(z_t)
    assert torch.equal(null, torch.zeros(64, 8))
    # training: the objective's draw replaces about half the rows by the null embedding, the others untouched
    objective = DiffusionObjective(denoiser, simple_loss, UniformTimesteps(len(SCHEDULE)))
    drawn = objective.draw(torch.randn(64, 8), Cond(text_embed=z_t), torch.Generator().manual_seed(0)).cond
    dropped = (drawn[TEXT_EMBED_FIELD] == 0).all(1)
    assert 10 < dropped.sum() < 54
    assert torch.equal(drawn[TEXT_EMBED_FIELD][dropped], null[dropped])
    assert torch.equal(drawn[TEXT_EMBED_FIELD][~dropped], z_t[~dropped])
    assert torch.equal(drop_conditions(Cond(text_embed=z_t), {TEXT_EMBED_FIELD: ClipEmbedding(
        TEXT_EMBED_FIELD, 1.0, 8)}, torch.Generator())[TEXT_EMBED_FIELD], null)
    # sampling: classifier-free guidance's unconditional half is exactly that null embedding
    x = torch.randn(4, 8)
    guided = ClassifierFreeGuidance(denoiser, 1.5)(x, 2.0, Cond(text_embed=z_t[:4]))
    passed = recorder.seen[-1][TEXT_EMBED_FIELD]
    assert torch.equal(passed[:4], z_t[:4]) and torch.equal(passed[4:], null[:4])
    conditional, unconditional = denoiser(x, 2.0, Cond(text_embed=z_t[:4])), denoiser(x, 2.0, with_null(
        Cond(text_embed=z_t[:4]), denoiser.conditions))
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional))


def tiny_loaded_prior(kind: str = "prior_mlp"):
    """A LoadedModel of a tiny (randomly woken) prior, as load_model would return it."""
    from pathlib import Path

    from difflab.config import Config
    from difflab.model import ModelSpec, denoiser_from_spec
    from difflab.pipelines.ddpm import LoadedModel

    options = resolve_network(kind, PRIORS[kind], (8,), 8, None)
    spec = ModelSpec(kind, options, VPPrecond(SCHEDULE, "x0").to_json(), (8,), None,
                     [ClipEmbedding(TEXT_EMBED_FIELD, 0.1, 8, math.sqrt(8)).to_json()])
    denoiser = denoiser_from_spec(spec)
    denoiser.net.load_state_dict(tiny_prior(kind).state_dict())
    return LoadedModel(denoiser.eval(), spec, Config(), "model", 0, Path("prior"))


def test_two_candidates_keep_the_higher_dot_product_exactly():
    from difflab.config import SampleConfig
    from difflab.pipelines.cascade import STAGE_SEED_STRIDE
    from difflab.pipelines.ddpm import sample
    from difflab.pipelines.unclip import UnclipStage, choose_candidates, sample_prior

    candidates = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 3.0], [0.0, 1.0]]])     # (K=2, n=2, d=2)
    z_t = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.equal(choose_candidates(candidates, z_t), torch.tensor([[0.5, 3.0], [0.0, 2.0]]))

    loaded = tiny_loaded_prior()
    options = SampleConfig(sampler="heun", steps=3, guidance=1.0, seed=5)
    z_t = torch.randn(16, 8)
    chosen = sample_prior(UnclipStage(loaded, None), z_t, options, candidates=2)
    first, second = (sample(loaded, 16, SampleConfig(sampler="heun", steps=3, guidance=1.0,
                                                      seed=5 + k * STAGE_SEED_STRIDE), Cond(text_embed=z_t))
                     for k in (1, 2))
    keep_first = (first * z_t).sum(1) >= (second * z_t).sum(1)
    assert 0 < keep_first.sum() < 16                                   # both candidates win somewhere
    assert torch.equal(chosen, torch.where(keep_first[:, None], first, second))


def test_the_regression_prior_samples_its_deterministic_map():
    from difflab.config import SampleConfig
    from difflab.pipelines.ddpm import sample

    loaded = tiny_loaded_prior("prior_regression")
    z_t = torch.randn(5, 8)
    out = sample(loaded, 5, SampleConfig(sampler="euler", steps=1, seed=0), Cond(text_embed=z_t))
    again = sample(loaded, 5, SampleConfig(sampler="euler", steps=1, seed=99), Cond(text_embed=z_t))
    expected = loaded.denoiser.net(torch.zeros(5, 8), torch.zeros(5), Cond(text_embed=z_t))
    # D(x; sigma) = f(z_t) exactly; the one Euler step to 0 from sigma_max = 80 rounds at 80 times float eps
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(again, out, rtol=0, atol=1e-4)


# -- end to end: train the CLIP, the prior and the decoder, sample, vary -----------------------------------------
CLIP_TINY = ["--set", "train.steps=3", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
             "--set", "clip.model_channels=8", "--set", "clip.channel_mult=[1, 2]",
             "--set", "clip.attention_resolutions=[14]", "--set", "clip.num_heads=2", "--set", "clip.groups=4",
             "--set", "clip.embed_dim=8",
             "--set", "clip.text_encoder={kind: glide, width: 16, layers: 1, heads: 2, max_length: 48}",
             "--set", "train.eval_examples=0"]
COMMON = ["--quiet", "--set", "train.steps=3", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
          "--set", "train.num_sample_images=4", "--set", "sample.steps=2", "--set", "train.checkpoint_every=2"]
PRIOR_TINY = ["--set", "model.prior_transformer={width: 16, depth: 1, num_heads: 2, mlp_ratio: 2.0}"]
DECODER_TINY = ["--set", "model.unclip_decoder.unet.model_channels=8", "--set",
                "model.unclip_decoder.unet.channel_mult=[1, 2]", "--set",
                "model.unclip_decoder.unet.attention_resolutions=[14]", "--set",
                "model.unclip_decoder.unet.num_heads=1", "--set", "model.unclip_decoder.unet.groups=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Fake captioned Fashion-MNIST, a tiny CLIP, and an unCLIP prior and decoder trained on its embeddings."""
    root = tmp_path_factory.mktemp("unclip")
    data = root / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 3 * k:3 * k + 3] = 250
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels)
    clip, prior, decoder = root / "clip", root / "prior", root / "decoder"
    assert main(["train-clip", "fmnist_clip", "--quiet", "--set", f"data.path={data}", "--set",
                 f"train.out_dir={clip}", *CLIP_TINY]) == 0
    stage = ["--set", f"data.path={data}", "--set", f"data.clip={clip}"]
    assert main(["train", "fmnist_unclip_prior", *COMMON, *stage, "--set", f"train.out_dir={prior}",
                 *PRIOR_TINY]) == 0
    assert main(["train", "fmnist_unclip_decoder", *COMMON, *stage, "--set", f"train.out_dir={decoder}",
                 *DECODER_TINY]) == 0
    pipeline = root / "unclip.yaml"
    pipeline.write_text(f"unclip:\n  prior: {prior}\n  decoder: {decoder}\n  prior_candidates: 2\n")
    return {"root": root, "data": data, "clip": clip, "prior": prior, "decoder": decoder, "pipeline": pipeline,
            "stage": stage}


def test_runs_hold_the_frozen_clip_and_log_their_previews(runs):
    from difflab.clip_embeddings import load_clip_space
    from difflab.pipelines.unclip import load_stage

    clip = load_clip_space(runs["clip"])
    for name, stage in (("prior", "prior"), ("decoder", "decoder")):
        with safe_open(str(runs[name] / "checkpoint.safetensors"), "pt") as f:
            keys = set(f.keys())
            record = json.loads(f.metadata()["clip"])
        assert {f"frozen.clip.{k}" for k in clip.clip.state_dict()} <= keys
        assert record["sha256"] == clip.digest and record["scale"] == pytest.approx(math.sqrt(8))
        loaded = load_stage(runs[name], stage)
        for a, b in zip(loaded.clip.clip.state_dict().values(), clip.clip.state_dict().values()):
            assert torch.equal(a, b)
    prior_log = [json.loads(line) for line in (runs["prior"] / "metrics.jsonl").read_text().splitlines()]
    assert -1 <= prior_log[-1]["prior_cosine"] <= 1 and prior_log[-1]["step"] == 3
    decoder_log = [json.loads(line) for line in (runs["decoder"] / "metrics.jsonl").read_text().splitlines()]
    assert -1 <= decoder_log[-1]["decoder_clip_cosine"] <= 1
    assert (runs["decoder"] / "samples" / "final.png").is_file()
    spec = json.loads((runs["prior"] / "config.json").read_text())
    assert spec["unclip"] == {"stage": "prior", "embedding_dropout": 0.1}


def test_the_embedding_cache_equals_a_fresh_encoding(runs):
    from difflab.build import build_captioned_data, build_unclip_data
    from difflab.clip_embeddings import encode_captioned
    from difflab.config import load_config
    from difflab.presets import resolve_config

    config = load_config(resolve_config("fmnist_unclip_prior"), runs["stage"][1::2])
    caches = sorted((runs["clip"] / "embeddings").glob("train-*.safetensors"))
    assert len(caches) == 1                           # the prior and the decoder share it
    before = caches[0].stat().st_mtime_ns
    data, space = build_unclip_data(config)
    assert caches[0].stat().st_mtime_ns == before    # read back, not recomputed
    image, text = encode_captioned(space, build_captioned_data(config.data))
    torch.testing.assert_close(data.image_embed, space.scale * image, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(data.text_embed, space.scale * text, rtol=1e-6, atol=1e-6)
    assert torch.allclose(data.image_embed.norm(dim=1), torch.tensor(math.sqrt(8)))


def test_sample_the_pipeline_with_prompts_and_vary_an_image(runs, tmp_path, capsys):
    def draw(name: str, *prompts: str) -> np.ndarray:
        args = ["sample", str(runs["pipeline"]), "--n", "4", "--out", str(tmp_path), "--name", name,
                "--weights", "model", "--steps", "2"]
        assert main(args + [item for p in prompts for item in ("--prompt", p)]) == 0
        with np.load(tmp_path / f"{name}.npz") as saved:
            return saved["images"]

    boots = draw("a", "a dark ankle boot")
    assert boots.shape == (4, 28, 28, 1)
    assert np.array_equal(boots, draw("b", "a dark ankle boot"))                      # seeded
    # the checkpoints hold the frozen CLIP: the CLIP's own run is not needed to sample
    moved = runs["root"] / "clip_moved"
    shutil.move(runs["clip"], moved)
    try:
        assert np.array_equal(boots, draw("c", "a dark ankle boot"))
        image = tmp_path / "boot.png"
        Image.fromarray(boots[0, :, :, 0]).save(image)
        assert main(["vary", str(runs["decoder"]), str(image), "--n", "3", "--out", str(tmp_path), "--name", "v",
                     "--weights", "model", "--steps", "2"]) == 0
    finally:
        shutil.move(moved, runs["clip"])
    with np.load(tmp_path / "v.npz") as saved:
        assert saved["images"].shape == (3, 28, 28, 1)


def test_a_variation_decodes_that_images_embedding(runs, monkeypatch):
    from difflab.pipelines import unclip

    decoder = unclip.load_stage(runs["decoder"], "decoder", weights="model")
    image = torch.rand(1, 1, 28, 28) * 2 - 1
    seen = {}
    real_sample = unclip.sample

    def spy(loaded, n, options, cond=None, device="cpu", **kwargs):
        seen["cond"] = cond
        return real_sample(loaded, n, options, cond, device, **kwargs)

    monkeypatch.setattr(unclip, "sample", spy)
    options = decoder.model.config.sample
    out = unclip.variations(decoder, image, 3, options)
    expected = math.sqrt(8) * decoder.clip.clip.encode_image(image, torch.zeros(1, dtype=torch.long))
    assert out.shape == (3, 1, 28, 28)
    assert set(seen["cond"]) == {IMAGE_EMBED_FIELD}
    assert torch.equal(seen["cond"][IMAGE_EMBED_FIELD], expected.expand(3, -1))
    other = unclip.variations(decoder, -image, 3, options)
    assert not torch.equal(seen["cond"][IMAGE_EMBED_FIELD], expected.expand(3, -1)) and other.shape == out.shape


def one_line_error(capsys, *needles: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("difflab: error")]
    assert len(err) == 1 and all(needle in err[0] for needle in needles), err


def test_bad_inputs_are_one_line_and_exit_2(runs, tmp_path, capsys):
    data = ["--set", f"data.path={runs['data']}", "--set", f"train.out_dir={tmp_path / 'x'}"]
    capsys.readouterr()
    assert main(["train", "fmnist_unclip_prior", *COMMON, *data, "--set", "data.clip=null"]) == 2
    one_line_error(capsys, "data.clip", "--set data.clip=")
    assert main(["train", "fmnist_unclip_prior", *COMMON, *data, "--set", f"data.clip={tmp_path / 'none'}"]) == 2
    one_line_error(capsys, "data.clip", "does not exist")
    assert main(["train", "fmnist_unclip_prior", *COMMON, *data, "--set", f"data.clip={runs['clip']}",
                 "--set", "model={kind: unclip_decoder}"]) == 2
    one_line_error(capsys, "model.kind must be")
    assert main(["train", "fmnist_unclip_prior", *COMMON, *data, "--set", "unclip.stage=posterior"]) == 2
    one_line_error(capsys, "unclip.stage")
    assert main(["sample", str(runs["pipeline"]), "--n", "2", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "--prompt")
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(f"unclip:\n  prior: {runs['decoder']}\n  decoder: {runs['prior']}\n")
    assert main(["sample", str(swapped), "--prompt", "a bag", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "is not an unCLIP prior")
    assert main(["vary", str(runs["prior"]), str(tmp_path / "none.png"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "is not an unCLIP decoder")
    assert main(["vary", str(runs["decoder"]), str(tmp_path / "none.png"), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "cannot read image")
    empty = tmp_path / "empty.yaml"
    empty.write_text("unclip:\n  prior: a\n")
    assert main(["sample", str(empty), "--prompt", "a bag", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "unclip.prior and unclip.decoder")


def test_the_variants_train_and_sample_through_the_pipeline(runs, tmp_path, capsys):
    """The MLP prior, the regression baseline and a decoder that reads the caption too (its caption tokens in its
    own tokenizer, 50% dropped) train from their presets and sample end to end; a resumed run continues on its
    CLIP, and a pipeline of stages trained on different CLIPs is refused."""
    from difflab.pipelines.unclip import load_pipeline, load_unclip_file

    stage = runs["stage"]
    mlp, regression, text = tmp_path / "mlp", tmp_path / "regression", tmp_path / "text"
    assert main(["train", "fmnist_unclip_prior_mlp", *COMMON, *stage, "--set", f"train.out_dir={mlp}",
                 "--set", "model.prior_mlp={hidden: 16, depth: 1}"]) == 0
    assert main(["train", "fmnist_unclip_prior_regression", *COMMON, *stage, "--set", f"train.out_dir={regression}",
                 "--set", "model.prior_regression={hidden: 16, depth: 1}"]) == 0
    glide = "{kind: glide, width: 16, layers: 1, heads: 2, max_length: 48}"
    assert main(["train", "fmnist_unclip_decoder", *COMMON, *stage, "--set", f"train.out_dir={text}", *DECODER_TINY,
                 "--set", f"model.unclip_decoder.text_encoder={glide}"]) == 0
    for prior in (mlp, regression):
        pipeline = tmp_path / f"{prior.name}.yaml"
        pipeline.write_text(f"unclip:\n  prior: {prior}\n  decoder: {text}\n  decoder_guidance: 1.0\n")
        loaded = load_pipeline(load_unclip_file(pipeline))
        assert CAPTION_FIELD in loaded.decoder.model.denoiser.conditions
        assert loaded.decoder.model.spec.condition_fields()[CAPTION_FIELD].dropout == 0.5
        assert main(["sample", str(pipeline), "--n", "2", "--prompt", "a bag", "--out", str(tmp_path), "--name",
                     prior.name, "--weights", "model", "--steps", "2"]) == 0
    assert main(["train", "fmnist_unclip_prior_mlp", *COMMON, *stage, "--set", f"train.out_dir={mlp}",
                 "--set", "model.prior_mlp={hidden: 16, depth: 1}", "--set", "train.steps=4", "--resume"]) == 0
    other, copied = tmp_path / "clip2", tmp_path / "clip_copy"
    assert main(["train-clip", "fmnist_clip", "--quiet", "--set", f"data.path={runs['data']}", "--set",
                 f"train.out_dir={other}", *CLIP_TINY, "--set", "train.seed=1"]) == 0
    shutil.copytree(runs["clip"], copied)
    regression_args = ["train", "fmnist_unclip_prior_regression", *COMMON, "--set", f"data.path={runs['data']}",
                       "--set", f"train.out_dir={tmp_path / 'r2'}",
                       "--set", "model.prior_regression={hidden: 16, depth: 1}"]
    assert main([*regression_args, "--set", f"data.clip={copied}"]) == 0
    shutil.copy(other / "noisy_clip.safetensors", copied / "noisy_clip.safetensors")     # retrained in place
    capsys.readouterr()
    assert main([*regression_args, "--set", f"data.clip={copied}", "--set", "train.steps=4", "--resume"]) == 2
    one_line_error(capsys, "is not the CLIP that")
    assert main([*regression_args, "--set", f"data.clip={other}", "--overwrite"]) == 0
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(f"unclip:\n  prior: {tmp_path / 'r2'}\n  decoder: {text}\n")
    capsys.readouterr()
    assert main(["sample", str(mixed), "--n", "2", "--prompt", "a bag", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "different CLIPs")
