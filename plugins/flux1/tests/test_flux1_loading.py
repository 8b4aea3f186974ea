"""Tiny FLUX.1 weights in every supported layout, through diffcore.io.checkpoint.load_model."""

import json

import attrs
import pytest
import torch

from diffcore.api import CheckpointError, ConfigError, load_model, save_file_atomic
from diffcore_flux1.convert import diffusers_to_bfl, to_bfl
from diffcore_flux1.load import load_transformer, load_vae, transformer_params
from diffcore_flux1.model import VARIANTS, Flux
from diffcore_flux1.plugin import Flux1Config, build_flux1
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


@pytest.mark.usefixtures("reference_matmuls")
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_diffusers_folder(tmp_path, diffusers_flux, flux_inputs, shard):
    ref = diffusers_flux()
    ref.save_pretrained(tmp_path / "transformer", **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    params = VARIANTS["tiny"]
    check(load_model(lambda: Flux(params), tmp_path / "transformer", rename=to_bfl), ref, flux_inputs())
    check(load_transformer(tmp_path), ref, flux_inputs())  # pipeline root: transformer/ + config.json


@pytest.mark.usefixtures("reference_matmuls")
def test_bfl_single_file(tmp_path, diffusers_flux, flux_inputs):
    ref = diffusers_flux()
    file = tmp_path / "flux1-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(ref.state_dict())), file)
    check(load_model(lambda: Flux(VARIANTS["tiny"]), file, rename=to_bfl), ref, flux_inputs())
    check(load_transformer(file), ref, flux_inputs())  # variant detected from shapes
    bf16 = load_transformer(file, variant="tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


@pytest.mark.usefixtures("reference_matmuls")
def test_comfyui_file(tmp_path, diffusers_flux, flux_inputs):
    ref = diffusers_flux()
    state = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_bfl(dict(ref.state_dict())).items()}
    state["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)  # an all-in-one file's other parts
    save_file_atomic(state, tmp_path / "comfy.safetensors")
    check(load_model(lambda: Flux(VARIANTS["tiny"]), tmp_path / "comfy.safetensors", rename=to_bfl),
          ref, flux_inputs())


def test_variant_named_or_read_from_the_weights(tmp_path, diffusers_flux):
    file = tmp_path / "schnell-tiny.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(diffusers_flux(guidance=False).state_dict())), file)
    assert transformer_params(file) == ("schnell", attrs.evolve(VARIANTS["tiny"], guidance_embed=False))
    assert not load_transformer(file, variant="schnell").params.guidance_embed  # sizes from the file, role named
    with pytest.raises(CheckpointError, match=r"not FLUX.1 tiny: they take 64 input channels \(text conditioning\) "
                                              r"without a guidance embedding, which is schnell's kind"):
        load_transformer(file, variant="tiny")
    with pytest.raises(CheckpointError, match="unknown FLUX.1 variant 'pro'"):
        load_transformer(file, variant="pro")
    with pytest.raises(CheckpointError) as info:  # forced parameters still meet load_model's report
        load_transformer(file, params=VARIANTS["tiny"])
    assert str(file) in str(info.value) and "4 missing key(s): guidance_in.in_layer.weight" in str(info.value)


@pytest.mark.usefixtures("reference_matmuls")
def test_both_layouts_give_identical_outputs(tmp_path, diffusers_flux, flux_inputs):
    """The same weights as a BFL file and as a diffusers folder: bit-identical once the mapped
    weights sit in fresh allocations (a view of the file is only 8-byte aligned, and BLAS may
    round products of such a buffer differently, by ~1e-6)."""
    ref = diffusers_flux()
    ref.save_pretrained(tmp_path / "diffusers")
    save_file_atomic(diffusers_to_bfl(dict(ref.state_dict())), tmp_path / "flux1-tiny.safetensors")
    models = [load_transformer(tmp_path / "diffusers"), load_transformer(tmp_path / "flux1-tiny.safetensors")]
    inputs = flux_inputs()
    with torch.no_grad():
        raw = [m(**inputs) for m in models]
        assert (raw[0] - raw[1]).abs().max() <= 1e-5
        for m in models:
            for p in m.parameters():
                p.data = p.data.clone()
        out = [m(**inputs) for m in models]
    assert out[0].abs().max() > 1.0 and torch.equal(out[0], out[1])
    assert torch.equal(out[0], expected_output(ref, inputs))  # and equal to diffusers' own forward


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 400, message
    return message


FOREIGN = {
    "flux2-bfl": ({"img_in.weight": (64, 16), "double_blocks.0.img_attn.qkv.weight": (192, 64),
                   "double_stream_modulation_img.lin.weight": (384, 64),
                   "single_stream_modulation.lin.weight": (192, 64)},
                  "FLUX.2 transformer"),
    "flux2-diffusers": ({"x_embedder.weight": (64, 16), "transformer_blocks.0.attn.to_q.weight": (64, 64),
                         "double_stream_modulation_img.linear.weight": (384, 64)}, "FLUX.2 transformer"),
    "sdxl-original": ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
                       "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                       "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}, "SDXL UNet"),
    "sdxl-diffusers": ({"conv_in.weight": (320, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3),
                        "add_embedding.linear_1.weight": (1280, 2816)}, "SDXL UNet"),
    "sd3": ({"joint_blocks.0.x_block.attn.qkv.weight": (192, 64), "x_embedder.proj.weight": (64, 16, 2, 2)}, "SD3"),
    "flux1-vae": ({"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3),
                   "decoder.conv_in.weight": (512, 16, 3, 3)}, "autoencoder"),
}


