"""FLUX.2 prompt encoding against diffusers' Flux2Pipeline / Flux2KleinPipeline encoders, on a tiny
Qwen3 (diffusers' functions only call the tokenizer's chat template and the LLM's hidden states,
so one tiny LLM exercises both chat formats)."""

from __future__ import annotations

import pytest
import torch

from diffcore.api import CheckpointError
from diffcore_flux2.text import SYSTEM_MESSAGE, Flux2TextEncoder, TextSpec

PROMPTS = ["a red cat on the mat", "a blue dog [IMG] sign"]


def test_qwen3_format_matches_klein_pipeline(tiny_llm):
    from diffusers import Flux2KleinPipeline

    model, tokenizer = tiny_llm
    ours = Flux2TextEncoder(model, tokenizer, TextSpec("qwen3", (1, 2, 3)), max_length=24).encode(PROMPTS)
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(model, tokenizer, PROMPTS, max_sequence_length=24,
                                                           hidden_states_layers=(1, 2, 3))
    assert ours.shape == (2, 24, 48)
    assert torch.equal(ours, expected)


def test_mistral3_format_matches_flux2_pipeline(tiny_llm):
    from diffusers import Flux2Pipeline
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as DIFFUSERS_SYSTEM_MESSAGE

    assert SYSTEM_MESSAGE == DIFFUSERS_SYSTEM_MESSAGE
    model, tokenizer = tiny_llm
    encoder = Flux2TextEncoder(model, tokenizer, TextSpec("mistral3", (1, 2, 3)), max_length=40)
    ours = encoder.encode(PROMPTS)
    expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(model, tokenizer, PROMPTS, max_sequence_length=40,
                                                                hidden_states_layers=(1, 2, 3))
    assert torch.equal(ours, expected)
    ids, mask = encoder.tokens(PROMPTS)
    assert mask.sum(1).tolist()[0] > 20  # the system message is in there
    assert (ids == tokenizer.convert_tokens_to_ids("system")).any(1).all()


def test_layers_beyond_the_model_are_an_error(tiny_llm):
    model, tokenizer = tiny_llm
    with pytest.raises(CheckpointError, match=r"hidden states \(9, 18, 27\), but this text encoder has 3 layers"):
        Flux2TextEncoder(model, tokenizer, TextSpec("qwen3", (9, 18, 27)), max_length=8).encode(["a cat"])


def test_from_folder_reads_the_diffusers_layout(tmp_path, tiny_llm):
    model, tokenizer = tiny_llm
    model.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = Flux2TextEncoder.from_folder(tmp_path, TextSpec("qwen3", (1, 2, 3)), max_length=16)
    direct = Flux2TextEncoder(model, tokenizer, TextSpec("qwen3", (1, 2, 3)), max_length=16)
    assert torch.equal(loaded.encode(PROMPTS), direct.encode(PROMPTS))
    with pytest.raises(CheckpointError, match="missing text_encoder/, tokenizer/"):
        Flux2TextEncoder.from_folder(tmp_path / "text_encoder", TextSpec("qwen3", (1, 2, 3)))
