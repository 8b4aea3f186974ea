"""LoRA files on SD3: a peft LoRA in diffusers' format (separate q, k, v fused onto our qkv) gives
diffusers' output; every format written and read back exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcore.api import LoraLayer, apply_lora, load_lora, save_lora

pytest.importorskip("peft")


def bundle_of(folder):
    from diffcore_sd3.plugin import SD3Config, build_sd3

    return build_sd3(SD3Config(path=str(folder), dtype="float32", max_sequence_length=8))


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_a_peft_lora_in_diffusers_format_matches_diffusers(tiny_pipeline, sd3_inputs, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    theirs = copy.deepcopy(pipe.transformer).float().eval()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "add_v_proj", "to_out.0",
                                                                          "ff.net.2", "proj_out"]), theirs)
    g = torch.Generator().manual_seed(9)
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(theirs).items()}
    state |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0) for k in state if k.endswith(".lora_A.weight")}
    save_file(state, tmp_path / "peft.safetensors")
    weights = load_lora(tmp_path / "peft.safetensors", bundle)
    x = sd3_inputs()
    expected = theirs(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                      timestep=1000 * x["timesteps"]).sample
    base = bundle.network(**x)
    assert (expected - base).abs().max() > 1e-2
    for merge in (False, True):
        network = copy.deepcopy(bundle.network)
        apply_lora(network, weights, merge=merge)
        torch.testing.assert_close(network(**x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore"])
def test_every_format_round_trips_exactly(tiny_pipeline, tmp_path, format):
    bundle = bundle_of(tiny_pipeline[0])
    g = torch.Generator().manual_seed(0)
    modules = dict(bundle.network.named_modules())
    names = [n for n in bundle.lora_targets("all-linear") if format != "diffusers" or bundle.diffusers_modules([n])]
    lora = {n: LoraLayer(down=torch.randn(3, modules[n].in_features, generator=g),
                         up=torch.randn(modules[n].out_features, 3, generator=g), alpha=1.5) for n in names}
    back = load_lora(save_lora(tmp_path / "l.safetensors", lora, bundle, format=format), bundle)
    assert back.format == format and set(back) == set(lora)
    for n in lora:
        torch.testing.assert_close(back[n].delta(), lora[n].delta(), rtol=0, atol=1e-6)


def test_text_encoder_lora_file_gives_diffusers_prompt_embeddings(tiny_pipeline, tmp_path):
    """``train_text_encoder`` on SD3 puts adapters on CLIP-L and CLIP-G (T5 frozen, no adapters);
    the exported diffusers file in StableDiffusion3Pipeline (load_lora_weights) gives the trained
    encoders' embeddings, as diffcore gives with the file applied."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from diffcore.api import apply_lora_to_bundle, registry, structure
    from diffcore.testing import plugins_for_test

    folder = tiny_pipeline[0]
    bundle = bundle_of(folder)
    with plugins_for_test():
        component = registry("trainers").get("lora")
        lora = component.factory(structure({"rank": 2, "target_modules": "attention", "train_text_encoder": True,
                                            "text_encoder_alpha": 3.0, "save_format": "diffusers"},
                                           component.config), bundle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert set(lora.text_targets) == {"text_encoder", "text_encoder_2"}
    assert not any(hasattr(m, "lora_A") for m in bundle.text.t5.modules())
    path = lora.export(tmp_path, bundle=bundle)[0]
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight" in load_file(path)
    prompts = ["a red cat on a mat", "two dogs"]
    with torch.no_grad():
        trained = bundle.encode_captions(prompts)
    mine = bundle_of(folder)
    apply_lora_to_bundle(mine, load_lora(path, mine), merge=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        again = mine.encode_captions(prompts)
        context, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                   max_sequence_length=8)
    for ours in (trained, again):
        torch.testing.assert_close(ours["context"], context, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours["y"], pooled, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (bundle_of(folder).encode_captions(prompts)["y"] - pooled).abs().max() > 1e-2
