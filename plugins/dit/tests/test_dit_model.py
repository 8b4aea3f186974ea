"""DiT2D on its own: shapes, invariants, adaLN-Zero init, attention layer names, checkpointing."""

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffcore.api import ConfigError, attention_layers, patch_attention, resolve_layers, timestep_embedding
from diffcore_dit.model import DiT2D, sincos_2d
from diffcore_dit.params import DiTParams


@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8]), patch=st.sampled_from([1, 2, 4]),
       grid=st.integers(1, 4), channels=st.sampled_from([1, 3, 4]), depth=st.integers(1, 2),
       batch=st.integers(1, 3), classes=st.integers(0, 12))
def test_output_has_input_shape(randomize, heads, head_dim, patch, grid, channels, depth, batch, classes):
    params = DiTParams(hidden=heads * head_dim, depth=depth, heads=heads, patch=patch, in_channels=channels,
                       image_size=grid * patch, num_classes=classes)
    model = randomize(DiT2D(params))
    x = torch.randn(batch, channels, grid * patch, grid * patch)
    y = torch.randint(0, classes + 1, (batch,))
    with torch.no_grad():
        out = model(x, torch.rand(batch), y)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert model.pos.shape == (grid * grid, params.hidden)


@pytest.mark.parametrize("change, numbers", [
    (dict(hidden=30, heads=4), ("30", "4 heads")),
    (dict(hidden=18, heads=3), ("18", "multiple of 4")),
    (dict(image_size=10, patch=4), ("10", "patch size 4")),
])
def test_constructor_checks_invariants(tiny, change, numbers):
    with pytest.raises(ConfigError) as err:
        DiT2D(attrs.evolve(tiny, **change))
    assert all(n in str(err.value) for n in numbers)


def test_wrong_input_shape_is_named(tiny):
    with pytest.raises(ValueError, match=r"\(batch, 3, 8, 8\), got \(2, 3, 16, 16\)"):
        DiT2D(tiny)(torch.randn(2, 3, 16, 16), torch.rand(2))


def test_fresh_model_predicts_exactly_zero(tiny):
    model = DiT2D(tiny)
    out = model(torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 4, 5]))
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # adaLN-Zero: every residual branch starts closed
        assert not block.modulation.weight.any() and not block.modulation.bias.any()


def test_sigma_may_be_a_scalar_and_y_none_is_the_null_class(tiny, randomize):
    model = randomize(DiT2D(tiny))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x, torch.tensor(0.3), None)
        b = model(x, torch.full((2,), 0.3), torch.full((2,), tiny.num_classes))
        c = model(x, torch.full((2,), 0.3), torch.tensor([1, 2]))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_attention_layers_are_named_by_block(tiny):
    model = DiT2D(attrs.evolve(tiny, depth=5))
    assert list(attention_layers(model)) == [f"blocks.{i}.attn" for i in range(5)]


def test_attention_patch_touches_only_its_rows(tiny, randomize):
    model = randomize(DiT2D(tiny))
    x, sigma = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1), torch.full((3,), 0.5)
    layers = resolve_layers(model, ["blocks.1.attn"])
    with torch.no_grad(), patch_attention(layers, slice(1, 2), lambda q, k, v, attend: v):
        out = model(x, sigma)
    assert torch.allclose(out[0], out[2]) and not torch.allclose(out[0], out[1])


def test_gradient_checkpointing_gives_the_same_gradients(tiny, randomize):
    model = randomize(DiT2D(tiny))
    x, sigma, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 5])

    def grads():
        model.zero_grad()
        model(x, sigma, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.gradient_checkpointing = True
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_bfloat16_model_takes_and_returns_fp32(tiny, randomize):
    model = randomize(DiT2D(tiny)).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = model(x, torch.rand(2), torch.tensor([0, 1]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_embeddings_follow_dit_layout():
    t = timestep_embedding(torch.tensor([0.0, 500.0]), dim=8, time_factor=1.0)
    assert torch.equal(t[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos | sin
    assert torch.allclose(t[1, 0], torch.cos(torch.tensor(500.0)))
    pos = sincos_2d(8, grid=3)  # token 2 is (row 0, col 2); the first half encodes the column
    angles = torch.tensor([2.0, 2.0 * 1e-2])  # frequencies 1 and 1e4 ** -1/2
    assert torch.allclose(pos[2, :4], torch.cat([angles.sin(), angles.cos()]))
    assert torch.allclose(pos[2, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))
