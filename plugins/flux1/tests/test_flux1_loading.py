"""Tiny FLUX.1 weights in every supported layout, through diffcore.io.checkpoint.load_model."""

import attrs
import pytest
import torch

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import load_model, save_file_atomic
from diffcore_flux1.convert import diffusers_to_bfl, to_bfl
from diffcore_flux1.load import load_transformer, load_vae
from diffcore_flux1.model import VARIANTS, Flux
from diffcore_flux1.vae import AE_VARIANTS, AutoEncoder, vae_diffusers_to_bfl


@torch.no_grad()
def expected_output(ref, inputs):
    return ref(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
               timestep=inputs["timesteps"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
               guidance=inputs["guidance"]).sample


def check(model, ref, inputs):
    assert isinstance(model, Flux) and not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert (model(**inputs) - expected_output(ref, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_diffusers_folder(tmp_path, diffusers_flux, flux_inputs, shard):
    ref = diffusers_flux()
    ref.save_pretrained(tmp_path / "transformer", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    params = VARIANTS["tiny"]
    check(load_model(lambda: Flux(params), tmp_path / "transformer", rename=to_bfl), ref, flux_inputs())
    check(load_transformer(tmp_path), ref, flux_inputs())  # pipeline root: transformer/ + config.json


def test_bfl_single_file(tmp_path, diffusers_flux, flux_inputs):
    ref = diffusers_flux()
    file = tmp_path / "flux1-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(ref.state_dict())), file)
    check(load_model(lambda: Flux(VARIANTS["tiny"]), file, rename=to_bfl), ref, flux_inputs())
    check(load_transformer(file), ref, flux_inputs())  # variant detected from shapes
    bf16 = load_transformer(file, variant="tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_comfyui_file(tmp_path, diffusers_flux, flux_inputs):
    ref = diffusers_flux()
    state = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(dict(ref.state_dict())).items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)  # an all-in-one file's other parts
    save_file_atomic(state, tmp_path / "comfy.safetensors")
    check(load_model(lambda: Flux(VARIANTS["tiny"]), tmp_path / "comfy.safetensors", rename=to_bfl),
          ref, flux_inputs())


def test_wrong_variant_is_one_clear_error(tmp_path, diffusers_flux):
    file = tmp_path / "schnell-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(diffusers_flux(guidance=False).state_dict())), file)
    with pytest.raises(CheckpointError, match=r"no known variant .*'guidance_embed': False"):
        load_transformer(file)  # tiny without guidance is no row of the table: say how it differs
    schnell_tiny = attrs.evolve(VARIANTS["tiny"], guidance_embed=False)
    assert not load_transformer(file, params=schnell_tiny).params.guidance_embed
    with pytest.raises(CheckpointError) as info:
        load_transformer(file, variant="tiny")
    msg = str(info.value)
    assert str(file) in msg and "4 missing key(s): guidance_in.in_layer.weight" in msg
    with pytest.raises(CheckpointError, match="unknown FLUX.1 variant 'pro'"):
        load_transformer(file, variant="pro")


@torch.no_grad()
def test_vae_from_diffusers_folder_and_bfl_file(tmp_path, diffusers_vae):
    diffusers_vae.save_pretrained(tmp_path / "vae")
    z = torch.randn(1, 16, 8, 8)
    expected = diffusers_vae.decode(z).sample
    from_folder = load_vae(tmp_path)
    assert from_folder.params == AE_VARIANTS["tiny"]
    tol = 1e-5 * expected.abs().max().item()  # as in test_flux1_vae: per unit of signal
    assert (from_folder.decode((z - 0.1159) * 0.3611) - expected).abs().max() <= tol
    save_file_atomic(vae_diffusers_to_bfl(dict(diffusers_vae.state_dict())), tmp_path / "ae.safetensors")
    from_file = load_vae(tmp_path / "ae.safetensors", variant="tiny")
    assert isinstance(from_file, AutoEncoder)
    assert (from_file.decode((z - 0.1159) * 0.3611) - expected).abs().max() <= tol
