"""Cross-attention (Rombach et al. 2022, Sec. 3.3): padded condition tokens have exactly no influence, an
all-padding row is zero and finite, and the U-Net's SpatialTransformer reads condition tokens and the class
label's token, while the default U-Net is unchanged."""

import pytest
import torch

from difflab.conditioning import Cond
from difflab.nets import UNet, UNetConfig
from difflab.nets.attention import MultiHeadAttention, TransformerBlock
from difflab.nets.unet import SpatialTransformer

CROSS_ATTENTION_MODULES = ("label_token", "proj_in", "proj_out", "self_attn", "cross_attn", "blocks")


def perturb(net: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))
    return net


def small_unet(**overrides) -> UNet:
    config = dict(in_channels=3, image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, groups=8)
    config.update(overrides)
    return UNet(UNetConfig(**config))


MASK = torch.tensor([[True, True, False, False, True], [False, True, False, False, False]])


def test_padded_tokens_have_no_influence_and_real_ones_do():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, context_dim=12)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 5, 12)
    out = attn(x, context, MASK)
    changed = torch.where(MASK[:, :, None], context, 1e3 * torch.randn_like(context))
    torch.testing.assert_close(attn(x, changed, MASK), out, rtol=0, atol=1e-6)
    real = context.clone()
    real[1, 1] += 1.0
    moved = attn(x, real, MASK)
    assert torch.equal(moved[0], out[0]) and not torch.allclose(moved[1], out[1])
    # the masked row equals attention over its real tokens alone
    for row in range(2):
        alone = attn(x[row:row + 1], context[row:row + 1, MASK[row]])
        torch.testing.assert_close(out[row:row + 1], alone, rtol=1e-5, atol=1e-6)


def test_an_all_padding_row_is_zero_and_finite_in_both_passes():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, context_dim=12)
    x, context = torch.randn(2, 6, 16, requires_grad=True), torch.randn(2, 5, 12, requires_grad=True)
    mask = MASK.clone()
    mask[1] = False
    out = attn(x, context, mask)
    assert torch.isfinite(out).all() and torch.count_nonzero(out[1]) == 0 and torch.count_nonzero(out[0]) > 0
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(context.grad).all()
    assert torch.count_nonzero(context.grad[1]) == 0
    # in a transformer block, nothing to attend to is the same as no context
    block = perturb(TransformerBlock(16, 2, context_dim=12))
    with torch.no_grad():
        torch.testing.assert_close(block(x, context, mask)[1], block(x[1:], None)[0], rtol=0, atol=1e-6)


def test_spatial_transformer_starts_as_the_identity():
    torch.manual_seed(0)
    block = SpatialTransformer(16, 2, context_dim=12, depth=2, groups=8)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(block(x, torch.randn(2, 5, 12), MASK), x)
    assert not torch.equal(perturb(block)(x, torch.randn(2, 5, 12), MASK), x)


def test_default_unet_builds_no_cross_attention_modules_and_the_options_are_inert_when_off():
    torch.manual_seed(0)
    default = small_unet(num_classes=4).state_dict()
    assert not [k for k in default if any(name in k for name in CROSS_ATTENTION_MODULES)]
    torch.manual_seed(0)
    off = small_unet(num_classes=4, context_dim=12, transformer_depth=3).state_dict()
    assert list(off) == list(default) and all(torch.equal(off[k], default[k]) for k in default)
    assert small_unet(num_classes=4).consumes == ("label",) and small_unet().consumes == ()


def test_cross_attention_unet_reads_the_context_and_the_label_token():
    torch.manual_seed(0)
    net = perturb(small_unet(num_classes=4, cross_attention=True, context_dim=12, transformer_depth=2))
    assert net.consumes == ("label", "context", "context_mask")
    assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) == 4   # down, middle, two up stages
    with torch.no_grad():
        net.label_embed.weight.zero_()                 # the label can now only enter through its token
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 10.0])
    context = torch.randn(2, 5, 12)
    cond = Cond(label=torch.tensor([1, 1]), context=context, context_mask=MASK)
    base = net(x, t, cond)
    assert base.shape == x.shape
    assert not torch.allclose(base, net(x, t, cond.replace(label=torch.tensor([2, 2]))))
    padded = torch.where(MASK[:, :, None], context, torch.randn_like(context))
    torch.testing.assert_close(net(x, t, cond.replace(context=padded)), base, rtol=0, atol=1e-6)
    real = context.clone()
    real[0, 0] += 1.0
    assert not torch.allclose(net(x, t, cond.replace(context=real)), base)
    # no label: the null label's token; no context: the label token alone
    assert torch.equal(net(x, t, Cond(context=context, context_mask=MASK)),
                       net(x, t, cond.replace(label=torch.tensor([4, 4]))))
    assert net(x, t, Cond(label=torch.tensor([1, 1]))).shape == x.shape


@pytest.mark.parametrize("num_classes", [None, 3])
def test_cross_attention_unet_trains_with_and_without_tokens(num_classes):
    torch.manual_seed(0)
    net = perturb(small_unet(num_classes=num_classes, cross_attention=True, context_dim=12))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 500.0])
    cond = Cond(context=torch.randn(2, 5, 12), context_mask=MASK)
    if num_classes:
        cond = cond.replace(label=torch.tensor([0, 3]))
    net(x, t, cond).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    # gradient checkpointing recomputes the same stages, condition tokens included
    net.train()
    plain = net(x, t, cond)
    net.gradient_checkpointing = True
    assert torch.equal(net(x, t, cond), plain)
    # an unconditional cross-attention U-Net given no tokens: the cross-attention adds nothing
    if num_classes is None:
        assert net(x, t).shape == x.shape


def test_cross_attention_options_are_checked():
    from difflab.errors import DifflabError
    from difflab.nets.registry import resolve_network

    base = dict(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4], num_heads=2,
                groups=4, cross_attention=True)
    for bad in ({"context_dim": 0}, {"transformer_depth": 0}):
        with pytest.raises(DifflabError, match="model.unet"):
            resolve_network("unet", {**base, **bad}, (1, 8, 8), 1, None)
    assert resolve_network("unet", base, (1, 8, 8), 1, None)["transformer_depth"] == 1


def test_pooled_embedding_reaches_the_time_embedding_only_when_configured():
    """pooled_dim: cond["pooled"] is projected into the time embedding (GLIDE's last token, Imagen's pooled
    text); without it the U-Net is the default one, and an absent vector adds nothing."""
    torch.manual_seed(0)
    net = perturb(small_unet(cross_attention=True, context_dim=12, pooled_dim=6))
    assert "pooled" in net.consumes and "pooled" not in small_unet().consumes
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    context = torch.randn(2, 5, 12)
    pooled = torch.randn(2, 6)
    with_pooled = net(x, t, Cond(context=context, pooled=pooled))
    assert not torch.allclose(with_pooled, net(x, t, Cond(context=context, pooled=-pooled)))
    with torch.no_grad():
        net.pooled_embed.weight.zero_()
        net.pooled_embed.bias.zero_()
    torch.testing.assert_close(net(x, t, Cond(context=context, pooled=pooled)), net(x, t, Cond(context=context)))
