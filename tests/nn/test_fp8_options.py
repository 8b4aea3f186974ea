"""``diffcore.nn.fp8_options``: the job keys applied to a bundle. ``text_weight_dtype`` stores the
text encoders in fp8 (``store_text_fp8``), whether they are loaded already or still behind their
lazy loader, and is refused for a model without any; fp8 matmuls on a device without them and
weights held outside the network are refused by key."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.models import LazyComponent, ModelBundle
from diffcore.nn.fp8 import Float8Linear
from diffcore.nn.fp8_options import store_text_fp8


@attrs.define(eq=False)
class WithText(ModelBundle):
    _text: nn.Module | None = None
    text = LazyComponent()


def encoders() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleDict({"t5": nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)),
                          "clip": nn.Sequential(nn.Linear(32, 32))})


@pytest.mark.parametrize("loaded", [True, False])
def test_the_text_encoders_are_stored_in_fp8(loaded):
    calls = []

    def load():
        calls.append(1)
        return encoders()

    bundle = WithText(network=nn.Identity(), text=encoders() if loaded else None,
                      loaders={} if loaded else {"text": load})
    x = torch.randn(3, 256)
    want = encoders()["t5"](x)
    store_text_fp8(bundle, "float8_e4m3fn")
    assert calls == [] and bundle.loaded("text") == loaded   # nothing is loaded before it is needed
    t5 = bundle.text["t5"]
    assert [type(m) for m in t5] == [Float8Linear, nn.ReLU, Float8Linear] and type(bundle.text["clip"][0]) is nn.Linear
    assert calls == ([] if loaded else [1])
    error = ((t5(x) - want).norm() / want.norm()).item()
    assert 1e-4 < error < 0.06, error


def test_a_model_without_text_encoders_is_refused_by_key():
    with pytest.raises(ConfigError) as info:
        store_text_fp8(WithText(network=nn.Identity()), "float8_e4m3fn")
    assert info.value.path == "model.text_weight_dtype" and "has none" in str(info.value)


def test_fp8_matmuls_on_a_device_without_them_are_refused_by_key(monkeypatch):
    from types import SimpleNamespace

    import diffcore.nn.fp8_options as fp8
    from diffcore.config.spec import ModelOptions

    assert fp8.fp8_matmul_supported("cpu") and not fp8.fp8_matmul_supported("meta")
    monkeypatch.setattr(fp8, "fp8_matmul_supported", lambda device: False)
    with pytest.raises(ConfigError) as info:
        fp8.store_bundle_fp8(SimpleNamespace(network=nn.Linear(256, 256)), ModelOptions(fp8_matmul=True), "cpu")
    assert info.value.path == "model.fp8_matmul" and "compute capability 8.9" in str(info.value)


def test_weights_held_outside_the_network_are_refused_by_key():
    """Sequential offload leaves meta parameters behind accelerate's hooks: nothing to round."""
    from types import SimpleNamespace

    from diffcore.config.spec import ModelOptions
    from diffcore.nn.fp8_options import store_bundle_fp8

    bundle = SimpleNamespace(network=nn.Linear(256, 256, device="meta"))
    with pytest.raises(ConfigError) as info:
        store_bundle_fp8(bundle, ModelOptions(weight_dtype="float8_e4m3fn"), "cpu")
    assert info.value.path == "model.weight_dtype" and 'use offload = "model"' in str(info.value)
