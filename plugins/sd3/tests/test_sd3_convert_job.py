"""The ``sd3-convert`` job: Stability single file <-> diffusers folder, through
``diffcore.jobs.runner.run``; the diffusers folder loads in diffusers itself."""

import pytest
import tomli_w
import torch
from safetensors.torch import load_file

import diffcore_sd3.plugin as sd3_plugin
from diffcore.api import CheckpointError, ConfigError, save_file_atomic
from diffcore.testing import plugins_for_test, run_job_file
from diffcore_sd3.convert import diffusers_to_original


def convert(folder, **job):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps({"job": {"kind": "sd3-convert", "output_dir": str(folder / "out"),
                                                            **job}}))
    with plugins_for_test(sd3_plugin):
        return run_job_file(folder / "job.toml")


def test_round_trip_single_file_diffusers_single_file(tmp_path, diffusers_sd3):
    from diffusers import SD3Transformer2DModel

    ref = diffusers_sd3("sd3.5-medium")
    original = diffusers_to_original({k: v.clone() for k, v in ref.state_dict().items()})
    single = tmp_path / "sd3.5_tiny.safetensors"
    save_file_atomic({f"model.diffusion_model.{k}": v for k, v in original.items()}
                     | {"first_stage_model.decoder.conv_in.bias": torch.zeros(2)}, single)

    written = convert(tmp_path / "to-diffusers", input=str(single))
    out = tmp_path / "to-diffusers" / "out"
    assert written == {"transformer": out / "transformer" / "diffusion_pytorch_model.safetensors"}
    theirs = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()   # diffusers reads it as its own
    assert list(theirs.config.dual_attention_layers) == [0, 1] and theirs.config.qk_norm == "rms_norm"
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in theirs.state_dict().items())

    convert(tmp_path / "back", input=str(out), layout="original", filename="again.safetensors", dtype="bfloat16")
    again = load_file(tmp_path / "back" / "out" / "again.safetensors")
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k].to(torch.bfloat16)) for k in original)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="layout must be one of original, diffusers"):
        convert(tmp_path / "bad", input=str(tmp_path), layout="comfy")
    with pytest.raises(ConfigError, match="looks like a Hugging Face hub id"):
        convert(tmp_path / "hub", input="stabilityai/stable-diffusion-3.5-medium")
    save_file_atomic({"input_blocks.0.0.weight": torch.zeros(4), "label_emb.0.0.weight": torch.zeros(4)},
                     tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="not an SD3 / SD3.5 MMDiT: the keys are those of an SDXL UNet"):
        convert(tmp_path / "sdxl", input=str(tmp_path / "sdxl.safetensors"))
