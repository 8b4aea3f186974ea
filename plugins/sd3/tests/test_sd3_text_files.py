"""SD3's text encoders from single files (``clip_l`` / ``clip_g`` / ``t5xxl``, as ComfyUI and
kohya's sd-scripts keep them), the tokenizers from a folder: the prompt encodes as from the
diffusers folder, a CLIP-L file without SD3's projection included, and the bundle reads them."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import save_file

from diffcore.api import ConfigError
from diffcore_sd3.plugin import SD3Config, build_sd3
from diffcore_sd3.text import FOLDERS, SD3TextEncoder

PROMPTS = ["a red cat", "two dogs on a beach"]


def comfy_files(pipe, root):
    """clip_l (``text_model.*`` only: ComfyUI's file has no projection), clip_g (with its
    projection) and t5xxl, one safetensors file each."""
    root.mkdir(parents=True, exist_ok=True)
    clip_l = {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "text_projection.weight"}
    t5 = {k: v for k, v in pipe.text_encoder_3.state_dict().items() if k != "encoder.embed_tokens.weight"}
    for name, state in (("clip_l", clip_l), ("clip_g", pipe.text_encoder_2.state_dict()), ("t5xxl", t5)):
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / f"{name}.safetensors"))
    return {name: root / f"{name}.safetensors" for name in ("clip_l", "clip_g", "t5xxl")}


def tokenizers_only(folder, root):
    """The tokenizers, and the encoders' config.json (tiny widths have no 64-wide heads to read)."""
    for encoder, tokenizer in FOLDERS.values():
        shutil.copytree(folder / tokenizer, root / tokenizer)
        (root / encoder).mkdir()
        shutil.copy(folder / encoder / "config.json", root / encoder / "config.json")
    return root


def encode(encoder):
    with torch.no_grad():
        return encoder.encode(PROMPTS)


def test_single_files_encode_as_the_diffusers_folder(tiny_pipeline, tmp_path):
    folder, pipe = tiny_pipeline
    files = comfy_files(pipe, tmp_path / "files")
    want = encode(SD3TextEncoder.from_folder(folder, width=48, dtype=torch.float32))
    got = encode(SD3TextEncoder.from_folder(tokenizers_only(folder, tmp_path / "tok"), width=48,
                                            dtype=torch.float32, **files))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_bundle_reads_the_files(tiny_pipeline, tmp_path):
    folder, pipe = tiny_pipeline
    files = comfy_files(pipe, tmp_path / "files")
    plain = build_sd3(SD3Config(path=str(folder), dtype="float32"))
    bundle = build_sd3(SD3Config(path=str(folder), text_encoders=str(tokenizers_only(folder, tmp_path / "tok")),
                                 dtype="float32", **{k: str(v) for k, v in files.items()}))
    assert bundle.identity["text"] != plain.identity["text"]   # cached embeddings are not mixed up
    for a, b in zip(encode(bundle.text), encode(plain.text)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_missing_file_is_refused_by_key(tiny_pipeline, tmp_path):
    with pytest.raises(ConfigError) as info:
        build_sd3(SD3Config(path=str(tiny_pipeline[0]), clip_g=str(tmp_path / "clip_g.safetensors")))
    assert info.value.path == "clip_g" and "no such file" in str(info.value)
