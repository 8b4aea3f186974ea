"""FLUX.1's text conditioning: T5-v1.1-XXL's last hidden state (the token sequence, 4096 wide)
and CLIP ViT-L/14's pooled output (768), as BFL's ``HFEmbedder`` pair and diffusers'
``FluxPipeline`` compute them: padded to a fixed length, no attention mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from diffcore.api import CheckpointError, clip_config_fields, load_text_encoder, t5_config_fields

CLIP_LENGTH = 77


class FluxTextEncoder(nn.Module):
    """``encode(prompts) -> (txt (B, max_length, d_t5), vec (B, d_clip))``."""

    def __init__(self, t5: nn.Module, t5_tokenizer, clip: nn.Module, clip_tokenizer, max_length: int = 512):
        super().__init__()
        self.t5, self.clip = t5.eval().requires_grad_(False), clip.eval().requires_grad_(False)
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.max_length = max_length

    @classmethod
    def from_folder(cls, path: str | Path, *, max_length: int = 512, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", clip_l: str | Path | None = None,
                    t5xxl: str | Path | None = None) -> FluxTextEncoder:
        """From a diffusers FLUX.1 folder: ``text_encoder`` / ``tokenizer`` (CLIP) and
        ``text_encoder_2`` / ``tokenizer_2`` (T5), read locally only. ``clip_l`` / ``t5xxl``: single
        files (ComfyUI's and kohya's ``clip_l.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors``) read
        instead of the folder's encoder, with its ``config.json`` where the folder has one."""
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        path = cls.check_folder(path, clip_l=clip_l is not None, t5xxl=t5xxl is not None)
        clip_tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        t5_tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
        def clip_fields(shapes):
            return clip_config_fields(shapes, hidden_act="quick_gelu", tokenizer=clip_tokenizer)

        clip = load_text_encoder(CLIPTextModel, path / "text_encoder", clip_l, fields=clip_fields, dtype=dtype,
                                 device=device)
        t5 = load_text_encoder(T5EncoderModel, path / "text_encoder_2", t5xxl, fields=t5_config_fields, dtype=dtype,
                               device=device)
        return cls(t5, t5_tokenizer, clip, clip_tokenizer, max_length)

    @staticmethod
    def check_folder(path: str | Path, *, clip_l: bool = False, t5xxl: bool = False) -> Path:
        """``path`` if it holds the folders ``from_folder`` reads (checked before anything loads):
        both tokenizers, and the encoders not given as files."""
        path = Path(path)
        needed = [d for d, given in (("text_encoder", clip_l), ("tokenizer", False), ("text_encoder_2", t5xxl),
                                     ("tokenizer_2", False)) if not given]
        missing = [d for d in needed if not (path / d).is_dir()]
        if missing:
            raise CheckpointError(f"{path}: not a diffusers FLUX.1 folder with text encoders; missing "
                                  f"{', '.join(d + '/' for d in missing)}")
        return path

    def encode(self, prompts: list[str], device: str | torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``device``: where the encoders compute (under offload hooks their parameters read as meta)."""
        device = device if device is not None else next(self.t5.parameters()).device
        ids = self._ids(self.t5_tokenizer, prompts, self.max_length, device)
        txt = self.t5(input_ids=ids).last_hidden_state
        ids = self._ids(self.clip_tokenizer, prompts, CLIP_LENGTH, device)
        vec = self.clip(input_ids=ids).pooler_output
        return txt, vec

    @staticmethod
    def _ids(tokenizer, prompts: list[str], length: int, device: torch.device) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

