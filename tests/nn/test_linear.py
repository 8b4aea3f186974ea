"""``diffcore.nn.linear``: the oneDNN inference path is as accurate as ``F.linear`` and steps
aside wherever it would change behaviour (autograd, hooks, wrapped layers, other dtypes)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import diffcore.nn.linear as linear_module
from diffcore.nn.linear import GeluMLP, Linear, linear, linear_plus, linear_times, plain, reference_matmuls

needs_onednn = pytest.mark.skipif(not linear_module.ONEDNN_USABLE, reason="this PyTorch build has no oneDNN")


@pytest.fixture(autouse=True)
def onednn_on(monkeypatch):
    """The oneDNN path under test whatever the CPU's vendor (on by default only on AMD)."""
    monkeypatch.setattr(linear_module, "ONEDNN", linear_module.ONEDNN_USABLE)


def error_vs_float64(y: torch.Tensor, x, w, b, activation=None) -> float:
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    if activation is not None:
        exact = F.gelu(exact, approximate="tanh" if activation == "gelu_tanh" else "none")
    return (y.double() - exact).abs().max().item()


@needs_onednn
@settings(max_examples=25, deadline=None, derandomize=True)
@given(rows=st.integers(1, 300), k=st.sampled_from([8, 64, 512, 1000]), n=st.sampled_from([1, 16, 384, 777]),
       lead=st.sampled_from([(), (2,), (1, 3)]), bias=st.booleans(),
       activation=st.sampled_from([None, "gelu", "gelu_tanh"]))
def test_as_accurate_as_f_linear(rows, k, n, lead, bias, activation):
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(*lead, rows, k, generator=g)
    w, b = torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g) if bias else None
    with torch.inference_mode():
        fast = linear(x, w, b, activation)
        with reference_matmuls():
            reference = linear(x, w, b, activation)
    assert fast.shape == reference.shape == (*lead, rows, n)
    # both are fp32 sums of k products in different orders: oneDNN may land a few times MKL's error
    budget = 4 * error_vs_float64(reference, x, w, b, activation) + 16 * torch.finfo(torch.float32).eps
    assert error_vs_float64(fast, x, w, b, activation) <= budget


def test_gradients_go_through_f_linear():
    """Training: the oneDNN op has no autograd formula, so anything needing gradients uses F.linear
    and gets exactly nn.Linear's values and gradients."""
    torch.manual_seed(0)
    ours, ref = Linear(16, 8), torch.nn.Linear(16, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 16)
    a, b = ours(x), ref(x)
    assert torch.equal(a, b)
    a.square().sum().backward(), b.square().sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)


def test_other_dtypes_and_a_bad_activation():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    with pytest.raises(ValueError, match="activation must be one of"):
        linear(x, w, activation="relu")


def test_plain_sees_hooks_and_wrappers():
    layer = Linear(4, 4)
    assert plain(layer) and not plain(torch.nn.Linear(4, 4))
    handle = layer.register_forward_hook(lambda *args: None)
    assert not plain(layer)
    handle.remove()
    layer.forward = lambda x: x  # what accelerate's offload hooks do
    assert not plain(layer)


@torch.no_grad()
def test_gelu_mlp_fused_or_composed_gives_the_same_function():
    """GeluMLP fuses the GELU into its first matmul only while that layer is plain; a hooked (or
    adapter-wrapped) first layer is called as a module, so its hook runs."""
    torch.manual_seed(0)
    mlp, x = GeluMLP(32, 64), torch.randn(5, 32)
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    fused = mlp(x)
    seen = []
    mlp[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
    composed = mlp(x)
    assert seen == [(5, 64)]
    torch.testing.assert_close(fused, composed, rtol=1e-6, atol=1e-6)
    with reference_matmuls():
        expected = mlp[2](F.gelu(F.linear(x, mlp[0].weight, mlp[0].bias), approximate="tanh"))
        assert torch.equal(mlp(x), expected)


def test_environment_switch():
    import os
    import subprocess
    import sys

    code = "import diffcore.nn.linear as m; print(m.ONEDNN)"
    env = {**os.environ, "DIFFCORE_ONEDNN_LINEAR": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    if linear_module.ONEDNN_USABLE:
        env["DIFFCORE_ONEDNN_LINEAR"] = "1"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "True"


def test_on_by_default_on_amd_only(monkeypatch):
    monkeypatch.delenv("DIFFCORE_ONEDNN_LINEAR", raising=False)
    for vendor, expected in (("AuthenticAMD", linear_module.ONEDNN_USABLE), ("GenuineIntel", False), ("", False)):
        monkeypatch.setattr(linear_module, "cpu_vendor", lambda vendor=vendor: vendor)
        assert linear_module._onednn_chosen() == expected, vendor
    monkeypatch.setenv("DIFFCORE_ONEDNN_LINEAR", "on")
    assert linear_module._onednn_chosen() == linear_module.ONEDNN_USABLE


@needs_onednn
@torch.inference_mode()
def test_sums_and_products_inside_the_matmul_equal_doing_them_after():
    torch.manual_seed(0)
    layer, x = Linear(32, 24), torch.randn(2, 40, 32)
    other = torch.randn(2, 40, 24)
    assert torch.equal(linear_plus(layer, x, other), layer(x) + other)
    assert torch.equal(linear_times(x, layer.weight, layer.bias, other), layer(x) * other)
    row = torch.randn(1, 32)   # one row: MKL's call, and the sum after it
    assert torch.equal(linear_plus(layer, row, torch.ones(1, 24)), F.linear(row, layer.weight, layer.bias) + 1)
    broadcast = torch.randn(24)   # not the output's shape: summed after the matmul
    assert torch.equal(linear_plus(layer, x, broadcast), layer(x) + broadcast)
    hooked = Linear(32, 24)
    hooked.register_forward_hook(lambda module, args, out: out * 0)
    assert torch.equal(linear_plus(hooked, x, other), other)
