"""SDXL text conditioning against diffusers' encode_prompt on tiny random CLIPs."""

import pytest
import torch

from diffcore_sdxl.text import SDXLText, micro_conditioning

PROMPTS = ["a red cat", "two dogs on a beach, sunset"]


@torch.no_grad()
@pytest.mark.parametrize("negative", [None, ["blurry", "low quality, dark"]])
def test_base_matches_encode_prompt(tiny_pipelines, negative):
    folder, pipe = tiny_pipelines["base"]
    text = SDXLText.from_folder(folder)
    assert text.zero_empty_negative
    ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                                          negative_prompt=negative)
    got = text.encode(PROMPTS)
    got_neg = text.encode_negative(negative or [None, None], got)
    assert got[0].shape == (2, 77, 48) and got[1].shape == (2, 32)
    for ours, ref in zip((*got, *got_neg), (ctx, pooled, neg_ctx, neg_pooled)):
        assert (ours - ref).abs().max() <= 1e-5
    if negative is None:
        assert not got_neg[0].any() and not got_neg[1].any()


@torch.no_grad()
def test_refiner_matches_encode_prompt(tiny_pipelines):
    """The refiner: bigG alone, and "" encoded (not zeros) for the unconditional branch."""
    folder, pipe = tiny_pipelines["refiner"]
    text = SDXLText.from_folder(folder)
    assert len(text.encoders) == 1 and not text.zero_empty_negative
    ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    got = text.encode(PROMPTS)
    got_neg = text.encode_negative([None, ""], got)
    assert got[0].shape == (2, 77, 32) and neg_ctx.abs().max() > 0
    for ours, ref in zip((*got, *got_neg), (ctx, pooled, neg_ctx, neg_pooled)):
        assert (ours - ref).abs().max() <= 1e-5


def test_padding_tokens(tiny_pipelines):
    """CLIP-L pads with end-of-text, bigG with "!" (id 0): the saved tokenizers carry this."""
    text = SDXLText.from_folder(tiny_pipelines["base"][0])
    clip_l, big_g = text.tokenizers
    eot = clip_l.convert_tokens_to_ids("<|endoftext|>")
    ids_l = clip_l(["a"], padding="max_length", max_length=77).input_ids[0]
    ids_g = big_g(["a"], padding="max_length", max_length=77).input_ids[0]
    assert ids_l[-1] == eot and ids_g[-1] == 0 and ids_g[2] == eot


def test_micro_conditioning_defaults_as_diffusers(tiny_pipelines):
    pipe = tiny_pipelines["base"][1]
    expected = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), dtype=torch.float32,
                                      text_encoder_projection_dim=32)
    assert micro_conditioning(64, 48, aesthetic=False) == expected[0].tolist()
    refiner = tiny_pipelines["refiner"][1]
    pos, neg = refiner._get_add_time_ids((64, 48), (2, 4), (64, 48), 6.0, 2.5, (64, 48), (2, 4), (64, 48),
                                         dtype=torch.float32, text_encoder_projection_dim=32)
    assert micro_conditioning(64, 48, aesthetic=True, crop=(2, 4)) == pos[0].tolist()
    assert micro_conditioning(64, 48, aesthetic=True, crop=(2, 4), aesthetic_score=2.5) == neg[0].tolist()
    assert micro_conditioning(64, 48, aesthetic=False, original_size=(512, 384), crop=(8, 0)) == \
        [512.0, 384.0, 8.0, 0.0, 64.0, 48.0]
