import pytest
import torch

from difflab.conditioning import Cond
from difflab.nets import MLP, MLPConfig, UNet, UNetConfig


def small_unet(**overrides):
    config = dict(in_channels=3, image_size=16, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, groups=8)
    config.update(overrides)
    return UNet(UNetConfig(**config))


@pytest.mark.parametrize("size,mult,blocks", [(16, (1, 2), 1), (32, (1, 2, 2), 2), (28, (1, 2, 2), 1), (8, (1,), 2)])
def test_unet_output_shape(size, mult, blocks):
    net = small_unet(image_size=size, channel_mult=mult, num_res_blocks=blocks)
    x = torch.randn(3, 3, size, size)
    assert net(x, torch.tensor([0, 10, 999])).shape == x.shape


def test_unet_learned_variance_channels():
    net = small_unet(out_channels=6)
    assert net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).shape == (2, 6, 16, 16)


def test_unet_zero_initialised_output_and_residual_branches():
    net = small_unet()
    out = net(torch.randn(2, 3, 16, 16), torch.tensor([3, 500]))
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(net.out_conv.weight) == 0
    # every residual block's last conv and every attention projection start at zero
    for module in net.modules():
        if hasattr(module, "conv2"):
            assert torch.count_nonzero(module.conv2.weight) == 0
        if hasattr(module, "proj"):
            assert torch.count_nonzero(module.proj.weight) == 0


def test_unet_uses_timestep_and_class_label():
    torch.manual_seed(0)
    net = small_unet(num_classes=10)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5, 5])
    base = net(x, t, Cond(label=torch.tensor([1, 1])))
    assert not torch.allclose(base, net(x, torch.tensor([600, 600]), Cond(label=torch.tensor([1, 1]))))
    assert not torch.allclose(base, net(x, t, Cond(label=torch.tensor([2, 2]))))
    # no label means the reserved null label (index num_classes)
    assert torch.allclose(net(x, t), net(x, t, Cond(label=torch.tensor([10, 10]))))


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = small_unet(num_classes=3)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    net(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), Cond(label=torch.tensor([0, 3]))).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_mlp_shapes_and_zero_init():
    net = MLP(MLPConfig(dim=2, hidden=32, depth=2, num_classes=4))
    out = net(torch.randn(5, 2), torch.arange(5), Cond(label=torch.tensor([0, 1, 2, 3, 4])))
    assert out.shape == (5, 2) and torch.count_nonzero(out) == 0
