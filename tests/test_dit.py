"""DiT (Peebles & Xie 2023): adaLN-Zero starts as the identity, every block design trains on pixels and latents,
the fixed 2-D sin-cos positions, the registry's fitting, the paper's Gflops, and classifier-free guidance of
every output channel."""

import math

import pytest
import torch

from difflab.conditioning import ClassLabel, Cond
from difflab.denoiser import Denoiser, VPPrecond
from difflab.errors import DifflabError
from difflab.guidance import ClassifierFreeGuidance
from difflab.nets.dit import DIT_BLOCKS, DiT, DiTConfig, sincos_pos_embed_2d
from difflab.nets.flops import dit_gflops, network_gflops
from difflab.nets.registry import load_network, resolve_network
from difflab.schedules import NoiseSchedule


def tiny_dit(**overrides) -> DiT:
    config = dict(in_channels=4, image_size=8, patch_size=2, size=None, hidden_size=32, depth=2, num_heads=2,
                  num_classes=3)
    config.update(overrides)
    return DiT(DiTConfig(**config))


def perturb(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its initial value, the zero-initialised ones included."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def block_updates(net: DiT, x, t, cond) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input tokens, output tokens) of every block in one forward pass."""
    seen = []
    hooks = [block.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
             for block in net.blocks]
    net(x, t, cond)
    for hook in hooks:
        hook.remove()
    return seen


def test_adaln_zero_blocks_start_as_the_identity_and_the_output_at_zero():
    torch.manual_seed(0)
    net = tiny_dit(block="adaln_zero")
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), Cond(label=torch.tensor([0, 3]))
    updates = block_updates(net, x, t, cond)
    assert len(updates) == 2 and all(torch.equal(out, inp) for inp, out in updates)
    assert torch.count_nonzero(net(x, t, cond)) == 0
    # adaLN without the gates, its regression initialised like every other layer: no block is the identity
    adaln = tiny_dit(block="adaln")
    assert all(not torch.allclose(out, inp) for inp, out in block_updates(adaln, x, t, cond))


SHAPES = [((1, 28, 28), 7), ((1, 28, 28), 4), ((1, 28, 28), 2), ((4, 8, 8), 2), ((4, 8, 8), 4)]


@pytest.mark.parametrize("block", DIT_BLOCKS)
@pytest.mark.parametrize("shape,patch", SHAPES)
def test_every_block_design_runs_and_trains(block, shape, patch):
    torch.manual_seed(0)
    channels, size, _ = shape
    net = perturb(tiny_dit(block=block, in_channels=channels, image_size=size, patch_size=patch,
                           out_channels=2 * channels))                                # a learned variance
    x = torch.randn(2, *shape)
    out = net(x, torch.tensor([0.5, 999.0]), Cond(label=torch.tensor([1, 3])))
    assert out.shape == (2, 2 * channels, size, size)
    out.square().mean().backward()
    bad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or not p.grad.abs().sum() > 0]
    assert not bad


@pytest.mark.parametrize("block", DIT_BLOCKS)
def test_unconditional_dit_and_the_label_and_time_reach_the_output(block):
    torch.manual_seed(0)
    unconditional = perturb(tiny_dit(block=block, num_classes=None))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 5.0])
    assert unconditional.consumes == () and unconditional(x, t).shape == x.shape
    net = perturb(tiny_dit(block=block))
    assert net.consumes == ("label",)
    base = net(x, t, Cond(label=torch.tensor([1, 1])))
    assert not torch.allclose(base, net(x, t, Cond(label=torch.tensor([2, 2]))))
    assert not torch.allclose(base, net(x, torch.tensor([600.0, 600.0]), Cond(label=torch.tensor([1, 1]))))
    assert torch.equal(net(x, t), net(x, t, Cond(label=torch.tensor([3, 3]))))     # no label: the null label


def test_patches_are_unpatchified_in_place():
    """A DiT whose tokens carry their patch unchanged (identity patch embedding, final layer reading it back)
    reproduces its input: patchify and unpatchify agree on where each patch goes."""
    net = tiny_dit(in_channels=1, image_size=8, patch_size=2, hidden_size=4, num_heads=1, depth=0, out_channels=1,
                   block="in_context", num_classes=None)
    with torch.no_grad():
        net.patch_embed.weight.copy_(torch.eye(4).reshape(4, 1, 2, 2))
        net.patch_embed.bias.zero_()
        net.pos_embed.zero_()
        net.final.norm = torch.nn.Identity()
        net.final.linear.weight.copy_(torch.eye(4))
        net.final.linear.bias.zero_()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(net(x, torch.zeros(2)), x)


