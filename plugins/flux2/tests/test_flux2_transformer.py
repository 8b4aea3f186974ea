"""Our FLUX.2 transformer against diffusers' Flux2Transformer2DModel with the same (converted) weights."""

from __future__ import annotations

import pytest
import torch

from diffcore.api import attention_layers, ConfigError, patch_attention, resolve_layers
from diffcore_flux2.model import VARIANTS, Flux2, attention_alias
from diffcore_flux2.params import Flux2Params
from diffcore_flux2.sampling import image_ids, reference_tokens, text_ids

TOL = 1e-5


def _inputs(batch=2, height=4, width=6, text=7, channels=16, context=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, height * width, channels, generator=g),
                ctx=torch.randn(batch, text, context, generator=g),
                x_ids=image_ids(height, width), ctx_ids=text_ids(text),
                t=torch.tensor([0.83, 0.31])[:batch])


def _diffusers(model, x, x_ids, ctx, ctx_ids, t, guidance=None):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids, txt_ids=ctx_ids,
                     guidance=guidance, return_dict=False)[0]


@pytest.mark.parametrize("guidance", [True, False], ids=["guidance-embed", "no-guidance"])
def test_parity_with_diffusers(diffusers_transformer, to_ours, guidance):
    ref_model = diffusers_transformer(guidance)
    ours = to_ours(ref_model)
    a = _inputs()
    g = torch.tensor([4.0, 2.5]) if guidance else None
    expected = _diffusers(ref_model, a["x"], a["x_ids"], a["ctx"], a["ctx_ids"], a["t"], g)
    with torch.no_grad():
        got = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=g)
    err = (got - expected).abs().max().item()
    print(f"transformer parity ({'guidance' if guidance else 'no guidance'}): max abs err {err:.3g}, "
          f"output max {expected.abs().max().item():.6g}")
    assert got.shape == expected.shape == a["x"].shape
    assert err <= TOL


def test_parity_with_two_reference_images(diffusers_transformer, to_ours):
    """Reference tokens appended with ids t = 10, 20 (diffusers' pipeline does the concatenation and
    slicing itself, so the reference is run on the concatenated sequence and sliced)."""
    ref_model = diffusers_transformer(True)
    ours = to_ours(ref_model)
    a = _inputs()
    g = torch.Generator().manual_seed(5)
    refs = [torch.randn(16, 4, 4, generator=g), torch.randn(1, 16, 2, 6, generator=g)]
    ref, ref_ids = reference_tokens(refs)
    assert ref.shape == (16 + 12, 16)
    assert ref_ids[:16, 0].unique().tolist() == [10] and ref_ids[16:, 0].unique().tolist() == [20]
    assert ref_ids[16:, 1:].tolist() == image_ids(2, 6)[:, 1:].tolist()
    batch, tokens = a["x"].shape[:2]
    guidance = torch.tensor([3.0, 3.0])
    expected = _diffusers(ref_model, torch.cat([a["x"], ref.expand(batch, -1, -1)], 1),
                          torch.cat([a["x_ids"], ref_ids]), a["ctx"], a["ctx_ids"], a["t"], guidance)[:, :tokens]
    with torch.no_grad():
        got = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=guidance, ref=ref, ref_ids=ref_ids)
        without = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=guidance)
    err = (got - expected).abs().max().item()
    print(f"transformer parity (2 reference images): max abs err {err:.3g}")
    assert got.shape == a["x"].shape
    assert err <= TOL
    assert (got - without).abs().max() > 1e-3, "reference tokens must change the prediction"


def test_per_sample_ids_equal_shared_ids(diffusers_transformer, to_ours):
    ours = to_ours(diffusers_transformer(False))
    a = _inputs()
    with torch.no_grad():
        shared = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"])
        per_sample = ours(a["x"], a["x_ids"].expand(2, -1, -1), a["t"], a["ctx"], a["ctx_ids"][None].expand(2, -1, -1))
    assert torch.equal(shared, per_sample)


def test_guidance_embedded_model_requires_guidance(diffusers_transformer, to_ours):
    ours = to_ours(diffusers_transformer(True))
    a = _inputs()
    with pytest.raises(ValueError, match="guidance="):
        ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"])


def test_attention_layers_are_named_by_block_and_aliased():
    model = Flux2(VARIANTS["tiny"])
    layers = attention_layers(model)
    assert sorted(layers) == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert attention_alias("transformer_blocks.1.attn") == "double_blocks.1"
    assert attention_alias("transformer_blocks.0") == "double_blocks.0"
    assert attention_alias("single_transformer_blocks.1.attn") == "single_blocks.1"
    assert attention_alias("single_transformer_blocks.0") == "single_blocks.0"
    assert attention_alias("double_blocks.1") == "double_blocks.1"
    found = resolve_layers(model, ["transformer_blocks.1.attn", "single_transformer_blocks.0"], attention_alias)
    assert found["transformer_blocks.1.attn"] is layers["double_blocks.1"]
    with pytest.raises(ConfigError, match="single_blocks.0 .. single_blocks.1"):
        resolve_layers(model, ["single_transformer_blocks.7"], attention_alias)


