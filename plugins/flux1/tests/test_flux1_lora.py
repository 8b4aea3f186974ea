"""LoRA files on FLUX.1: a diffusers / PEFT file gives diffusers' outputs on diffcore's fused
layers, every format round-trips exactly, bad files are errors naming their keys, and the
generate job's [[lora]] tables (merged or not) agree."""

from __future__ import annotations

import copy

import attrs
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcore.api import ConfigError, LoraLayer, apply_lora, load_lora, save_lora
from diffcore_flux1.bundle import FluxBundle
from diffcore_flux1.convert import diffusers_to_bfl
from diffcore_flux1.model import VARIANTS, Flux

pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "ff.net.2", "proj_mlp", "norm1.linear"]


def ours_from(ref) -> FluxBundle:
    network = Flux(attrs.evolve(VARIANTS["tiny"], guidance_embed=True)).eval()
    network.load_state_dict(diffusers_to_bfl(dict(ref.state_dict())), strict=True)
    return FluxBundle(network=network)


def run_ours(bundle, x):
    return bundle.network(**x)


def run_diffusers(ref, x):
    return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
               timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample


def peft_file(ref, path, seed=0):
    """A rank-4 PEFT adapter (random A and B, alpha 8) on ``ref``, saved as diffusers saves LoRAs
    (``transformer.``-prefixed keys, peft's config in the ``lora_adapter_metadata`` entry)."""
    import json

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), ref)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = get_peft_model_state_dict(ref)
    metadata = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8, "target_modules": TARGETS})}
    save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return ref


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
@torch.no_grad()
def test_a_diffusers_lora_gives_diffusers_outputs(diffusers_flux, flux_inputs, tmp_path, merge):
    base = diffusers_flux(guidance=True)
    bundle = ours_from(base)
    x = flux_inputs()
    before = run_ours(bundle, x)
    ref = peft_file(copy.deepcopy(base), tmp_path / "lora.safetensors")
    weights = load_lora(tmp_path / "lora.safetensors", bundle)
    # separate q, k, v adapters (rank 4 each) became one rank-12 adapter on the fused qkv
    assert weights["double_blocks.0.img_attn.qkv"].rank == 12 and weights["single_blocks.0.linear1"].rank == 16
    apply_lora(bundle.network, weights, merge=merge)
    expected, got = run_diffusers(ref, x), run_ours(bundle, x)
    assert (expected - before).abs().max() > 0.1   # the LoRA changes the output
    # outputs reach about 25: relative to them the two agree to about 1e-6 (merging rounds once more)
    assert (got - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()


def random_weights(bundle, seed=1) -> dict[str, LoraLayer]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in bundle.lora_targets("all-linear")[::3]:
        layer = bundle.network.get_submodule(name)
        out[name] = LoraLayer(torch.randn(3, layer.in_features, generator=g),
                              torch.randn(layer.out_features, 3, generator=g) * 0.1, 5.0)
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui", "diffcore"])
def test_every_format_round_trips_exactly(diffusers_flux, flux_inputs, tmp_path, fmt):
    base = diffusers_flux(guidance=True)
    weights = random_weights(ours_from(base))
    path = save_lora(tmp_path / f"{fmt}.safetensors", weights, ours_from(base), format=fmt)
    again = load_lora(path, ours_from(base))
    assert again.keys() == weights.keys()
    for name, layer in weights.items():
        torch.testing.assert_close(again[name].delta(), layer.delta(), rtol=1e-6, atol=1e-6)
    a, b = ours_from(base), ours_from(base)
    apply_lora(a.network, weights)
    apply_lora(b.network, again)
    x = flux_inputs()
    with torch.no_grad():
        out = run_ours(a, x)
        # exact up to float rounding: a split-and-refused adapter sums the same products in another order
        assert (out - run_ours(b, x)).abs().max().item() <= 2e-6 * max(1.0, out.abs().max().item())
    keys = list(load_file(path))
    assert {"diffusers": "transformer.", "kohya": "lora_unet_", "comfyui": "diffusion_model.",
            "diffcore": "double_blocks."}[fmt] in keys[0] or any(k.startswith("single_blocks") for k in keys)


def test_a_fused_adapter_splits_into_diffusers_parts_exactly(diffusers_flux, tmp_path):
    bundle = ours_from(diffusers_flux(guidance=True))
    qkv = bundle.network.get_submodule("double_blocks.0.img_attn.qkv")
    g = torch.Generator().manual_seed(0)
    layer = LoraLayer(torch.randn(4, qkv.in_features, generator=g), torch.randn(qkv.out_features, 4, generator=g), 2.0)
    save_lora(tmp_path / "d.safetensors", {"double_blocks.0.img_attn.qkv": layer}, bundle, format="diffusers")
    saved = load_file(tmp_path / "d.safetensors")
    parts = [saved[f"transformer.transformer_blocks.0.attn.to_{p}.lora_B.weight"] for p in "qkv"]
    torch.testing.assert_close(torch.cat(parts) @ saved["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
                               layer.delta(), rtol=1e-6, atol=1e-6)


def test_bad_files_are_errors_naming_what_is_wrong(diffusers_flux, tmp_path):
    bundle = ours_from(diffusers_flux(guidance=True))
    weights = random_weights(bundle)
    path = save_lora(tmp_path / "ok.safetensors", weights, format="diffcore")
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key.replace("double_blocks", "duble_blocks").replace("single_blocks", "singel_blocks")] = tensors.pop(key)
    save_file(tensors, str(tmp_path / "typo.safetensors"))
    with pytest.raises(ConfigError, match=r"typo\.safetensors: \d+ LoRA keys match no layer of Flux .*(duble|singel)"):
        load_lora(tmp_path / "typo.safetensors", bundle)
    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(b"not even opened " + str(marker).encode())
    with pytest.raises(ConfigError, match=r"evil\.pt: LoRA files load from \.safetensors only"):
        load_lora(tmp_path / "evil.pt", bundle)
    assert not marker.exists()
    with pytest.raises(ConfigError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", bundle)


def test_generate_job_with_two_loras_merged_or_not(tiny_pipeline, run_job, tmp_path):
    from diffcore_flux1.plugin import Flux1Config, build_flux1

    folder = tiny_pipeline[0]
    bundle = build_flux1(Flux1Config(path=str(folder), dtype="float32", max_sequence_length=16))
    for i in range(2):
        save_lora(tmp_path / f"l{i}.safetensors", {k: attrs.evolve(v, up=v.up * 0.5) for k, v in
                                                   random_weights(bundle, seed=i).items()}, bundle,
                  format=["diffusers", "kohya"][i])
    plain, _ = run_job(tmp_path / "plain", {"path": str(folder)}, sampling_steps=2, height=16, width=16)
    images = {}
    for merge in (True, False):
        tables = [{"path": str(tmp_path / f"l{i}.safetensors"), "scale": [1.0, 0.5][i], "merge": merge}
                  for i in range(2)]
        images[merge], params = run_job(tmp_path / f"merge-{merge}", {"path": str(folder)}, sampling_steps=2, height=16, width=16,
                                        tables={"lora": tables})
    assert params["lora"][1]["scale"] == 0.5
    assert (images[True] - plain).abs().max() > 1e-3
    assert (images[True] - images[False]).abs().max() <= 1e-5


def test_lora_inspect_prints_format_ranks_targets_and_unmatched_keys(tiny_pipeline, tmp_path):
    import tomli_w

    from diffcore.testing import plugins_for_test, run_cli
    from diffcore_flux1.plugin import Flux1Config, build_flux1

    folder = tiny_pipeline[0]
    bundle = build_flux1(Flux1Config(path=str(folder), dtype="float32", max_sequence_length=16))
    path = save_lora(tmp_path / "k.safetensors", random_weights(bundle), bundle, format="kohya")
    job = tmp_path / "job.toml"
    job.write_text(tomli_w.dumps({"job": {"kind": "generate", "prompt": "x"},
                                  "model": {"family": "flux1", "path": str(folder), "dtype": "float32"}}))
    with plugins_for_test():
        result = run_cli(["lora", "inspect", str(path), "--model", str(job)])
    assert result.exit_code == 0, result.output
    assert "kohya format" in result.output and "rank: 3" in result.output and "alpha: 5" in result.output
    assert "lora_unet_double_blocks_*_img_attn_qkv" in result.output or "double_blocks_*" in result.output
    assert "every key matches Flux" in result.output
    tensors = load_file(path)
    tensors["lora_unet_double_blocks_0_img_atn_qkv.lora_down.weight"] = tensors.popitem()[1]
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with plugins_for_test():
        result = run_cli(["lora", "inspect", str(tmp_path / "bad.safetensors"), "--model", str(job)])
    assert result.exit_code != 0 and "img_atn_qkv" in str(result.output) + str(result.exception)