def test_2d_sincos_positions_are_the_closed_form():
    dim, grid = 8, 3
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (grid * grid, dim)
    omega = [1.0, 10000 ** -0.5]                     # w_k = 10000^(-k / (dim / 4)), k = 0, 1
    row, col = 1, 2                                  # token 5 of the row-major 3x3 grid
    expected = ([math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega])
    torch.testing.assert_close(emb[row * grid + col], torch.tensor(expected), rtol=0, atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    net = tiny_dit(image_size=8, patch_size=2)
    assert torch.equal(net.pos_embed, sincos_pos_embed_2d(32, 4))


def test_registry_fits_a_dit_and_names_the_wrong_option():
    fitted = resolve_network("dit", {"size": "XS", "patch_size": 4}, (1, 28, 28), 1, 10)
    assert [fitted[k] for k in ("in_channels", "image_size", "out_channels", "num_classes")] == [1, 28, 1, 10]
    assert (fitted["hidden_size"], fitted["depth"], fitted["num_heads"]) == (192, 6, 3)   # the preset, written out
    assert resolve_network("dit", {"size": "XS", "depth": 2}, (1, 28, 28), 1, None)["depth"] == 2  # explicit wins
    net = load_network("dit", resolve_network("dit", {"size": None, "hidden_size": 16, "depth": 1, "num_heads": 2,
                                                      "patch_size": 7}, (1, 28, 28), 2, 10))
    assert net(torch.zeros(1, 1, 28, 28), torch.zeros(1)).shape == (1, 2, 28, 28)
    with pytest.raises(DifflabError, match=r"model\.dit\.patch_size"):
        resolve_network("dit", {"patch_size": 5}, (1, 28, 28), 1, 10)
    with pytest.raises(DifflabError, match=r"model\.dit\.num_heads"):
        resolve_network("dit", {"size": "XS", "num_heads": 5}, (1, 28, 28), 1, 10)
    with pytest.raises(DifflabError, match=r"model\.dit\.size"):
        resolve_network("dit", {"size": "M"}, (1, 28, 28), 1, 10)
    with pytest.raises(DifflabError, match=r"model\.dit\.block"):
        resolve_network("dit", {"block": "adaln-zero"}, (1, 28, 28), 1, 10)
    with pytest.raises(DifflabError, match=r"model\.dit\.patchsize"):
        resolve_network("dit", {"patchsize": 4}, (1, 28, 28), 1, 10)


@pytest.mark.parametrize("size,patch,paper,digits", [("S", 8, 0.36, 2), ("S", 4, 1.41, 2), ("S", 2, 6.06, 2),
                                                     ("B", 2, 23.01, 2), ("XL", 2, 118.6, 1)])
def test_gflops_are_the_papers(size, patch, paper, digits):
    """Peebles & Xie 2023, Table 4, on 32x32x4 latents (256x256 images), to the digits printed there; the
    paper counts one FLOP per multiply-add, difflab two."""
    config = DiTConfig(in_channels=4, image_size=32, patch_size=patch, size=size, num_classes=1000,
                       out_channels=8)
    assert dit_gflops(config) / 2 == pytest.approx(paper, abs=10 ** -digits)


def test_gflops_of_a_built_network_match_the_meta_count():
    config = DiTConfig(in_channels=1, image_size=28, patch_size=4, size="XS", num_classes=10)
    assert network_gflops(DiT(config), (1, 28, 28)) == dit_gflops(config) == pytest.approx(0.2748, abs=1e-4)


def test_classifier_free_guidance_guides_every_output_channel():
    """D~ = D_u + (1 + w)(D_c - D_u) on all four latent channels. facebookresearch/DiT's ``forward_with_cfg``
    guides only the first three (``model_out[:, :3]``) of a 4-channel model without a learned sigma."""
    torch.manual_seed(0)
    net = perturb(tiny_dit(in_channels=4, out_channels=4, num_classes=3), std=0.1)
    denoiser = Denoiser(net, VPPrecond(NoiseSchedule.from_name("cosine", 1000), "eps"),
                        {"label": ClassLabel("label", 0.1, 3)})
    w, x = 3.0, torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.5, 4.0], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    guided = ClassifierFreeGuidance(denoiser, w)(x, sigma, Cond(label=labels))
    d_c = denoiser(x, sigma, Cond(label=labels))
    d_u = denoiser(x, sigma, Cond(label=torch.full_like(labels, 3)))
    for channel in range(4):
        assert not torch.allclose(d_c[:, channel], d_u[:, channel])       # the label matters on each channel
        torch.testing.assert_close(guided[:, channel], d_u[:, channel] + (1 + w) * (d_c[:, channel] - d_u[:, channel]))
