"""``diffcore.nn.conv``: the oneDNN inference path of ``Conv2d`` is as accurate as fp32 convolution
should be, follows every change of its weight, and steps aside where it would change behaviour."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import diffcore.nn.linear as switch
from diffcore.nn.conv import Conv2d, conv_plus

needs_onednn = pytest.mark.skipif(not switch.ONEDNN_USABLE, reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    monkeypatch.setattr(switch, "ONEDNN", switch.ONEDNN_USABLE)


def exact(layer, x):
    return F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), layer.stride, layer.padding)


@needs_onednn
@pytest.mark.parametrize("channels, out, size, kernel, stride",
                         [(8, 8, 5, 3, 1), (64, 32, 8, 3, 1), (16, 16, 9, 3, 2), (24, 12, 7, 1, 1), (4, 64, 16, 3, 1)])
@torch.inference_mode()
def test_as_accurate_as_fp32_convolution(channels, out, size, kernel, stride):
    torch.manual_seed(channels + size)
    layer = Conv2d(channels, out, kernel, stride=stride, padding=kernel // 2)
    x = torch.randn(2, channels, size, size + 1)
    y = layer(x)
    assert y.shape == F.conv2d(x, layer.weight, layer.bias, stride, kernel // 2).shape
    error = (y.double() - exact(layer, x)).abs().max().item()
    # a sum of channels * kernel^2 fp32 products, in oneDNN's order: a few times the sum's eps
    assert error <= 16 * torch.finfo(torch.float32).eps * (channels * kernel ** 2) ** 0.5 * exact(layer, x).abs().max()


@needs_onednn
@torch.inference_mode()
def test_the_kept_weight_follows_every_change():
    torch.manual_seed(0)
    layer, x = Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 6, 6)
    close = lambda: (layer(x).double() - exact(layer, x)).abs().max().item() < 1e-4
    assert close()
    with torch.no_grad():
        layer.weight.mul_(2)            # in place: the version moves
    assert close()
    layer.weight.data += 1              # through .data, as peft's merge writes: the version stays
    assert close()
    layer.weight = torch.nn.Parameter(torch.randn(8, 8, 3, 3))   # a new tensor
    assert close()
    assert layer(torch.randn(3, 8, 11, 4)).shape == (3, 8, 11, 4)   # another input shape


@needs_onednn
@torch.inference_mode()
def test_copies_pickles_and_moves_leave_the_onednn_copy_behind():
    layer, x = Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 5, 5)
    layer(x)
    assert "_blocked" in layer.__dict__
    twin = copy.deepcopy(layer)
    assert "_blocked" not in twin.__dict__ and torch.equal(twin(x), layer(x))
    torch.save(layer, io.BytesIO())
    layer.double()
    assert "_blocked" not in layer.__dict__
    assert layer(x.double()).dtype == torch.float64


@torch.no_grad()
def test_gradients_other_dtypes_and_the_switch_use_f_conv2d(monkeypatch):
    torch.manual_seed(0)
    ours, ref = Conv2d(4, 6, 3, padding=1), torch.nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 5)
    with torch.enable_grad():
        a, b = ours(x), ref(x)
        assert torch.equal(a, b)
        a.sum().backward(), b.sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad)
    monkeypatch.setattr(switch, "ONEDNN", False)
    assert torch.equal(ours(x), ref(x)) and "_blocked" not in ours.__dict__


@needs_onednn
@torch.inference_mode()
def test_conv_plus_adds_residuals_and_embeddings():
    torch.manual_seed(0)
    layer, x = Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 5, 5)
    for other in (torch.randn(2, 6, 5, 5), torch.randn(2, 6, 1, 1), torch.randn(6, 1, 1)):
        assert torch.equal(conv_plus(layer, x, other), layer(x) + other)
    hooked = Conv2d(8, 6, 3, padding=1)
    hooked.register_forward_hook(lambda module, args, out: out * 0)
    assert torch.equal(conv_plus(hooked, x, other), torch.zeros(2, 6, 5, 5) + other)   # the hook ran
    assert "_blocked" not in hooked.__dict__
