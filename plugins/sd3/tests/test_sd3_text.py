"""SD3 text conditioning against diffusers' StableDiffusion3Pipeline.encode_prompt."""

import pytest
import torch

from diffcore.api import CheckpointError
from diffcore_sd3.text import SD3TextEncoder

PROMPTS = ["a red cat on a mat", "two dogs"]


@torch.no_grad()
def test_encode_matches_diffusers(tiny_pipeline):
    """Context = [CLIP-L | CLIP-G penultimate, zero-padded ; T5], pooled = [CLIP-L | CLIP-G
    projected]; the negative is the encoding of the empty prompt (not zeros)."""
    folder, pipe = tiny_pipeline
    ours = SD3TextEncoder.from_folder(folder, max_length=16)
    expected = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=16)
    context, pooled = ours.encode(PROMPTS)
    assert context.shape == (2, 77 + 16, 48) and pooled.shape == (2, 40)
    assert (context - expected[0]).abs().max() <= 1e-5 and (pooled - expected[2]).abs().max() <= 1e-5
    empty_context, empty_pooled = ours.encode([""] * 2)
    assert (empty_context - expected[1]).abs().max() <= 1e-5 and (empty_pooled - expected[3]).abs().max() <= 1e-5
    assert empty_pooled.abs().max() > 0.1       # the empty prompt is encoded, not zeroed
    assert torch.all(context[:, :77, 40:] == 0)   # CLIP features zero-padded to T5's width


@torch.no_grad()
def test_without_t5_matches_diffusers(tiny_pipeline, tmp_path):
    """``t5 = False``: T5's tokens are zeros, as diffusers does with ``text_encoder_3=None``; the
    folder then needs no T5 at all."""
    import shutil

    from diffusers import StableDiffusion3Pipeline

    folder, pipe = tiny_pipeline
    lean = tmp_path / "lean"
    shutil.copytree(folder, lean, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    ours = SD3TextEncoder.from_folder(lean, t5=False, max_length=16, width=48)
    assert ours.t5 is None
    no_t5 = StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    expected = no_t5.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=16)
    context, pooled = ours.encode(PROMPTS)
    assert (context - expected[0]).abs().max() <= 1e-5 and (pooled - expected[2]).abs().max() <= 1e-5
    assert torch.all(context[:, 77:] == 0)
    with pytest.raises(CheckpointError, match="missing text_encoder_3/, tokenizer_3/; or set text_encoder_3 = false"):
        SD3TextEncoder.from_folder(lean)