def test_attention_patch_reaches_the_named_rows_only(diffusers_transformer, to_ours):
    """A patch on one layer changes only the patched batch row (how PAG-style guidance uses it)."""
    ours = to_ours(diffusers_transformer(False))
    a = _inputs()
    with torch.no_grad():
        plain = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"])
        layers = resolve_layers(ours, ["single_transformer_blocks.0"], attention_alias)
        with patch_attention(layers, slice(1, 2), lambda q, k, v, attend: v):  # identity attention
            patched = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"])
    assert torch.equal(patched[0], plain[0])
    assert (patched[1] - plain[1]).abs().max() > 1e-3


@pytest.mark.parametrize("bad, message", [
    (dict(num_heads=3), "not divisible by 3 heads"),
    (dict(axes_dim=(8, 8, 8, 4)), r"sum to 28, the head dim is 32"),
    (dict(axes_dim=(9, 7, 8, 8)), "must all be even"),
])
def test_constructor_checks_invariants(bad, message):
    import attrs

    with pytest.raises(ConfigError, match=message):
        Flux2(attrs.evolve(VARIANTS["tiny"], **bad))


def test_variant_table():
    assert VARIANTS["klein-9b"] == Flux2Params(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                                               context_in_dim=12288, guidance_embed=False)
    for name, p in VARIANTS.items():
        assert p.head_dim * p.num_heads == p.hidden_size and sum(p.axes_dim) == p.head_dim, name
    assert VARIANTS["klein-base-4b"] == VARIANTS["klein-4b"] and VARIANTS["klein-base-9b"] == VARIANTS["klein-9b"]


@pytest.mark.parametrize("guidance", [False, True], ids=["klein", "guidance-embed"])
def test_reference_cache_matches_diffusers_kv_modes(diffusers_transformer, to_ours, guidance):
    """klein-9b-kv: the first forward runs [txt, ref, img] with the references modulated at t = 0
    and attending only to themselves, and keeps their keys and values; later forwards splice
    them in. Against diffusers' ``kv_cache_mode="extract"`` then ``"cached"``."""
    from diffcore_flux2.model import ReferenceCache

    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    ref_model = diffusers_transformer(guidance)
    ours = to_ours(ref_model)
    for block in ref_model.transformer_blocks:  # as Flux2KleinKVPipeline sets them
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref_model.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    a = _inputs()
    g = torch.Generator().manual_seed(7)
    ref, ref_ids = reference_tokens([torch.randn(16, 2, 3, generator=g), torch.randn(16, 3, 2, generator=g)])
    batch = a["x"].shape[0]
    gd = torch.tensor([3.0, 3.0]) if guidance else None
    refs = ref.expand(batch, -1, -1)
    with torch.no_grad():
        first, cache = ref_model(hidden_states=torch.cat([refs, a["x"]], 1), encoder_hidden_states=a["ctx"],
                                 timestep=a["t"], img_ids=torch.cat([ref_ids, a["x_ids"]]), txt_ids=a["ctx_ids"],
                                 guidance=gd, return_dict=False, kv_cache_mode="extract",
                                 num_ref_tokens=ref.shape[0])
        later_t = torch.tensor([0.4, 0.2])
        later = ref_model(hidden_states=a["x"], encoder_hidden_states=a["ctx"], timestep=later_t,
                          img_ids=a["x_ids"], txt_ids=a["ctx_ids"], guidance=gd, return_dict=False,
                          kv_cache=cache, kv_cache_mode="cached")[0]
        mine = ReferenceCache()
        got_first = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=gd, ref=ref, ref_ids=ref_ids,
                         ref_cache=mine)
        assert mine.filled and len(mine.kv) == 4
        got_later = ours(a["x"], a["x_ids"], later_t, a["ctx"], a["ctx_ids"], guidance=gd, ref=ref, ref_ids=ref_ids,
                         ref_cache=mine)
        plain = ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=gd, ref=ref, ref_ids=ref_ids)
    for name, got, expected in (("extract", got_first, first), ("cached", got_later, later)):
        err = (got - expected).abs().max().item()
        print(f"klein-kv {name}: max abs err {err:.3g}, output max {expected.abs().max().item():.3g}")
        assert got.shape == a["x"].shape and err <= TOL
    assert (got_first - plain).abs().max() > 1e-3  # the causal reference path is a different model


def test_reference_cache_errors(to_ours, diffusers_transformer):
    from diffcore_flux2.model import ReferenceCache

    ours = to_ours(diffusers_transformer(False))
    a = _inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="empty reference cache"):
        ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], ref_cache=ReferenceCache())
    ref, ref_ids = reference_tokens([torch.randn(16, 2, 2)])
    cache = ReferenceCache()
    with torch.no_grad():
        ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], ref=ref, ref_ids=ref_ids, ref_cache=cache)
        with pytest.raises(ValueError, match="filled for a batch of 2"):
            ours(a["x"][:1], a["x_ids"], a["t"][:1], a["ctx"][:1], a["ctx_ids"], ref_cache=cache)
