"""``diffcore.nn.fp8``: per-row power-of-two quantisation within e4m3's rounding, fp8 storage equal to
the same network run on the rounded weights, fp8 matmuls equal to their float64 emulation, state
dicts that keep the plain keys, and every family's network converted whole."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from diffcore.nn.fp8 import Float8Linear, quantize_rows, quantize_tokens, store_fp8
from diffcore.nn.linear import reference_matmuls

E4M3 = torch.float8_e4m3fn


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), exponent=st.integers(-30, 30), seed=st.integers(0, 2**16),
       zero_row=st.booleans())
def test_rows_are_rounded_within_e4m3_precision(rows, cols, exponent, seed, zero_row):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 2.0 ** exponent
    if zero_row:
        w[0] = 0
    q, scale = quantize_rows(w.float())
    assert q.dtype == E4M3 and scale.shape == (rows, 1) and scale.dtype == torch.float32
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)   # powers of two: exact in any dtype
    top = q.float().abs().amax(dim=1)
    assert (top <= 448).all() and ((top >= 224) | (top == 0)).all()    # each row's largest value uses the range
    back = q.double() * scale.double()
    assert ((back - w).abs() <= torch.maximum(w.abs() * 2 ** -4, scale.double() * 2 ** -10) * 1.0001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounding_in_row_blocks_is_the_same_and_leaves_the_input(dtype):
    w = (torch.randn(37, 24) * torch.logspace(-3, 3, 37)[:, None]).to(dtype)
    kept = w.clone()
    whole, blocks = quantize_rows(w), quantize_rows(w, block=5)
    assert torch.equal(whole[0].view(torch.uint8), blocks[0].view(torch.uint8)) and torch.equal(whole[1], blocks[1])
    assert torch.equal(w, kept)


def test_a_plain_fp8_weight_comes_back_bit_for_bit():
    w = (torch.randn(32, 48) * 3).to(E4M3).float()
    q, scale = quantize_rows(w)
    assert torch.equal(q.float() * scale, w)


def layer(out=64, inp=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_weights_compute_as_the_rounded_layer(bias, dtype):
    original = layer(bias=bias).to(dtype)
    fp8 = Float8Linear(original)
    x = torch.randn(3, 5, 96).to(dtype)
    q, scale = quantize_rows(original.weight)
    rounded = (q.float() * scale).to(dtype)
    assert torch.equal(fp8.weight, rounded) and fp8.weight.dtype == dtype and fp8.weight_fp8.dtype == E4M3
    torch.testing.assert_close(fp8(x), nn.functional.linear(x, rounded, original.bias), rtol=0, atol=0)
    error = (fp8(x).float() - original(x).float()).norm() / original(x).float().norm()
    assert 1e-4 < error < 0.06


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_matmuls_equal_their_float64_emulation(bias):
    original = layer(bias=bias)
    fp8 = Float8Linear(original, matmul=True)
    x = torch.randn(2, 24, 96) * 5
    rows = x.reshape(-1, 96).double()
    x_scale = rows.abs().amax(dim=1, keepdim=True) / 448
    xq = (rows / x_scale).float().to(E4M3).double() * x_scale
    want = xq @ fp8.dequantized().double().T + (original.bias.double() if bias else 0)
    got = fp8(x).reshape(-1, 64).double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (fp8(x) - original(x)).norm() / original(x).norm() < 0.08
    few = torch.randn(1, 3, 96)   # fewer than 16 rows: the input stays unquantised
    torch.testing.assert_close(fp8(few), nn.functional.linear(few, fp8.dequantized(), original.bias), rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), features=st.integers(1, 300), spread=st.floats(-6, 6),
       dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
       fp8=st.sampled_from([E4M3, torch.float8_e5m2]), seed=st.integers(0, 2 ** 16))
def test_token_quantisation_has_the_bits_of_its_plain_formula(rows, features, spread, dtype, fp8, seed):
    """One reduction and a promoting division give exactly what abs, amax and a float32 copy give,
    zero rows included (their scale is the clamp's)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, features, generator=g) * 10 ** (spread * torch.rand(rows, 1, generator=g))).to(dtype)
    x[0] = 0
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(fp8).max
    want = (x.float() / scale).to(fp8)
    got, got_scale = quantize_tokens(x, fp8)
    assert got.dtype == fp8 and got_scale.dtype == torch.float32 and torch.equal(got_scale, scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_state_dicts_keep_the_plain_keys_and_values():
    net = nn.Sequential(layer(), nn.GELU(), layer(96, 64, seed=1))
    plain_keys = list(net.state_dict())
    converted = copy.deepcopy(net)
    assert store_fp8(converted, min_features=1) == ["0", "2"]
    state = converted.state_dict()
    assert list(state) == plain_keys and all(v.dtype == torch.float32 for v in state.values())
    q, scale = quantize_rows(net[0].weight)
    assert torch.equal(state["0.weight"], q.float() * scale)
    fresh = copy.deepcopy(converted)                    # loading plain weights quantises them again
    fresh.load_state_dict(net.state_dict())
    assert torch.equal(fresh[0].weight_fp8, converted[0].weight_fp8) and torch.equal(fresh[0].scale, converted[0].scale)
    reloaded = copy.deepcopy(net)
    reloaded.load_state_dict(state)                     # and a plain network takes the converted one's
    x = torch.randn(4, 96)
    torch.testing.assert_close(reloaded(x), converted(x), rtol=1e-6, atol=1e-6)


def test_a_dtype_move_keeps_the_weight_in_fp8():
    fp8 = Float8Linear(layer())
    stored, scale = fp8.weight_fp8.clone(), fp8.scale.clone()
    fp8.to(torch.bfloat16)
    assert fp8.weight_fp8.dtype == E4M3 and torch.equal(fp8.weight_fp8.float(), stored.float())
    assert fp8.scale.dtype == torch.float32 and torch.equal(fp8.scale, scale)
    assert fp8.weight.dtype == fp8.bias.dtype == torch.bfloat16
    assert fp8(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16
    fp8.float()
    assert fp8.weight.dtype == torch.float32 and fp8.weight_fp8.dtype == E4M3


def test_small_and_skipped_layers_stay():
    net = nn.ModuleDict({"proj_in": nn.Linear(64, 512), "body": nn.Linear(512, 512), "mod": nn.Linear(512, 1024)})
    assert store_fp8(net, skip=("mo*",)) == ["body"]
    assert type(net["proj_in"]) is nn.Linear and type(net["mod"]) is nn.Linear and type(net["body"]) is Float8Linear


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="weight dtype must be one of"):
        store_fp8(nn.Linear(4, 4), "float16")
    with pytest.raises(ValueError, match="fp8 matmuls take float8_e4m3fn weights"):
        store_fp8(nn.Linear(4, 4), "float8_e5m2", matmul=True)


def test_a_peft_adapter_keeps_working_over_an_fp8_base():
    peft = pytest.importorskip("peft")
    net = nn.Sequential(layer(), nn.GELU(), layer(96, 64, seed=1))
    wrapped = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), net)
    x = torch.randn(5, 96)
    with torch.no_grad():
        want = wrapped(x)
        delta = wrapped[0].lora_B["default"](wrapped[0].lora_A["default"](x)) * wrapped[0].scaling["default"]
    store_fp8(wrapped, min_features=1)
    assert type(wrapped[0].base_layer) is Float8Linear
    with torch.no_grad():
        got = wrapped(x)
        base = wrapped[0].base_layer(x)
    h = nn.functional.gelu(base + delta)
    torch.testing.assert_close(got, wrapped[2](h), rtol=1e-6, atol=1e-6)
    assert (got - want).norm() / want.norm() < 0.06


