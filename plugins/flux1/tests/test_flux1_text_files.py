"""FLUX.1's text encoders from single files (``clip_l`` / ``t5xxl``, as ComfyUI and kohya's
sd-scripts keep them), the tokenizers from a folder: the prompt encodes as from the diffusers
folder, fp8 files as their values, and a job runs on them end to end."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import CheckpointError, ConfigError
from diffcore_flux1.plugin import Flux1Config, build_flux1
from diffcore_flux1.text import FluxTextEncoder

PROMPTS = ["a red cat", "two dogs on a beach"]
JOB = dict(sampling_steps=2, height=32, width=32)


def comfy_files(pipe, root, *, t5_dtype=None):
    """clip_l.safetensors (``text_model.*`` keys and SD3's projection beside them, as ComfyUI's)
    and a t5xxl file (``t5_dtype``: its 2-d weights cast, as t5xxl_fp8_e4m3fn)."""
    root.mkdir(parents=True, exist_ok=True)
    clip = {f"text_model.{k}" if not k.startswith("text_model.") else k: v.contiguous()
            for k, v in pipe.text_encoder.state_dict().items()}
    width = pipe.text_encoder.config.hidden_size
    save_file({**clip, "text_projection.weight": torch.randn(width, width), "logit_scale": torch.tensor(4.6)},
              str(root / "clip_l.safetensors"))
    t5 = {k: v.contiguous() for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    if t5_dtype is not None:
        t5 = {k: v.to(t5_dtype) if v.ndim == 2 and k != "shared.weight" else v for k, v in t5.items()}
    save_file(t5, str(root / "t5xxl.safetensors"))
    return root / "clip_l.safetensors", root / "t5xxl.safetensors"


def tokenizers_only(folder, root, *, configs=True):
    """What a ComfyUI user downloads beside the files: the two tokenizers (and the encoders'
    config.json, without which a 32-wide tiny CLIP's heads cannot be read off its shapes)."""
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / name, root / name)
    for name in ("text_encoder", "text_encoder_2") if configs else ():
        (root / name).mkdir()
        shutil.copy(folder / name / "config.json", root / name / "config.json")
    return root


def encode(encoder):
    with torch.no_grad():
        return encoder.encode(PROMPTS)


def test_single_files_encode_as_the_diffusers_folder(tiny_pipeline, tmp_path):
    folder, pipe = tiny_pipeline
    clip_l, t5xxl = comfy_files(pipe, tmp_path / "files")
    want = encode(FluxTextEncoder.from_folder(folder, max_length=16, dtype=torch.float32))
    got = encode(FluxTextEncoder.from_folder(tokenizers_only(folder, tmp_path / "tok"), max_length=16,
                                             dtype=torch.float32, clip_l=clip_l, t5xxl=t5xxl))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_fp8_t5xxl_file_loads_as_its_values(tiny_pipeline, tmp_path):
    folder, pipe = tiny_pipeline
    _, t5xxl = comfy_files(pipe, tmp_path / "files", t5_dtype=torch.float8_e4m3fn)
    encoder = FluxTextEncoder.from_folder(folder, max_length=16, dtype=torch.float32, t5xxl=t5xxl)
    for key, tensor in pipe.text_encoder_2.state_dict().items():
        want = tensor.to(torch.float8_e4m3fn).float() if tensor.ndim == 2 and "embed" not in key \
            and key != "shared.weight" else tensor
        assert torch.equal(encoder.t5.state_dict()[key], want), key


def test_a_job_runs_on_single_files(tiny_pipeline, tmp_path, run_job):
    """The diffusers folder's transformer and VAE, the text encoders from files: the same images."""
    folder, pipe = tiny_pipeline
    clip_l, t5xxl = comfy_files(pipe, tmp_path / "files")
    want, _ = run_job(tmp_path / "folder", {"path": str(folder)}, **JOB)
    got, _ = run_job(tmp_path / "files-job", {"path": str(folder), "text_encoders": str(tokenizers_only(
        folder, tmp_path / "tok")), "clip_l": str(clip_l), "t5xxl": str(t5xxl)}, **JOB)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_missing_files_and_configs_are_clear_errors(tiny_pipeline, tmp_path):
    folder, pipe = tiny_pipeline
    with pytest.raises(ConfigError) as info:
        build_flux1(Flux1Config(path=str(folder), t5xxl=str(tmp_path / "t5xxl.safetensors"), dtype="float32"))
    assert info.value.path == "t5xxl" and "no such file" in str(info.value)
    clip_l, _ = comfy_files(pipe, tmp_path / "files")
    tok = tokenizers_only(folder, tmp_path / "tok", configs=False)
    with pytest.raises(CheckpointError, match=r"text_encoder_2/.*missing|missing text_encoder_2/"):
        FluxTextEncoder.from_folder(tok, clip_l=clip_l)
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors: its shapes do not describe a CLIPText"):
        FluxTextEncoder.from_folder(tok, clip_l=clip_l, t5xxl=clip_l)
