"""LoRA files on SDXL: a peft LoRA on diffusers' UNet in diffusers' format (``unet.`` keys) gives
diffusers' output on ours; kohya's keys are our (SGM) names; every format round trips."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcore.api import LoraLayer, ModelBundle, apply_lora, load_lora, save_lora
from diffcore_sdxl.bundle import SDXLBundle
from diffcore_sdxl.convert import diffusers_to_stability
from diffcore_sdxl.model import VARIANTS, UNet, label_vector

pytest.importorskip("peft")


def bundle_for(ref):
    network = UNet(VARIANTS["tiny"]).eval()
    network.load_state_dict(diffusers_to_stability(dict(ref.state_dict())), strict=True)
    bundle = SDXLBundle.__new__(SDXLBundle)   # only the network and the naming are needed here
    ModelBundle.__init__(bundle, network=network)
    return bundle


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_a_peft_lora_in_diffusers_format_matches_diffusers(diffusers_unet, unet_inputs, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    ref = diffusers_unet("tiny")
    bundle = bundle_for(ref)
    theirs = copy.deepcopy(ref)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                          "ff.net.2", "proj_in", "linear_1"]), theirs)
    g = torch.Generator().manual_seed(9)
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(theirs).items()}
    state |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in state if k.endswith(".lora_A.weight")}
    save_file(state, tmp_path / "peft.safetensors")
    weights = load_lora(tmp_path / "peft.safetensors", bundle)
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params)
    expected = theirs(x, t, encoder_hidden_states=context,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    assert (expected - bundle.network(x, t, context, y)).abs().max() > 1e-2
    for merge in (False, True):
        network = copy.deepcopy(bundle.network)
        apply_lora(network, weights, merge=merge)
        # float32 rounding (of W + delta merged, of peft's order of products hooked) shows as 1e-5 to
        # 2e-5 on outputs of size ~3, depending on the CPU's kernels (AVX-512, AVX2): 1e-5 of their range
        torch.testing.assert_close(network(x, t, context, y), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore"])
def test_every_format_round_trips_exactly(diffusers_unet, tmp_path, format):
    from safetensors.torch import load_file

    bundle = bundle_for(diffusers_unet("tiny"))
    g = torch.Generator().manual_seed(0)
    modules = dict(bundle.network.named_modules())
    lora = {n: LoraLayer(down=torch.randn(3, modules[n].in_features, generator=g),
                         up=torch.randn(modules[n].out_features, 3, generator=g), alpha=1.5)
            for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    path = save_lora(tmp_path / "l.safetensors", lora, bundle, format=format)
    keys = list(load_file(path))
    if format == "kohya":
        assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    if format == "diffusers":
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    back = load_lora(path, bundle)
    assert back.format == format and set(back) == set(lora)
    for n in lora:
        torch.testing.assert_close(back[n].delta(), lora[n].delta(), rtol=0, atol=1e-6)
