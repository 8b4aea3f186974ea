"""ComfyUI's scaled fp8 checkpoints (``diffcore.io.scaled_fp8``): both generations of side keys load
as ``weight * scale`` exactly, rounding to fp8 while loading gives the bits rounding after gives,
layout detection does not see the side keys, and what cannot be read is refused by key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import load_model, tensor_shapes
from diffcore.nn.fp8 import Float8Linear
from diffcore.nn.fp8_options import Rounding, rounding_on_load

E4M3 = torch.float8_e4m3fn


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))


def note(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def scaled_file(tmp_path, per_row: bool = False):
    """Layer 0 in today's format (``weight_scale``, ``input_scale``, ``comfy_quant``), layer 2 in
    the earlier one (``scale_weight``, ``scale_input``, the ``scaled_fp8`` marker), the norm in bf16;
    returns the path and the values each weight stands for."""
    torch.manual_seed(0)
    state = {k: v * 3 for k, v in build().state_dict().items()}
    values, out = {}, {}
    for i, (scale_key, input_key) in ((0, ("weight_scale", "input_scale")), (2, ("scale_weight", "scale_input"))):
        w = state.pop(f"{i}.weight")
        amax = w.abs().amax(dim=1) if per_row else w.abs().amax()
        scale = (amax / 448).float()
        q = (w / (scale[:, None] if per_row else scale)).to(E4M3)
        out |= {f"{i}.weight": q, f"{i}.{scale_key}": scale, f"{i}.{input_key}": torch.tensor(0.5)}
        values[f"{i}.weight"] = q.float() * (scale[:, None] if per_row else scale)
    out |= {"0.comfy_quant": note("float8_e4m3fn"), "scaled_fp8": torch.empty(0, dtype=E4M3)}
    out |= {k: v.to(torch.bfloat16) for k, v in state.items()}
    save_file(out, str(tmp_path / "scaled.safetensors"))
    return tmp_path / "scaled.safetensors", values


@pytest.mark.parametrize("per_row", [False, True])
def test_scaled_weights_load_as_their_values(tmp_path, per_row):
    path, values = scaled_file(tmp_path, per_row)
    net = load_model(build, path)
    for key, value in values.items():
        assert torch.equal(net.state_dict()[key], value) and net.state_dict()[key].dtype == torch.float32
    assert net[3].weight.dtype == torch.float32
    assert sorted(tensor_shapes(path)) == sorted(build().state_dict())   # what layout detection sees


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_rounding_a_scaled_file_while_loading_equals_rounding_after(tmp_path, dtype):
    path, _ = scaled_file(tmp_path)
    want = load_model(build, path, dtype=dtype)
    Rounding().apply(want)
    for rename in (None, dict):   # read as it is, and through a converter that only renames
        with rounding_on_load(Rounding()):
            got = load_model(build, path, dtype=dtype, rename=rename, denoiser=True)
        for i in (0, 2):
            assert type(got[i]) is Float8Linear
            assert torch.equal(got[i].weight_fp8.view(torch.uint8), want[i].weight_fp8.view(torch.uint8))
            assert torch.equal(got[i].scale, want[i].scale)
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())


def test_what_cannot_be_read_is_refused_by_key(tmp_path):
    path, _ = scaled_file(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(path))
    save_file({**state, "2.comfy_quant": note("nvfp4")}, str(tmp_path / "nvfp4.safetensors"))
    with pytest.raises(CheckpointError, match=r"nvfp4.safetensors: 2.comfy_quant says .* 'nvfp4'"):
        load_model(build, tmp_path / "nvfp4.safetensors")
    save_file({**state, "3.weight_scale": torch.tensor(2.0)}, str(tmp_path / "norm.safetensors"))
    with pytest.raises(CheckpointError, match="3.weight_scale scales 3.weight, which is bfloat16, not an fp8"):
        load_model(build, tmp_path / "norm.safetensors")
    save_file({**state, "0.weight_scale": torch.ones(7)}, str(tmp_path / "rows.safetensors"))
    with pytest.raises(CheckpointError, match="0.weight_scale has 7 values for the 512 rows"):
        load_model(build, tmp_path / "rows.safetensors")


def test_a_converter_that_remakes_a_scaled_weight_unannounced_is_an_error(tmp_path):
    """Rounding while loading follows each scaled weight through the converter; a converter that
    makes a new tensor of one without marking it ``copied`` would lose its scale: refused. (A
    converter without ``copied`` has every tensor scaled before it runs.)"""
    path, _ = scaled_file(tmp_path)

    def remakes(state):
        return {k: v.clone() if k == "2.weight" else v for k, v in state.items()}

    with rounding_on_load(Rounding()), pytest.raises(CheckpointError, match=r"1 scaled fp8 weight\(s\) \(2.weight\)"):
        load_model(build, path, rename=remakes, copied=lambda k: False, denoiser=True)
    with rounding_on_load(Rounding()):   # marked: scaled before the converter runs
        got = load_model(build, path, rename=remakes, copied=lambda k: k == "2.weight", denoiser=True)
    want = load_model(build, path)
    Rounding().apply(want)
    assert torch.equal(got[2].dequantized(), want[2].dequantized())
