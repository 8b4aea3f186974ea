"""Key layouts (BFL / diffusers / ComfyUI), variant detection, and loading files of each layout."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcore.api import CheckpointError, save_file_atomic
from diffcore_flux2.convert import (
    COMFYUI_PREFIX,
    bfl_to_diffusers,
    detect_layout,
    detect_variant,
    diffusers_to_bfl,
    meta_state,
    params_from_state,
    to_bfl,
)
from diffcore_flux2.load import load_transformer, transformer_params
from diffcore_flux2.model import VARIANTS, Flux2
from diffcore_flux2.sampling import image_ids, text_ids

# BFL / diffusers key counts of the full-size transformers (facts file, part A section 1)
FULL_SIZE = {"dev": (299, 331), "klein-4b": (149, 169), "klein-9b": (201, 233)}


def _diffusers_meta(name: str):
    from diffusers import Flux2Transformer2DModel

    p = VARIANTS[name]
    with torch.device("meta"):
        return Flux2Transformer2DModel(num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                                       num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
                                       guidance_embeds=p.guidance_embed)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_keys_and_shapes_equal_diffusers(name):
    with torch.device("meta"):
        ours = Flux2(VARIANTS[name])
    theirs = _diffusers_meta(name).state_dict()
    mine = ours.state_dict()
    assert (len(mine), len(theirs)) == FULL_SIZE[name]
    assert _shapes(bfl_to_diffusers(dict(mine))) == _shapes(theirs)
    assert _shapes(diffusers_to_bfl(dict(theirs))) == _shapes(mine)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.startswith("tiny")])
def test_variant_detection_from_meta_state_dicts(name):
    """diffusers' single-file loader says "flux-2-dev" for all of these."""
    with torch.device("meta"):
        bfl = Flux2(VARIANTS[name]).state_dict()
    hint = {"base": "flux-2-klein-base-4b.safetensors", "kv": "/models/flux-2-klein-9b-kv.safetensors"}.get(
        next((tag for tag in ("base", "kv") if tag in name.split("-")), ""), "")
    layouts = {"bfl": bfl, "diffusers": bfl_to_diffusers(dict(bfl)),
               "comfyui": {COMFYUI_PREFIX + k: v for k, v in bfl.items()}}
    for layout, state in layouts.items():
        assert detect_layout(state) == layout
        assert detect_variant(state, hint=hint) == name, layout
        assert params_from_state(state) == VARIANTS[name]
    if hint:  # same shapes as the distilled model: without a hint the distilled one is reported
        assert detect_variant(bfl) == name.replace("base-", "").replace("-kv", "")
        assert detect_variant(bfl, hint="/models/kvasir/klein.safetensors") == detect_variant(bfl)  # a word, not letters


def test_detection_reads_shapes_not_the_table():
    with torch.device("meta"):
        state = Flux2(VARIANTS["klein-4b"]).state_dict()
    del state["single_blocks.19.linear1.weight"], state["single_blocks.19.linear2.weight"]
    del state["single_blocks.19.norm.query_norm.scale"], state["single_blocks.19.norm.key_norm.scale"]
    assert params_from_state(state).depth_single_blocks == 19
    with pytest.raises(CheckpointError, match=r"hidden 3072 \(24 heads\), 5 double \+ 19 single blocks"):
        detect_variant(state)


