"""FLUX.2's text conditioning: three hidden states of a chat LLM, stacked per token (BFL flux2
``text_encoder.py``; diffusers ``Flux2Pipeline`` / ``Flux2KleinPipeline``).

- dev: Mistral-Small-3.2-24B, a conversation [BFL's system message, the prompt], no generation
  prompt; hidden states 10, 20, 30 -> 3 x 5120 = 15360 per token.
- klein / klein-base: Qwen3-4B / 8B, the prompt as the user turn of the chat template with the
  generation prompt and thinking disabled; hidden states 9, 18, 27 -> 3 x 2560 / 3 x 4096.

Both pad to ``max_length`` (512) tokens and give the LLM its attention mask; the transformer
then sees every position, padding included. ``hidden_states[0]`` is the embedding output, so
layer ``k`` is the output of decoder block ``k``.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import torch
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import CheckpointError, load_pretrained

# BFL flux2 system_messages.py, the one dev's prompts are encoded under
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")


@attrs.frozen
class TextSpec:
    """How a variant's prompts become its context: chat format and the hidden states stacked."""

    chat: str                   # "mistral3" (system + user, content lists) | "qwen3" (user turn, no thinking)
    layers: tuple[int, ...]


class Flux2TextEncoder(nn.Module):
    """``encode(prompts) -> (batch, max_length, len(layers) * hidden)``."""

    def __init__(self, model: nn.Module, tokenizer, spec: TextSpec, max_length: int = 512):
        super().__init__()
        if spec.chat not in ("mistral3", "qwen3"):
            raise ValueError(f"unknown FLUX.2 chat format {spec.chat!r}; expected mistral3 or qwen3")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.spec, self.max_length = tokenizer, spec, max_length

    @classmethod
    def from_folder(cls, path: str | Path, spec: TextSpec, *, max_length: int = 512,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux2TextEncoder:
        """From a diffusers FLUX.2 folder's ``text_encoder/`` and ``tokenizer/``, read locally only;
        the model class is the one its config names (Mistral3ForConditionalGeneration, Qwen3ForCausalLM)."""
        import transformers

        path = cls.check_folder(path)
        config = transformers.AutoConfig.from_pretrained(path / "text_encoder", local_files_only=True)
        arch = (config.architectures or ["?"])[0]
        model_class = getattr(transformers, arch, None)
        if model_class is None:
            raise CheckpointError(f"{path / 'text_encoder'}: its config names {arch!r}, which transformers "
                                  f"{transformers.__version__} does not have")
        model = load_pretrained(model_class, path / "text_encoder", dtype=dtype, device=device)
        load_tokenizer = transformers.AutoProcessor if spec.chat == "mistral3" else transformers.AutoTokenizer
        tokenizer = load_tokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        return cls(model, tokenizer, spec, max_length)

    @staticmethod
    def check_folder(path: str | Path) -> Path:
        """``path`` holds the ``text_encoder/`` and ``tokenizer/`` that ``from_folder`` reads, else a
        CheckpointError naming those missing (checked before anything loads)."""
        path = Path(path)
        missing = [d for d in ("text_encoder", "tokenizer") if not (path / d).is_dir()]
        if missing:
            raise CheckpointError(f"{path}: not a diffusers FLUX.2 folder with a text encoder; missing "
                                  f"{', '.join(d + '/' for d in missing)}")
        return path

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        ids, mask = (t.to(device) for t in self.tokens(prompts))
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        depth = len(out.hidden_states) - 1
        if max(self.spec.layers) > depth:
            raise CheckpointError(f"FLUX.2 stacks hidden states {self.spec.layers}, but this text encoder has "
                                  f"{depth} layers")
        stacked = torch.stack([out.hidden_states[k] for k in self.spec.layers], dim=1)
        return rearrange(stacked, "b n l d -> b l (n d)")

    def tokens(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask), each (batch, max_length)."""
        pad = dict(padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.spec.chat == "qwen3":
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True, enable_thinking=False)
                     for p in prompts]
            enc = self.tokenizer(texts, **pad)
        else:
            # "[IMG]" would make Pixtral's processor expect an image (BFL strips it too)
            conversations = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                              {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}]
                             for p in prompts]
            enc = self.tokenizer.apply_chat_template(conversations, add_generation_prompt=False, tokenize=True,
                                                     return_dict=True, **pad)
        return enc["input_ids"], enc["attention_mask"]
