"""LoRA files on FLUX.2: a peft LoRA in diffusers' format gives diffusers' output; every format
written and read back exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcore.api import LoraLayer, apply_lora, load_lora, save_lora
from diffcore_flux2.plugin import Flux2Config, build_flux2
from diffcore_flux2.sampling import image_ids, text_ids

pytest.importorskip("peft")


def bundle_of(folder):
    return build_flux2(Flux2Config(path=str(folder), dtype="float32", max_sequence_length=16))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 24, 16, generator=g), ctx=torch.randn(2, 7, 48, generator=g), x_ids=image_ids(4, 6),
                ctx_ids=text_ids(7), t=torch.tensor([0.83, 0.31]), guidance=torch.tensor([4.0, 2.5]))


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_a_peft_lora_in_diffusers_format_matches_diffusers(flux2_folder, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    root, parts = flux2_folder(True)
    bundle = bundle_of(root)
    theirs = copy.deepcopy(parts["transformer"]).float().eval()
    targets = ["to_q", "to_v", "add_k_proj", "to_out.0", "to_qkv_mlp_proj", "ff.linear_in", "x_embedder"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=targets), theirs)
    g = torch.Generator().manual_seed(9)
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(theirs).items()}
    state |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in state if k.endswith(".lora_A.weight")}
    save_file(state, tmp_path / "peft.safetensors")
    weights = load_lora(tmp_path / "peft.safetensors", bundle)
    assert weights.format == "diffusers" and weights["double_blocks.0.img_attn.qkv"].rank == 8   # q and v: 2 x 4
    a = inputs()
    expected = theirs(hidden_states=a["x"], encoder_hidden_states=a["ctx"], timestep=a["t"], img_ids=a["x_ids"],
                      txt_ids=a["ctx_ids"], guidance=a["guidance"], return_dict=False)[0]
    base = bundle.network(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=a["guidance"])
    assert (expected - base).abs().max() > 1e-2
    for merge in (False, True):
        network = copy.deepcopy(bundle.network)
        apply_lora(network, weights, merge=merge)
        got = network(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=a["guidance"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore"])
def test_every_format_round_trips_exactly(flux2_folder, tmp_path, format):
    bundle = bundle_of(flux2_folder(True)[0])
    g = torch.Generator().manual_seed(0)
    modules = dict(bundle.network.named_modules())
    lora = {n: LoraLayer(down=torch.randn(3, modules[n].in_features, generator=g),
                         up=torch.randn(modules[n].out_features, 3, generator=g), alpha=1.5)
            for n in bundle.lora_targets("all-linear")}
    back = load_lora(save_lora(tmp_path / "l.safetensors", lora, bundle, format=format), bundle)
    assert back.format == format and set(back) == set(lora)
    for n in lora:
        torch.testing.assert_close(back[n].delta(), lora[n].delta(), rtol=0, atol=1e-6)