def test_conversion_round_trip_is_exact(diffusers_transformer):
    theirs = diffusers_transformer(True).state_dict()
    mine = diffusers_to_bfl(dict(theirs))
    assert len(mine) == len(theirs) - 4 * VARIANTS["tiny"].depth  # q, k, v fused per stream
    back = bfl_to_diffusers(dict(mine))
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], theirs[k]) for k in theirs)
    adaln = mine["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(adaln[:64], theirs["norm_out.linear.weight"][64:])  # BFL shift first, diffusers scale first


def test_unknown_keys_are_reported():
    with torch.device("meta"):
        state = Flux2(VARIANTS["tiny"]).state_dict()
    state["double_blocks.0.img_mod.lin.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError, match=r"1 key\(s\) .* double_blocks.0.img_mod.lin.weight"):
        to_bfl(dict(state))
    with pytest.raises(CheckpointError, match="not a FLUX.2 transformer"):
        detect_layout({"img_in.weight": None, "vector_in.in_layer.weight": None})


def test_files_of_every_layout_load_to_the_same_model(tmp_path, diffusers_transformer):
    theirs = diffusers_transformer(False, seed=3)
    theirs.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    bfl = diffusers_to_bfl(dict(theirs.state_dict()))
    save_file_atomic(bfl, tmp_path / "flux-2-klein-base-tiny.safetensors")
    save_file_atomic({COMFYUI_PREFIX + k: v for k, v in bfl.items()}, tmp_path / "comfy.safetensors")

    assert transformer_params(tmp_path / "flux-2-klein-base-tiny.safetensors") == ("tiny-klein", VARIANTS["tiny-klein"])
    models = {name: load_transformer(path).eval() for name, path in [
        ("diffusers", tmp_path / "diffusers"), ("bfl", tmp_path / "flux-2-klein-base-tiny.safetensors"),
        ("comfyui", tmp_path / "comfy.safetensors")]}
    states = {name: m.state_dict() for name, m in models.items()}
    assert all(states["bfl"].keys() == s.keys() and all(torch.equal(states["bfl"][k], s[k]) for k in s)
               for s in states.values())
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 12, 16, generator=g), torch.randn(1, 5, 48, generator=g)

    def run(m):
        with torch.no_grad():
            return m(x, image_ids(3, 4), torch.tensor([0.5]), ctx, text_ids(5))

    with torch.no_grad():
        expected = theirs(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.5]),
                          img_ids=image_ids(3, 4), txt_ids=text_ids(5), return_dict=False)[0]
    # Loaded weights are views into the mapped files, aligned as each file's header falls (8 bytes),
    # and CPU matmul kernels round differently with alignment: equal up to float32 rounding (~1e-6 here) as loaded, and
    # bit-identical once each model's weights sit in fresh (aligned) memory.
    outs = {name: run(m) for name, m in models.items()}
    assert all((out - outs["bfl"]).abs().max() <= 1e-5 for out in outs.values())
    fresh = {name: run(copy.deepcopy(m)) for name, m in models.items()}
    assert torch.equal(fresh["diffusers"], fresh["bfl"]) and torch.equal(fresh["bfl"], fresh["comfyui"])
    assert (fresh["bfl"] - expected).abs().max() <= 1e-5


def test_loading_into_the_wrong_variant_names_the_keys(tmp_path, diffusers_transformer):
    bfl = diffusers_to_bfl(dict(diffusers_transformer(False).state_dict()))
    save_file_atomic(bfl, tmp_path / "klein.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key\(s\): guidance_in"):
        load_transformer(tmp_path / "klein.safetensors", variant="tiny")
    with pytest.raises(CheckpointError, match='unknown FLUX.2 variant .*did you mean "klein-4b"'):
        load_transformer(tmp_path / "klein.safetensors", variant="klein-4")


def test_meta_state_from_shapes_detects_like_tensors():
    with torch.device("meta"):
        state = Flux2(VARIANTS["klein-9b"]).state_dict()
    assert detect_variant(meta_state(_shapes(state))) == "klein-9b"


@torch.no_grad()
def test_rounding_to_fp8_while_loading_every_layout(tmp_path, diffusers_transformer):
    """A generate job's fp8 weights are rounded as the file is read: diffusers' split q/k/v are fused
    first (the keys ``fused_on_load`` names), then rounded, and a ComfyUI fp8 file keeps its own
    values; each equals loading in full precision and rounding after."""
    from diffcore.api import Float8Linear, Rounding, rounding_on_load

    theirs = diffusers_transformer(False, seed=3)
    theirs.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    bfl = diffusers_to_bfl(dict(theirs.state_dict()))
    comfy = {COMFYUI_PREFIX + k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in bfl.items()}
    save_file_atomic(comfy, tmp_path / "comfy.safetensors")
    # Comfy-Org's flux2_dev_fp8mixed layout: per-tensor weight_scale, input_scale and comfy_quant
    quant = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
    mixed = {}
    for k, v in bfl.items():
        if v.ndim == 2:
            scale = v.abs().amax().float() / 448
            mixed |= {k: (v / scale).to(torch.float8_e4m3fn), k.replace(".weight", ".weight_scale"): scale,
                      k.replace(".weight", ".input_scale"): torch.ones(()), k.replace(".weight", ".comfy_quant"): quant.clone()}
        else:
            mixed[k] = v
    save_file_atomic({COMFYUI_PREFIX + k: v for k, v in mixed.items()}, tmp_path / "mixed.safetensors")
    rounding = Rounding(min_features=1)
    for path in (tmp_path / "diffusers", tmp_path / "comfy.safetensors", tmp_path / "mixed.safetensors"):
        want = load_transformer(path, dtype=torch.bfloat16)
        rounding.apply(want)
        with rounding_on_load(rounding):
            got = load_transformer(path, dtype=torch.bfloat16)
        layers = {n: m for n, m in got.named_modules() if isinstance(m, Float8Linear)}
        assert "double_blocks.0.img_attn.qkv" in layers and layers.keys() == {
            n for n, m in want.named_modules() if isinstance(m, Float8Linear)}
        for name, layer in want.named_modules():
            if name in layers:
                assert torch.equal(layers[name].dequantized(), layer.dequantized()), (path.name, name)
        assert all(torch.equal(t, want.state_dict()[k]) for k, t in got.state_dict().items())
