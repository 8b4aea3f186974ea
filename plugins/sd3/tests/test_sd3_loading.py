"""Loading SD3 MMDiTs from every supported layout, and refusing what is not one."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError
from diffcore.testing import assert_same_weights_output
from diffcore_sd3.convert import diffusers_to_original, original_to_diffusers
from diffcore_sd3.load import load_transformer, transformer_params


@pytest.fixture(scope="module")
def reference():
    """A tiny random SD3.5-medium-shaped diffusers transformer and inputs."""
    from diffusers import SD3Transformer2DModel

    from diffcore_sd3.model import diffusers_config
    from diffcore_sd3.params import VARIANTS

    config = {k: v for k, v in diffusers_config(VARIANTS["tiny"]).items() if k != "_class_name"}
    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    inputs = dict(x=torch.randn(1, 16, 8, 8, generator=g), timesteps=torch.tensor([0.6]),
                  context=torch.randn(1, 5, 48, generator=g), y=torch.randn(1, 40, generator=g))
    return ref, inputs


def original_sd(ref):
    return diffusers_to_original({k: v.clone() for k, v in ref.state_dict().items()})


@torch.no_grad()
def test_layouts_give_identical_outputs(reference, tmp_path):
    """A diffusers pipeline folder, Stability's all-in-one file (with text encoders and VAE keys
    beside the MMDiT), a ComfyUI-style file and bare original keys: the same weights in every
    layout give the same output (the final adaLN's scale / shift swap included), to the last bits of
    fp32 that the weights' addresses decide (``assert_same_weights_output``)."""
    ref, inputs = reference
    folder = tmp_path / "pipe"
    ref.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    original = original_sd(ref)
    single = {f"model.diffusion_model.{k}": v for k, v in original.items()}
    save_file({**single, "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 16, 3, 3),
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(4)},
              tmp_path / "sd3.5_medium_incl_clips.safetensors")
    save_file(single, tmp_path / "comfy.safetensors")
    save_file(original, tmp_path / "bare.safetensors")

    outputs = {}
    for name in ("pipe", "pipe/transformer", "sd3.5_medium_incl_clips.safetensors", "comfy.safetensors",
                 "bare.safetensors"):
        outputs[name] = load_transformer(tmp_path / name, variant="tiny")(**inputs)
    first = outputs.pop("pipe")
    for name, out in outputs.items():
        assert_same_weights_output(out, first)
    assert transformer_params(tmp_path / "bare.safetensors") == ("tiny", load_transformer(tmp_path / "pipe").params)


@torch.no_grad()
def test_fp8_storage_is_upcast(reference, tmp_path):
    """An fp8 (e4m3) file loads as float32 holding the fp8 values: the output is the reference's
    on those rounded weights."""
    ref, inputs = reference
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in original_sd(ref).items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    ours = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert ours.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float32
    rounded = original_to_diffusers({k: v.float() for k, v in fp8.items()})
    from diffusers import SD3Transformer2DModel

    ref8 = SD3Transformer2DModel.from_config(ref.config).eval()
    ref8.load_state_dict(rounded)
    expected = ref8(hidden_states=inputs["x"], timestep=1000 * inputs["timesteps"],
                    encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"]).sample
    assert (ours(**inputs) - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_a_comfyui_scaled_fp8_file_loads_as_its_values(reference, tmp_path):
    """``sd3.5_large_fp8_scaled.safetensors``'s layout: the prefix, fp8 weights with ``scale_weight``
    and ``scale_input`` beside them and a ``scaled_fp8`` marker."""
    ref, inputs = reference
    scaled, values = {}, {}
    for k, v in original_sd(ref).items():
        if v.ndim == 2:
            scale = v.abs().amax().float() / 448
            q = (v / scale).to(torch.float8_e4m3fn)
            values[k] = q.float() * scale
            scaled |= {k: q, k.replace(".weight", ".scale_weight"): scale,
                       k.replace(".weight", ".scale_input"): torch.ones(())}
        else:
            scaled[k], values[k] = v, v
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({f"model.diffusion_model.{k}": v for k, v in scaled.items()}, tmp_path / "scaled.safetensors")
    save_file(values, tmp_path / "values.safetensors")
    ours = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32)
    want = load_transformer(tmp_path / "values.safetensors", dtype=torch.float32)
    assert all(torch.equal(t, want.state_dict()[k]) for k, t in ours.state_dict().items())


def test_other_files_are_refused(reference, tmp_path):
    ref, _ = reference
    flux = {"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2), "img_in.weight": torch.zeros(2, 4)}
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2)}
    for name, sd, what in (("flux.safetensors", flux, "FLUX.1 transformer .*flux1 family"),
                           ("sdxl.safetensors", sdxl, "SDXL UNet")):
        save_file(sd, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}: not an SD3 .*{what}"):
            load_transformer(tmp_path / name)
    data = (tmp_path / "bare.safetensors")
    save_file(original_sd(ref), data)
    blob = data.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_transformer(tmp_path / "cut.safetensors")
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(CheckpointError, match="FluxPipeline folder, not Stable Diffusion 3: load it with the flux1"):
        load_transformer(tmp_path / "flux")
    with pytest.raises(CheckpointError, match="the weights are SD3 tiny, not sd3.5-medium"):
        transformer_params(data, "sd3.5-medium")
    with pytest.raises(CheckpointError, match="unknown SD3 variant 'sd4'"):
        transformer_params(data, "sd4")