def lora(out=64, inp=96, rank=4, seed=5):
    from diffcore.lora.weights import LoraLayer

    g = torch.Generator().manual_seed(seed)
    return LoraLayer(down=torch.randn(rank, inp, generator=g) * 0.3, up=torch.randn(out, rank, generator=g) * 0.3,
                     alpha=2.0)


@torch.no_grad()
def test_a_merged_lora_is_added_to_the_fp8_weight_and_rounded_again():
    from diffcore.lora.apply import apply_lora

    net = nn.Sequential(layer())
    store_fp8(net, min_features=1)
    before = net[0].dequantized(torch.float32)
    apply_lora(net, {"0": lora()}, scale=0.7)
    q, scale = quantize_rows(before + 0.7 * lora().delta())
    assert type(net[0]) is Float8Linear and net[0].weight_fp8.dtype == E4M3
    assert torch.equal(net[0].weight_fp8.float(), q.float()) and torch.equal(net[0].scale, scale)


@torch.no_grad()
def test_an_unmerged_lora_runs_beside_the_fp8_layer_in_full_precision():
    from diffcore.lora.apply import apply_lora, remove_lora

    net = nn.Sequential(layer())
    store_fp8(net, min_features=1)
    x = torch.randn(3, 96)
    base = net(x)
    apply_lora(net, {"0": lora()}, scale=0.7, merge=False)
    torch.testing.assert_close(net(x), base + 0.7 * x @ lora().delta().T, rtol=1e-5, atol=1e-5)
    assert remove_lora(net) == 1 and torch.equal(net(x), base)


