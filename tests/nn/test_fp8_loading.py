"""fp8 rounding while a checkpoint is read (``diffcore.nn.fp8.rounding_on_load`` around
``load_model(..., denoiser=True)``): the same layers, bits and outputs as loading first and rounding
after, for every family that loads through ``load_model``, from full-precision and fp8 files alike;
modules that are not the denoiser stay as they are."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffcore.io.checkpoint import load_model
from diffcore.nn.fp8 import Float8Linear
from diffcore.nn.fp8_options import Rounding, rounding_on_load, rounding_while_loading
from diffcore.nn.linear import reference_matmuls

EVERY_LAYER = Rounding(min_features=1)   # the tiny configs' layers are all below 256 features


def randomised(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def assert_same_fp8_network(got: nn.Module, want: nn.Module) -> None:
    layers = {n: m for n, m in want.named_modules() if isinstance(m, Float8Linear)}
    assert layers and {n for n, m in got.named_modules() if isinstance(m, Float8Linear)} == set(layers)
    for name, layer in got.named_modules():
        if name in layers:
            assert torch.equal(layer.weight_fp8.view(torch.uint8), layers[name].weight_fp8.view(torch.uint8)), name
            assert torch.equal(layer.scale, layers[name].scale) and layer.compute_dtype == layers[name].compute_dtype
    want_state = want.state_dict()
    assert got.state_dict().keys() == want_state.keys()
    assert all(torch.equal(t, want_state[k]) and t.dtype == want_state[k].dtype for k, t in got.state_dict().items())


@pytest.mark.parametrize("family", ["flux1", "flux2", "sd3", "sdxl"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
@torch.no_grad()
def test_rounding_while_loading_equals_rounding_after(family, dtype, tiny_case, tmp_path):
    model, args, kw = tiny_case(family)
    save_file(randomised(model).state_dict(), str(tmp_path / "net.safetensors"))
    build = lambda: tiny_case(family)[0]   # noqa: E731 -- built on the meta device by load_model
    want = load_model(build, tmp_path / "net.safetensors", dtype=dtype)
    EVERY_LAYER.apply(want)
    with rounding_on_load(EVERY_LAYER):
        got = load_model(build, tmp_path / "net.safetensors", dtype=dtype, denoiser=True)
    assert rounding_while_loading() is None   # the context is left as it was found
    assert_same_fp8_network(got, want)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    args, kw = [cast(a) if a.is_floating_point() else a for a in args], {
        k: cast(v) if v.is_floating_point() else v for k, v in kw.items()}
    with reference_matmuls():
        assert torch.equal(got(*args, **kw), want(*args, **kw))


@torch.no_grad()
def test_an_fp8_file_is_rounded_layer_by_layer_to_its_own_values(tmp_path):
    """ComfyUI's fp8 checkpoints: each weight stays the value the file holds (a power-of-two row
    scale represents it exactly), without the file being upcast whole first."""
    net = randomised(nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256)))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in net.state_dict().items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    build = lambda: nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))  # noqa: E731
    with rounding_on_load(Rounding()):
        got = load_model(build, tmp_path / "fp8.safetensors", dtype=torch.bfloat16, denoiser=True)
    assert [type(m) for m in got] == [Float8Linear, nn.GELU, Float8Linear, nn.LayerNorm]
    for i in (0, 2):
        assert torch.equal(got[i].dequantized(torch.float32), fp8[f"{i}.weight"].float())
        assert got[i].compute_dtype == torch.bfloat16 and got[i].bias.dtype == torch.bfloat16
    assert got[3].weight.dtype == torch.bfloat16


def test_only_the_denoiser_is_rounded(tmp_path):
    """An autoencoder or ControlNet read inside the same job keeps its precision."""
    save_file(nn.Linear(256, 256).state_dict(), str(tmp_path / "vae.safetensors"))
    with rounding_on_load(Rounding()):
        other = load_model(lambda: nn.Linear(256, 256), tmp_path / "vae.safetensors")
    assert type(other) is nn.Linear and other.weight.dtype == torch.float32