@pytest.mark.parametrize("kind", FOREIGN)
def test_other_models_are_named(tmp_path, kind):
    """A FLUX.2, SDXL, SD3 or VAE file given as the FLUX.1 transformer: one line naming what it is."""
    shapes, what = FOREIGN[kind]
    file = tmp_path / f"{kind}.safetensors"
    save_file_atomic({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in shapes.items()}, file)
    for load in (lambda: load_transformer(file), lambda: load_transformer(file, variant="dev"),
                 lambda: build_flux1(Flux1Config(path=str(file)))):
        with pytest.raises(CheckpointError) as info:
            load()
        message = one_line(info)
        assert what in message and "not a FLUX.1 transformer" in message and str(file) in message


def test_foreign_diffusers_folders_are_named(tmp_path):
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(CheckpointError, match="is a diffusers StableDiffusionXLPipeline folder, not FLUX.1") as info:
        build_flux1(Flux1Config(path=str(tmp_path / "sdxl")))
    one_line(info)
    (tmp_path / "klein" / "transformer").mkdir(parents=True)
    (tmp_path / "klein" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(CheckpointError, match="is a FLUX.2 pipeline \\(Flux2KleinPipeline\\): load it with the "
                                              "flux2 family"):
        load_transformer(tmp_path / "klein")
    (tmp_path / "t2").mkdir()
    (tmp_path / "t2" / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    with pytest.raises(CheckpointError, match="describes a Flux2Transformer2DModel, not FLUX.1's "
                                              "FluxTransformer2DModel: load it with the flux2 family"):
        load_transformer(tmp_path / "t2")


def test_truncated_files(tmp_path, diffusers_flux, tiny_pipeline):
    whole = tmp_path / "whole.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(diffusers_flux().state_dict())), whole)
    data = whole.read_bytes()
    (tmp_path / "cut").mkdir()
    cut = tmp_path / "cut" / "flux1-tiny.safetensors"
    cut.write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match=r"truncated: [\d,]+ bytes of the [\d,]+ its header describes "
                                              r"\(incomplete download\? fetch it again\)") as info:
        build_flux1(Flux1Config(path=str(cut), text_encoders=str(tiny_pipeline[0])))
    assert str(cut) in one_line(info)
    cut.write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="truncated: 100 bytes, but its header alone is"):
        load_transformer(cut)
    cut.write_bytes(b"<html>rate limited</html>")  # what a failed download leaves behind
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_transformer(cut)
    save_file_atomic(vae_diffusers_to_bfl(dict(tiny_pipeline[1].vae.state_dict())), tmp_path / "ae.safetensors")
    ae = (tmp_path / "ae.safetensors").read_bytes()
    (tmp_path / "cut" / "ae.safetensors").write_bytes(ae[:-10])
    cut.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"ae.safetensors: truncated"):
        build_flux1(Flux1Config(path=str(cut), text_encoders=str(tiny_pipeline[0])))


def test_missing_autoencoder_and_hub_ids(tmp_path, diffusers_flux):
    file = tmp_path / "flux1-dev.safetensors"
    save_file_atomic(diffusers_to_bfl(dict(diffusers_flux().state_dict())), file)
    with pytest.raises(ConfigError, match=f"no ae.safetensors next to {file}: set vae to FLUX.1's autoencoder") as info:
        build_flux1(Flux1Config(path=str(file)))
    one_line(info)
    for field in ("path", "vae", "text_encoders"):
        with pytest.raises(ConfigError, match=f"at {field}: 'black-forest-labs/FLUX.1-dev' looks like a Hugging Face "
                                              f"hub id; diffcore never downloads") as info:
            Flux1Config(**{field: "black-forest-labs/FLUX.1-dev"})
        one_line(info)


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
