"""ADM's architecture switches in the U-Net (Dhariwal & Nichol 2021, Sec. 3 and Table 1): BigGAN residual
up/downsampling, 1/sqrt(2) residual rescaling and a fixed width per attention head. Off, the network is the one
built before they existed (golden values below, recorded from that code); on, each does what it says, alone
and with cross-attention, and a network with all of them trains."""

import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.conditioning import Cond
from difflab.errors import DifflabError
from difflab.nets import UNet, UNetConfig
from difflab.nets.attention import MultiHeadAttention
from difflab.nets.registry import resolve_network
from difflab.nets.unet import AttentionBlock, Downsample, ResBlock, SpatialTransformer, Upsample

# Recorded with the U-Net before these switches existed: parameter count, a hash of the state_dict's keys and
# shapes, the sum of the initial parameters under seed 0, and the output's sum and absolute sum after every
# parameter is redrawn from N(0, 0.05^2) (so that no zero-initialised layer hides a difference).
GOLDEN = {
    "plain": dict(params=190947, keys="13300c928661b16c", init_sum=649.1311569288001,
                  out_sum=-20.232695665210485, out_abs_sum=183.25424188002944),
    "class_cross": dict(params=244611, keys="5ae9608d3b67f519", init_sum=1004.689851394905,
                        out_sum=47.77303031668998, out_abs_sum=48.77911850740202),
}
GOLDEN_CONFIGS = {"plain": {}, "class_cross": dict(num_classes=3, cross_attention=True, context_dim=8)}


def tiny_config(**overrides) -> UNetConfig:
    config = dict(in_channels=3, image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, groups=8)
    config.update(overrides)
    return UNetConfig(**config)


def redrawn(net: torch.nn.Module) -> torch.nn.Module:
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def keys_hash(net: torch.nn.Module) -> str:
    text = " ".join(f"{k}:{tuple(v.shape)}" for k, v in net.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_defaults_build_the_network_of_before(name):
    golden, config = GOLDEN[name], tiny_config(**GOLDEN_CONFIGS[name])
    torch.manual_seed(0)
    net = UNet(config)
    assert sum(p.numel() for p in net.parameters()) == golden["params"]
    assert keys_hash(net) == golden["keys"]
    assert sum(p.detach().double().sum().item() for p in net.parameters()) == pytest.approx(golden["init_sum"],
                                                                                           rel=1e-12)
    redrawn(net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=g)
    cond = (Cond(label=torch.tensor([0, 2]), context=torch.randn(2, 4, 8, generator=g))
            if config.cross_attention else None)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0, 500.0]), cond).double()
    assert out.sum().item() == pytest.approx(golden["out_sum"], rel=1e-5)
    assert out.abs().sum().item() == pytest.approx(golden["out_abs_sum"], rel=1e-5)
    assert not any(block.rescale or block.resample is not None for block in net.modules()
                   if isinstance(block, ResBlock))


def stage_shapes(net: UNet, x: torch.Tensor) -> list[tuple[int, ...]]:
    """The output shape of every down and up stage, in order."""
    shapes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for stage in [*net.down, *net.up]]
    with torch.no_grad():
        net(x, torch.tensor([1.0, 2.0]))
    for hook in hooks:
        hook.remove()
    return shapes


