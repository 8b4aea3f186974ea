"""SD3's text conditioning: three encoders, one token sequence and one pooled vector.

- CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 give their penultimate hidden states (no final LN),
  768 + 1280 features per token, 77 tokens; the two are concatenated on features and zero-padded
  to T5's width (4096);
- T5-v1.1-XXL gives its last hidden state, ``max_sequence_length`` tokens (256 as diffusers;
  Stability's reference pads to 77); the sequence is ``[clip (77) ; t5]``;
- pooled = ``[CLIP-L pooled (768, not projected) | CLIP-G pooled and projected (1280)]``:
  Stability's reference reads CLIP-L without its projection (``return_projected_pooled=False``);
  diffusers' release folders hold an identity projection there, so both agree.

T5 is optional (it is 9 GB in fp16): without it its part of the sequence is zeros, as diffusers
does. No attention masks: padded tokens are attended, as in training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffcore.api import CheckpointError, clip_config_fields, load_text_encoder, t5_config_fields, tensor_shapes

CLIP_LENGTH = 77
FOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
           "t5": ("text_encoder_3", "tokenizer_3")}


class SD3TextEncoder(nn.Module):
    """``encode(prompts) -> (context (B, 77 + max_length, width), pooled (B, 768 + 1280))``;
    ``t5 = None`` leaves T5's tokens zero (``width`` is then the transformer's context width)."""

    def __init__(self, clip_l: nn.Module, clip_l_tokenizer, clip_g: nn.Module, clip_g_tokenizer,
                 t5: nn.Module | None = None, t5_tokenizer=None, *, max_length: int = 256, width: int = 4096):
        super().__init__()
        self.clip_l, self.clip_g = clip_l.eval().requires_grad_(False), clip_g.eval().requires_grad_(False)
        self.t5 = t5.eval().requires_grad_(False) if t5 is not None else None
        self.clip_l_tokenizer, self.clip_g_tokenizer, self.t5_tokenizer = clip_l_tokenizer, clip_g_tokenizer, t5_tokenizer
        self.max_length = max_length
        self.width = t5.config.d_model if t5 is not None else width

    @classmethod
    def from_folder(cls, path: str | Path, *, t5: bool = True, max_length: int = 256, width: int = 4096,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    clip_l: str | Path | None = None, clip_g: str | Path | None = None,
                    t5xxl: str | Path | None = None) -> SD3TextEncoder:
        """From a diffusers SD3 folder (``text_encoder``/``tokenizer`` CLIP-L, ``..._2`` CLIP-G,
        ``..._3`` T5), read locally only; ``t5 = False`` neither needs nor loads T5. ``clip_l`` /
        ``clip_g`` / ``t5xxl``: single files (ComfyUI's and kohya's) read instead of the folder's
        encoder, with its ``config.json`` where the folder has one; a CLIP-L file without SD3's
        projection gets the identity that diffusers' SD3 folders hold (its pooled output is read
        unprojected)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        files = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5xxl}
        path = cls.check_folder(path, t5=t5, files=[name for name, file in files.items() if file is not None])
        tokenizers = {name: AutoTokenizer.from_pretrained(path / FOLDERS[name][1], local_files_only=True)
                      for name in FOLDERS if t5 or name != "t5"}

        def clip(name: str) -> nn.Module:
            def fields(shapes):
                act = "quick_gelu" if name == "clip_l" else "gelu"
                return {"projection_dim": shapes["text_model.embeddings.token_embedding.weight"][1],
                        **clip_config_fields(shapes, hidden_act=act, tokenizer=tokenizers[name])}

            file, given = files[name], None
            if file is not None and name == "clip_l":
                width = tensor_shapes(file)["text_model.embeddings.token_embedding.weight"][1]
                given = {"text_projection.weight": torch.eye(width)}
            return load_text_encoder(CLIPTextModelWithProjection, path / FOLDERS[name][0], file, fields=fields,
                                     dtype=dtype, device=device, given=given)

        encoder = load_text_encoder(T5EncoderModel, path / FOLDERS["t5"][0], t5xxl, fields=t5_config_fields,
                                    dtype=dtype, device=device) if t5 else None
        return cls(clip("clip_l"), tokenizers["clip_l"], clip("clip_g"), tokenizers["clip_g"], encoder,
                   tokenizers.get("t5"), max_length=max_length, width=width)

    @staticmethod
    def check_folder(path: str | Path, *, t5: bool = True, files: list[str] = ()) -> Path:
        """``path`` holds the folders ``from_folder`` reads (the tokenizers, and the encoders not
        among ``files``: names of ``FOLDERS``), else a CheckpointError naming those missing (checked
        before anything loads)."""
        path = Path(path)
        needed = [d for name, pair in FOLDERS.items() if t5 or name != "t5"
                  for d in (pair[1:] if name in files else pair)]
        missing = [d for d in needed if not (path / d).is_dir()]
        if missing:
            hint = "; or set text_encoder_3 = false to run without T5" if set(missing) <= set(FOLDERS["t5"]) else ""
            raise CheckpointError(f"{path}: not a diffusers SD3 folder with text encoders; missing "
                                  f"{', '.join(d + '/' for d in missing)}{hint}")
        return path

    def encode(self, prompts: list[str], device: str | torch.device | None = None, *,
               grad: bool = False) -> tuple[Tensor, Tensor]:
        """``device``: where the encoders compute (under offload hooks parameters read as meta);
        ``grad`` keeps the autograd graph (text-encoder LoRA training), else none is built."""
        with torch.enable_grad() if grad else torch.no_grad():
            return self._encode(prompts, device)

    def _encode(self, prompts: list[str], device: str | torch.device | None) -> tuple[Tensor, Tensor]:
        device = device if device is not None else next(self.clip_l.parameters()).device
        l_tokens, l_pooled = self._clip(self.clip_l, self.clip_l_tokenizer, prompts, device)
        g_tokens, g_pooled = self._clip(self.clip_g, self.clip_g_tokenizer, prompts, device)
        g_pooled = self.clip_g.text_projection(g_pooled)
        clip = torch.cat([l_tokens, g_tokens], dim=-1)
        if clip.shape[-1] > self.width:
            raise CheckpointError(f"the CLIP features ({l_tokens.shape[-1]} + {g_tokens.shape[-1]}) are wider than "
                                  f"the T5 / context width {self.width}")
        if self.t5 is not None:
            ids = self._ids(self.t5_tokenizer, prompts, self.max_length, device)
            t5 = self.t5(input_ids=ids).last_hidden_state
        else:
            t5 = clip.new_zeros(len(prompts), self.max_length, self.width)
        context = torch.cat([F.pad(clip, (0, self.width - clip.shape[-1])), t5.to(clip.dtype)], dim=1)
        return context, torch.cat([l_pooled, g_pooled], dim=-1)

    @classmethod
    def _clip(cls, model: nn.Module, tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
        """(penultimate hidden states, pooled output before the projection)."""
        out = model.text_model(input_ids=cls._ids(tokenizer, prompts, CLIP_LENGTH, device), output_hidden_states=True)
        return out.hidden_states[-2], out.pooler_output

    @staticmethod
    def _ids(tokenizer, prompts: list[str], length: int, device) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
