"""The ``flux1-convert`` job: BFL single file <-> diffusers folder, transformer and autoencoder,
through ``diffcore.jobs.runner.run``; the diffusers folder loads in diffusers itself."""

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

from diffcore.api import CheckpointError, ConfigError, save_file_atomic
from diffcore.testing import plugins_for_test, run_job_file as run
from diffcore_flux1.convert import diffusers_to_bfl
from diffcore_flux1.load import load_transformer, load_vae
from diffcore_flux1.vae import vae_diffusers_to_bfl


def convert(folder, **job):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps({"job": {"kind": "flux1-convert", "output_dir": str(folder / "out"),
                                                            **job}}))
    with plugins_for_test():
        return run(folder / "job.toml")


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_round_trip_bfl_diffusers_bfl(tmp_path, diffusers_flux, diffusers_vae, flux_inputs):
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    ref = diffusers_flux()
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(ref.state_dict())), bfl)
    save_file_atomic(vae_diffusers_to_bfl(dict(diffusers_vae.state_dict())), tmp_path / "ae.safetensors")

    written = convert(tmp_path / "to-diffusers", input=str(bfl), vae=str(tmp_path / "ae.safetensors"))
    out = tmp_path / "to-diffusers" / "out"
    assert written == {"transformer": out / "transformer" / "diffusion_pytorch_model.safetensors",
                       "vae": out / "vae" / "diffusion_pytorch_model.safetensors"}
    theirs = FluxTransformer2DModel.from_pretrained(out / "transformer").eval()  # diffusers reads it as its own
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in theirs.state_dict().items())
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    assert all(torch.equal(v, diffusers_vae.state_dict()[k]) for k, v in vae.state_dict().items())
    inputs = flux_inputs()
    expected = ref(hidden_states=inputs["img"], encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"],
                   timestep=inputs["timesteps"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
                   guidance=inputs["guidance"]).sample
    assert (load_transformer(out)(**inputs) - expected).abs().max() <= 1e-5  # and diffcore reads the pipeline root
    assert load_vae(out).params == load_vae(tmp_path / "ae.safetensors").params

    convert(tmp_path / "back", input=str(out), vae=str(out / "vae"), layout="bfl", filename="again.safetensors",
            variant="tiny")
    again, original = load_file(tmp_path / "back" / "out" / "again.safetensors"), load_file(bfl)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)
    ae, ae_original = load_file(tmp_path / "back" / "out" / "ae.safetensors"), load_file(tmp_path / "ae.safetensors")
    assert ae.keys() == ae_original.keys() and all(torch.equal(ae[k], ae_original[k]) for k in ae)


def test_dtype_and_errors(tmp_path, diffusers_flux):
    bfl = tmp_path / "flux1-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(diffusers_flux(guidance=False).state_dict())), bfl)
    convert(tmp_path / "bf16", input=str(bfl), layout="bfl", dtype="bfloat16")
    written = load_file(tmp_path / "bf16" / "out" / "flux1-schnell.safetensors")  # named after the detected variant
    assert {t.dtype for t in written.values()} == {torch.bfloat16} and written.keys() == load_file(bfl).keys()
    with pytest.raises(ConfigError, match="layout must be one of bfl, diffusers"):
        convert(tmp_path / "bad", input=str(bfl), layout="comfy")
    with pytest.raises(ConfigError, match="looks like a Hugging Face hub id"):
        convert(tmp_path / "hub", input="black-forest-labs/FLUX.1-dev")
    save_file_atomic({"input_blocks.0.0.weight": torch.zeros(4), "label_emb.0.0.weight": torch.zeros(4)},
                     tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="not a FLUX.1 transformer: the keys are those of an SDXL UNet"):
        convert(tmp_path / "sdxl", input=str(tmp_path / "sdxl.safetensors"))
