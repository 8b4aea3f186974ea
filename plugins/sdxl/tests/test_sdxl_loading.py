"""SDXL UNet files in every layout load to the same model; wrong and damaged files are one line."""

import json

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError, ConfigError
from diffcore_sdxl.convert import infer_params
from diffcore_sdxl.load import load_unet, unet_params
from diffcore_sdxl.model import VARIANTS, diffusers_config, label_vector, params_from_diffusers_config


@torch.no_grad()
def test_every_layout_loads_the_same_model(unet_files, unet_inputs):
    root, ref = unet_files
    params = VARIANTS["tiny"]
    x, t, context, pooled, time_ids = unet_inputs(params)
    y = label_vector(pooled, time_ids, params.time_embed_scalar_dim)
    outputs = {}
    for name in ("pipe", "pipe/unet", "all-in-one.safetensors", "unet-stability.safetensors",
                 "unet-diffusers.safetensors"):
        variant, found = unet_params(root / name)
        assert (variant, found) == ("tiny", params), name
        outputs[name] = load_unet(root / name, dtype=torch.float32)(x, t, context, y)
    first = outputs["pipe"]
    assert all(torch.equal(out, first) for out in outputs.values())
    half = load_unet(root / "fp16.safetensors", dtype=torch.float32)(x, t, context, y)
    assert 0 < (half - first).abs().max() < 0.05 * first.abs().max()
    fp8 = load_unet(root / "fp8.safetensors")
    assert fp8.out[2].weight.dtype == torch.float32   # upcast, never computed in fp8
    assert (fp8(x, t, context, y) - first).abs().max() < 0.5 * first.abs().max()


def test_diffusers_config_round_trip():
    for name in ("base-1.0", "refiner-1.0", "tiny", "tiny-refiner", "inpaint-1.0"):
        assert params_from_diffusers_config(diffusers_config(VARIANTS[name])) == VARIANTS[name]


def test_shapes_give_the_params(unet_files):
    root, ref = unet_files
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert infer_params(shapes, head_dim=16, time_embed_scalar_dim=8) == VARIANTS["tiny"]


def _write(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, path)
    return path


@pytest.mark.parametrize("keys, message", [
    ({"double_blocks.0.img_attn.qkv.weight": (6, 2), "img_in.weight": (2, 4)}, "FLUX.1 transformer"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (6, 2)}, "SD3 / SD3.5"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}, "SD1.5 and SD2 are not supported"),
])
def test_other_families_are_named(tmp_path, keys, message):
    path = _write(tmp_path / "model.safetensors", keys)
    with pytest.raises(CheckpointError, match=message) as info:
        unet_params(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_foreign_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="SD1.5-style.*not supported"):
        unet_params(tmp_path)


def test_truncated_file(unet_files, tmp_path):
    data = (unet_files[0] / "unet-stability.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        unet_params(cut)


def test_hub_id_is_not_downloaded():
    from diffcore.api import structure
    from diffcore_sdxl.plugin import SDXLConfig

    with pytest.raises(ConfigError, match="hub id.*huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0"):
        structure({"path": "stabilityai/stable-diffusion-xl-base-1.0"}, SDXLConfig)
    with pytest.raises(ConfigError, match="no such file"):
        structure({"path": "./nowhere/model.safetensors"}, SDXLConfig)
    with pytest.raises(ConfigError, match="unknown SDXL variant 'refner-1.0'"):
        structure({"variant": "refner-1.0"}, SDXLConfig)
