"""The text encoders inside an all-in-one Stability checkpoint (``conditioner.embedders.*``):
converted as diffusers' single-file loader converts them, and a job from the file alone (with a
folder's tokenizers) gives what the diffusers folder gives."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcore.api import CheckpointError, ConfigError
from diffcore.testing import assert_same_weights_output
from diffcore_sdxl import clip_keys
from diffcore_sdxl.plugin import SDXLConfig, build_sdxl
from diffcore_sdxl.text import SDXLText

PROMPTS = ["a red cat", "two dogs on a beach, sunset"]


def all_in_one(folder, out, *, refiner=False):
    """A Stability-layout single file of the diffusers folder ``folder``: UNet, VAE and text encoders."""
    from diffcore_sdxl.convert import diffusers_to_stability

    unet = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    sd = {f"model.diffusion_model.{k}": v for k, v in diffusers_to_stability(dict(unet)).items()}
    sd["first_stage_model.encoder.conv_in.weight"] = torch.zeros(32, 3, 3, 3)
    encoders = [("text_encoder_2", clip_keys.BIG_G)] if refiner else \
        [("text_encoder", clip_keys.CLIP_L), ("text_encoder_2", clip_keys.BIG_G)]
    for index, (name, kind) in enumerate(encoders):
        sd.update(clip_keys.to_stability(load_file(folder / name / "model.safetensors"), index, kind))
    save_file({k: v.contiguous() for k, v in sd.items()}, out)
    return sd


def test_keys_convert_as_diffusers_converts_them(tiny_pipelines, tmp_path):
    """Our file layout read back by diffusers' own single-file converters gives the folder's
    tensors, and ours gives the same: the mapping is checked against an independent reader."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    folder, pipe = tiny_pipelines["base"]
    sd = all_in_one(folder, tmp_path / "sdxl.safetensors")
    assert clip_keys.embedders(sd) == {0: clip_keys.CLIP_L, 1: clip_keys.BIG_G}
    assert any(k.endswith("attn.in_proj_weight") for k in sd) and "conditioner.embedders.1.model.text_projection" in sd
    theirs = {0: convert_ldm_clip_checkpoint(sd), 1: convert_open_clip_checkpoint(
        pipe.text_encoder_2, sd, prefix="conditioner.embedders.1.model.")}
    for index, encoder in ((0, pipe.text_encoder), (1, pipe.text_encoder_2)):
        ours = clip_keys.from_stability(sd, index, clip_keys.embedders(sd)[index])
        own = encoder.state_dict()
        expected = clip_keys.canonical({k: v for k, v in own.items() if not k.endswith("position_ids")})
        assert set(ours) == set(expected)
        assert set(expected) <= set(theirs[index])
        for k, v in expected.items():
            assert torch.equal(ours[k], v) and torch.equal(theirs[index][k], v), k


@torch.no_grad()
@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_single_file_encoders_equal_the_folder(tiny_pipelines, tmp_path, kind):
    """The encoders from the file (configs from the folder: the tiny ones have 8-wide heads) encode
    exactly as the folder's, the negatives too."""
    folder, _ = tiny_pipelines[kind]
    file = tmp_path / "sdxl.safetensors"
    all_in_one(folder, file, refiner=kind == "refiner")
    reference = SDXLText.from_folder(folder)
    ours = SDXLText.from_single_file(file, folder)
    assert ours.zero_empty_negative == reference.zero_empty_negative
    for a, b in zip(ours.encode(PROMPTS), reference.encode(PROMPTS)):
        assert torch.equal(a, b)
    negatives = ours.encode_negative([None, ""], ours.encode(PROMPTS))
    for a, b in zip(negatives, reference.encode_negative([None, ""], reference.encode(PROMPTS))):
        assert torch.equal(a, b)


def test_configs_from_full_size_shapes():
    """Without configs, SDXL's real CLIP-L and bigG are rebuilt from their shapes alone (meta device)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = SimpleNamespace(bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
    for config, cls, kind in ((clip_l, CLIPTextModel, clip_keys.CLIP_L),
                              (big_g, CLIPTextModelWithProjection, clip_keys.BIG_G)):
        with torch.device("meta"):
            sd = clip_keys.canonical(cls(config).state_dict())
        stability = clip_keys.to_stability(sd, 1, kind)
        if kind == clip_keys.BIG_G:   # open_clip's layout: 32 blocks of 12 tensors, and 5 more
            assert len(stability) == 32 * 12 + 5
            assert stability["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape \
                == (3840, 1280)
        fields = clip_keys.config_from_shapes(clip_keys.from_stability(stability, 1, kind), kind, tok)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "hidden_act"):
            assert fields[name] == getattr(config, name), name
        assert fields.get("projection_dim") == (1280 if kind == clip_keys.BIG_G else None)


def test_a_job_from_the_single_file(tiny_pipelines, run_job, tmp_path):
    """``path`` = the all-in-one file, ``tokenizers`` = a folder of tokenizers and encoder configs (no
    weights): the same image as the diffusers folder."""
    folder, _ = tiny_pipelines["base"]
    file = tmp_path / "sdxl.safetensors"
    all_in_one(folder, file)
    tokenizers = tmp_path / "tokenizers"
    for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"):
        (tokenizers / name).mkdir(parents=True)
        for f in (folder / name).iterdir():
            if f.suffix != ".safetensors":
                (tokenizers / name / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ConfigError, match="tokenizers"):
        build_sdxl(SDXLConfig(path=str(file), vae=str(folder), dtype="float32"))
    expected, _ = run_job("folder", {"path": str(folder)})
    got, params = run_job("file", {"path": str(file), "vae": str(folder), "tokenizers": str(tokenizers)})
    # the pooled text's 1-row projection rounds by its weight's address (1 ulp), and four CFG steps
    # and the decoder carry it to ~1e-5 of the image
    assert_same_weights_output(got, expected, ulps=256)


def test_missing_tokenizer_folder_is_named(tiny_pipelines, tmp_path):
    folder, _ = tiny_pipelines["base"]
    file = tmp_path / "sdxl.safetensors"
    all_in_one(folder, file)
    (tmp_path / "only2" / "tokenizer_2").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no tokenizer/ for the text encoders inside sdxl.safetensors"):
        SDXLText.from_single_file(file, tmp_path / "only2")
