"""The ``sdxl-convert`` job: Stability all-in-one file <-> diffusers folder, through the job
runner; the diffusers folder loads in diffusers itself, and both outputs give the same UNet."""

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

import diffcore_sdxl.plugin as sdxl_plugin
from diffcore.api import CheckpointError, ConfigError, save_file_atomic
from diffcore.testing import plugins_for_test, run_job_file
from diffcore_sdxl.load import load_unet


def convert(folder, **job):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps({"job": {"kind": "sdxl-convert", "output_dir": str(folder / "out"),
                                                            **job}}))
    with plugins_for_test(sdxl_plugin):
        return run_job_file(folder / "job.toml")


@torch.no_grad()
def test_convert_both_ways_gives_identical_outputs(unet_files, unet_inputs, tmp_path):
    from diffusers import UNet2DConditionModel

    root, ref = unet_files
    written = convert(tmp_path / "to-diffusers", input=str(root / "all-in-one.safetensors"))
    out = tmp_path / "to-diffusers" / "out"
    assert written == {"unet": out / "unet" / "diffusion_pytorch_model.safetensors"}
    theirs = UNet2DConditionModel.from_pretrained(out / "unet").eval()   # diffusers reads it as its own
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in theirs.state_dict().items())

    convert(tmp_path / "back", input=str(out), layout="stability", filename="again.safetensors")
    again = load_file(tmp_path / "back" / "out" / "again.safetensors")
    original = load_file(root / "all-in-one.safetensors")
    unet_keys = {k for k in original if k.startswith("model.diffusion_model.")}
    assert again.keys() == unet_keys and all(torch.equal(again[k], original[k]) for k in unet_keys)

    a, b = load_unet(out), load_unet(tmp_path / "back" / "out" / "again.safetensors")
    x, t, context, pooled, time_ids = unet_inputs(a.params)
    from diffcore_sdxl.model import label_vector

    y = label_vector(pooled, time_ids, a.params.time_embed_scalar_dim)
    assert torch.equal(a(x, t, context, y), b(x, t, context, y))

    convert(tmp_path / "half", input=str(root / "unet-diffusers.safetensors"), layout="stability", dtype="float16")
    half = load_file(tmp_path / "half" / "out" / "sdxl-tiny.safetensors")
    assert {v.dtype for v in half.values()} == {torch.float16}


def test_refusals(tmp_path, unet_files):
    root, _ = unet_files
    with pytest.raises(ConfigError, match="layout must be one of stability, diffusers"):
        convert(tmp_path / "bad", input=str(root / "all-in-one.safetensors"), layout="comfy")
    with pytest.raises(ConfigError, match="looks like a Hugging Face hub id"):
        convert(tmp_path / "hub", input="stabilityai/stable-diffusion-xl-base-1.0")
    save_file_atomic({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="FLUX.1"):
        convert(tmp_path / "flux", input=str(tmp_path / "flux.safetensors"))
    save_file_atomic({"input_blocks.0.0.weight": torch.zeros(4)}, tmp_path / "sd15.safetensors")
    with pytest.raises(CheckpointError, match="SD1.5"):
        convert(tmp_path / "sd15", input=str(tmp_path / "sd15.safetensors"))
    with pytest.raises(ConfigError, match="set input"):
        convert(tmp_path / "none")