@pytest.mark.parametrize("size,mult", [(16, (1, 2)), (28, (1, 2, 2))])
def test_resblock_updown_replaces_the_resampling_layers_by_residual_blocks(size, mult):
    plain = UNet(tiny_config(image_size=size, channel_mult=mult, attention_resolutions=(size // 2,)))
    biggan = UNet(tiny_config(image_size=size, channel_mult=mult, attention_resolutions=(size // 2,),
                              resblock_updown=True))
    assert not any(isinstance(m, (Downsample, Upsample)) for m in biggan.modules())
    directions = [m.resample.direction for m in biggan.modules() if isinstance(m, ResBlock) and m.resample]
    assert directions == ["down"] * (len(mult) - 1) + ["up"] * (len(mult) - 1)
    # each resampling block sits where the stride-2 conv / upsampling conv was, with the same channels
    for plain_stage, biggan_stage in zip([*plain.down, *plain.up], [*biggan.down, *biggan.up]):
        for plain_block, biggan_block in zip(plain_stage, biggan_stage):
            if isinstance(plain_block, (Downsample, Upsample)):
                assert isinstance(biggan_block, ResBlock)
                assert biggan_block.resample.direction == ("down" if isinstance(plain_block, Downsample) else "up")
                assert biggan_block.conv1.in_channels == biggan_block.conv1.out_channels == plain_block.conv.in_channels
            else:
                assert type(plain_block) is type(biggan_block)
    # the same resolutions at every stage, and an image-shaped output
    x = torch.randn(2, 3, size, size)
    assert stage_shapes(biggan, x) == stage_shapes(plain, x)
    assert biggan(x, torch.tensor([1.0, 2.0])).shape == x.shape


def manual_res_block(block: ResBlock, x: torch.Tensor, emb: torch.Tensor, resample=None, rescale=False):
    """ADM's ResBlock written out: GN-SiLU, resample h and x alike, conv, adaptive GN-SiLU-conv, plus skip."""
    h = F.silu(block.norm1(x))
    if resample is not None:
        h, x = resample(h), resample(x)
    h = block.conv1(h)
    scale, shift = block.emb(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.conv2(F.silu(block.norm2(h) * (1 + scale) + shift))
    out = block.skip(x) + h
    return out / math.sqrt(2) if rescale else out


RESAMPLERS = {None: None, "down": lambda v: F.avg_pool2d(v, 2), "up": lambda v: F.interpolate(v, scale_factor=2.0)}


@pytest.mark.parametrize("resample", [None, "down", "up"])
@pytest.mark.parametrize("rescale", [False, True])
def test_res_block_against_a_manual_computation(resample, rescale):
    torch.manual_seed(0)
    channels_out = 8 if resample is None else 4          # a resampling block keeps its channels (a 1x1 skip else)
    block = redrawn(ResBlock(4, channels_out, 12, dropout=0.0, groups=2, resample=resample, rescale=rescale))
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        out = block(x, emb)
        expected = manual_res_block(block, x, emb, RESAMPLERS[resample], rescale)
    assert out.shape[-1] == {None: 8, "down": 4, "up": 16}[resample]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_rescale_residual_divides_skip_plus_h_by_sqrt2_exactly():
    torch.manual_seed(0)
    block = redrawn(ResBlock(4, 8, 12, dropout=0.0, groups=2))
    x, emb = torch.randn(2, 4, 8, 8), torch.randn(2, 12)
    with torch.no_grad():
        plain = block(x, emb)
        block.rescale = True
        rescaled = block(x, emb)
    torch.testing.assert_close(rescaled, plain / math.sqrt(2), rtol=1e-6, atol=0)
    # at initialisation (zero last conv) a resampling block is its resampled skip, rescaled
    down = ResBlock(4, 4, 12, dropout=0.0, groups=2, resample="down", rescale=True)
    with torch.no_grad():
        torch.testing.assert_close(down(x, emb), F.avg_pool2d(x, 2) / math.sqrt(2), rtol=1e-6, atol=0)
    # in the U-Net, every residual block (middle and resampling ones too) is rescaled
    net = UNet(tiny_config(rescale_residual=True, resblock_updown=True))
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(blocks) == 2 + 1 + 2 + 4 + 1 and all(block.rescale for block in blocks)


@pytest.mark.parametrize("cross_attention", [False, True])
def test_num_head_channels_sets_the_heads_at_each_attention_width(cross_attention):
    config = tiny_config(attention_resolutions=(16, 8), num_heads=3, num_head_channels=8,
                         cross_attention=cross_attention, context_dim=8 if cross_attention else None)
    net = UNet(config)
    if cross_attention:
        layers = [(m.to_q.in_features, m.num_heads) for m in net.modules() if isinstance(m, MultiHeadAttention)]
        assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) == 7     # 2 down, 1 middle, 4 up
    else:
        layers = [(m.norm.num_channels, m.num_heads) for m in net.modules() if isinstance(m, AttentionBlock)]
        assert len(layers) == 7
    assert {width for width, _ in layers} == {16, 32}
    assert all(heads == width // 8 for width, heads in layers)
    x = torch.randn(2, 3, 16, 16)
    cond = Cond(context=torch.randn(2, 5, 8)) if cross_attention else None
    assert net(x, torch.tensor([1.0, 2.0]), cond).shape == x.shape


def test_num_head_channels_is_checked_where_attention_is():
    options = dict(model_channels=16, channel_mult=[1, 2], attention_resolutions=[16], groups=8)
    with pytest.raises(DifflabError, match="model.unet.num_head_channels"):
        resolve_network("unet", {**options, "num_head_channels": 12}, (3, 16, 16), 3, None)
    with pytest.raises(DifflabError, match="model.unet.num_head_channels"):
        resolve_network("unet", {**options, "num_head_channels": 0}, (3, 16, 16), 3, None)
    # num_heads is not used (nor checked) when num_head_channels is set
    resolved = resolve_network("unet", {**options, "num_heads": 3, "num_head_channels": 16}, (3, 16, 16), 3, None)
    assert resolved["num_head_channels"] == 16
    # only the attention widths must divide: 24 channels at 16x16 (no attention), 16 in the middle block
    resolve_network("unet", {**options, "channel_mult": [3, 2], "model_channels": 8, "attention_resolutions": [],
                             "num_head_channels": 16}, (3, 16, 16), 3, None)
    with pytest.raises(DifflabError, match="model.unet.num_heads"):
        resolve_network("unet", {**options, "num_heads": 3}, (3, 16, 16), 3, None)


def test_a_network_with_every_switch_trains():
    torch.manual_seed(0)
    config = tiny_config(resblock_updown=True, rescale_residual=True, num_head_channels=8, num_classes=3,
                         cross_attention=True, context_dim=8, attention_resolutions=(16, 8))
    net = UNet(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([1.0, 10.0, 100.0, 500.0])
    cond = Cond(label=torch.tensor([0, 1, 2, 3]), context=torch.randn(4, 5, 8))
    target = torch.randn_like(x)
    losses = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = (net(x, t, cond) - target).square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    # every parameter is reached once the zero-initialised layers have moved
    net.zero_grad()
    net(x, t, cond).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    # and gradient checkpointing recomputes the same stages
    net.train()
    plain = net(x, t, cond)
    net.gradient_checkpointing = True
    assert torch.equal(net(x, t, cond), plain)