def test_layers_with_hooks_are_refused_rather_than_dropped():
    """Replacing a hooked layer would silently lose what the hook adds (an unmerged LoRA)."""
    from diffcore.lora.apply import apply_lora

    net = nn.Sequential(layer())
    apply_lora(net, {"0": lora()}, merge=False)
    with pytest.raises(ValueError, match="forward hooks .* store fp8 first"):
        store_fp8(net, min_features=1)


def test_gradients_flow_through_an_fp8_layer_keeping_only_its_fp8_weight():
    """Training on an fp8 base: the input's and the bias's gradients are those of the rounded
    layer, the weight takes none, and what autograd keeps is the 1-byte weight, not a copy."""
    original = layer()
    fp8 = Float8Linear(original)
    rounded = copy.deepcopy(original)
    with torch.no_grad():
        rounded.weight.copy_(fp8.dequantized())
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    assert saved and all(t.dtype == E4M3 or t.numel() <= 64 for t in saved)   # the fp8 weight and row scales
    (y * y).sum().backward()
    y_ref = rounded(x_ref)
    (y_ref * y_ref).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fp8.bias.grad, rounded.bias.grad, rtol=1e-6, atol=1e-6)
    assert fp8.weight_fp8.grad is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8(x).dtype == torch.bfloat16


def test_convolutions_compute_as_the_rounded_ones_and_pass_gradients():
    """A zero-padded ``nn.Conv2d`` becomes a ``Float8Conv2d`` (one scale per output channel): its
    output and its input's and bias's gradients are the rounded convolution's; reflect padding
    and small kernels stay as they are."""
    from diffcore.nn.fp8 import Float8Conv2d

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(32, 256, 3, padding=1, stride=2),
                        nn.Conv2d(256, 256, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 8, 1))
    rounded = copy.deepcopy(net)
    assert store_fp8(net) == ["0"] and type(net[0]) is Float8Conv2d
    with torch.no_grad():
        rounded[0].weight.copy_(net[0].dequantized())
    assert (net[0].scale.shape, net[0].weight.shape) == ((256, 1), (256, 32, 3, 3))
    x = torch.randn(2, 32, 9, 9, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = net[0](x), rounded[0](x_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[0].bias.grad, rounded[0].bias.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(net[0](x), y_ref, rtol=0, atol=0)


# ---- every family's network, converted whole (min_features=1: the tiny configs' layers are small)

def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and (p == 1).all() else 0.0))
    return model.eval()


@pytest.mark.parametrize("family", ["dit", "flux1", "flux2", "sd3", "sdxl"])
@torch.no_grad()
def test_every_family_runs_whole_in_fp8(family, tiny_case):
    """Storage: the converted network is the original one on rounded weights (so no layer reads the
    raw fp8 tensor); fp8 matmuls: within the error of quantising the activations too."""
    model, args, kw = tiny_case(family)
    model = randomised(model)
    layers = sum(isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros")
                 for m in model.modules())
    stored, multiplied = copy.deepcopy(model), copy.deepcopy(model)
    assert len(store_fp8(stored, min_features=1)) == layers > 0
    store_fp8(multiplied, matmul=True, min_features=1)
    rounded = copy.deepcopy(model)
    rounded.load_state_dict(stored.state_dict())
    with reference_matmuls():
        want, original = rounded(*args, **kw), model(*args, **kw)
        got, fast = stored(*args, **kw), multiplied(*args, **kw)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert 1e-4 < (got - original).norm() / original.norm() < 0.25   # random weights amplify errors
    assert (fast - original).norm() / original.norm() < 0.3


@pytest.mark.parametrize("matmul", [False, True])
@torch.no_grad()
def test_an_fp8_network_compiles_in_one_graph_to_the_eager_output(matmul):
    import torch._dynamo as dynamo

    from diffcore.nn.compile import compile_network

    net = nn.Sequential(layer(), nn.GELU(), layer(96, 64, seed=1)).eval()
    store_fp8(net, matmul=matmul, min_features=1)
    x = torch.randn(2, 16, 96)
    eager = net(x)
    dynamo.reset()
    compile_network(net, fullgraph=True)   # a graph break would raise
    assert (net(x) - eager).abs().max() <= 1e-5 * eager.abs().max()
    dynamo.reset()
