"""SDXL text conditioning through transformers: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.

Each prompt is tokenised to 77 tokens by each encoder's own tokenizer (CLIP-L pads with its
end-of-text token, bigG with ``!``, id 0: the tokenizers' saved configs say so). The context is
both encoders' penultimate hidden states (no final LayerNorm) side by side, 768 + 1280 = 2048
features; the pooled vector is bigG's projected end-of-text embedding (``text_embeds``). The
refiner has bigG alone (1280 features). An empty negative prompt is all zeros, context and
pooled, where the checkpoint was trained so (base: diffusers ``force_zeros_for_empty_prompt``,
Stability's ``force_uc_zero_embeddings=["txt"]``); the refiner encodes "" instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from diffcore.api import CheckpointError, load_pretrained

TOKENS = 77


class SDXLText(nn.Module):
    """``encoders`` run in order and are concatenated on features; the last gives the pooled vector."""

    def __init__(self, tokenizers: Sequence, encoders: Sequence[nn.Module], zero_empty_negative: bool = True):
        super().__init__()
        if not encoders or len(tokenizers) != len(encoders):
            raise ValueError(f"need one tokenizer per text encoder, got {len(tokenizers)} and {len(encoders)}")
        self.tokenizers = list(tokenizers)
        self.encoders = nn.ModuleList(encoders)
        self.zero_empty_negative = zero_empty_negative

    @staticmethod
    def check_folder(path: str | Path) -> None:
        """A one-line error unless ``path`` holds SDXL's bigG pair (before anything loads)."""
        path = Path(path)
        if not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir():
            raise CheckpointError(f"{path}: no text_encoder_2/ and tokenizer_2/ (OpenCLIP bigG): not a diffusers "
                                  f"SDXL folder")

    @classmethod
    def from_folder(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    zero_empty_negative: bool | None = None) -> SDXLText:
        """A diffusers SDXL folder's ``text_encoder(_2)`` and ``tokenizer(_2)`` (the refiner has the
        ``_2`` pair only); ``zero_empty_negative`` defaults to the folder's ``model_index.json``."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = Path(path)
        if not (path / "text_encoder_2").is_dir() or not (path / "tokenizer_2").is_dir():
            raise CheckpointError(f"{path}: no text_encoder_2/ and tokenizer_2/ (OpenCLIP bigG): not a diffusers "
                                  f"SDXL folder")
        tokenizers, encoders = [], []
        if (path / "text_encoder").is_dir():
            tokenizers.append(CLIPTokenizer.from_pretrained(path / "tokenizer"))
            encoders.append(load_pretrained(CLIPTextModel, path / "text_encoder", dtype=dtype))
        tokenizers.append(CLIPTokenizer.from_pretrained(path / "tokenizer_2"))
        encoders.append(load_pretrained(CLIPTextModelWithProjection, path / "text_encoder_2", dtype=dtype))
        if zero_empty_negative is None:
            import json

            index = path / "model_index.json"
            zero_empty_negative = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) \
                if index.is_file() else len(encoders) == 2
        return cls(tokenizers, encoders, zero_empty_negative).to(device).eval()

    @classmethod
    def from_single_file(cls, file: str | Path, tokenizers: str | Path, *, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", zero_empty_negative: bool | None = None) -> SDXLText:
        """The CLIP-L / bigG inside an all-in-one checkpoint (``diffcore_sdxl.clip_keys``), with the
        tokenizers (and any ``text_encoder*/config.json``) of the folder ``tokenizers``; the base's
        empty negative is zeros, the refiner's (bigG alone) an encoding of ""."""
        from safetensors import safe_open
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from diffcore_sdxl import clip_keys

        file, tokenizers = Path(file), Path(tokenizers)
        with safe_open(str(file), framework="pt") as f:
            found = clip_keys.embedders(f.keys())
            if not found:
                raise CheckpointError(f"{file}: no text encoders inside (no conditioner.embedders.* keys): set "
                                      f"text_encoders to a local diffusers SDXL folder")
            wanted = tuple(clip_keys.prefix(i, kind) for i, kind in found.items())
            sd = {k: f.get_tensor(k) for k in f.keys() if k.startswith(wanted)}
        folders = ["tokenizer", "tokenizer_2"] if len(found) == 2 else ["tokenizer_2"]
        missing = [d for d in folders if not (tokenizers / d).is_dir()]
        if missing:
            raise CheckpointError(f"{tokenizers}: no {' or '.join(d + '/' for d in missing)} for the text encoders "
                                  f"inside {file.name} (any diffusers SDXL folder has them)")
        toks, encoders = [], []
        for (index, kind), name in zip(found.items(), folders):
            tokenizer = CLIPTokenizer.from_pretrained(tokenizers / name)
            weights = {k: v.to(dtype) for k, v in clip_keys.from_stability(sd, index, kind).items()}
            config_file = tokenizers / name.replace("tokenizer", "text_encoder") / "config.json"
            try:
                if config_file.is_file():
                    config = CLIPTextConfig.from_json_file(config_file)
                else:
                    config = CLIPTextConfig(**clip_keys.config_from_shapes(weights, kind, tokenizer))
            except ValueError as exc:
                raise CheckpointError(f"{file}: embedder {index}: {exc}") from None
            model_class = CLIPTextModelWithProjection if "text_projection.weight" in weights else CLIPTextModel
            with torch.device("meta"):
                encoder = model_class(config)
            try:
                encoder.load_state_dict(clip_keys.fit(weights, encoder), strict=True, assign=True)
            except RuntimeError as exc:
                raise CheckpointError(f"{file}: embedder {index} ({kind}) does not fit its config: "
                                      f"{str(exc).splitlines()[0]}") from None
            for module in encoder.modules():   # the embeddings' position ids: the one buffer outside the state dict
                if getattr(module, "position_ids", None) is not None and module.position_ids.is_meta:
                    module.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None],
                                           persistent=False)
            toks.append(tokenizer)
            encoders.append(encoder.to(dtype))
        if zero_empty_negative is None:
            zero_empty_negative = len(encoders) == 2
        return cls(toks, encoders, zero_empty_negative).to(device).eval()

    @property
    def pooled_dim(self) -> int:
        return self.encoders[-1].config.projection_dim

    @property
    def device(self) -> torch.device:
        return next(self.encoders.parameters()).device

    def encode(self, prompts: Sequence[str], *, grad: bool = False) -> tuple[Tensor, Tensor]:
        """(context (B, 77, sum of widths), pooled (B, projection dim)) for ``prompts``; ``grad``
        keeps the autograd graph (text-encoder LoRA training), else none is built."""
        with torch.enable_grad() if grad else torch.no_grad():
            return self._encode(prompts)

    def _encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        contexts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            ids = tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            contexts.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            raise ValueError("the last text encoder must be a CLIPTextModelWithProjection (it gives the pooled vector)")
        return torch.cat(contexts, dim=-1), pooled

    def encode_negative(self, negatives: Sequence[str | None], like: tuple[Tensor, Tensor], *,
                        grad: bool = False) -> tuple[Tensor, Tensor]:
        """The unconditional branch: zeros for empty negatives where the checkpoint wants them."""
        context, pooled = like
        texts = [n or "" for n in negatives]
        if self.zero_empty_negative and not any(texts):
            return torch.zeros_like(context), torch.zeros_like(pooled)
        enc_context, enc_pooled = self.encode(texts, grad=grad)
        if self.zero_empty_negative:   # a batch mixing empty and given negatives: zero the empty rows
            keep = torch.tensor([bool(t) for t in texts], device=enc_context.device)
            enc_context, enc_pooled = enc_context * keep[:, None, None], enc_pooled * keep[:, None]
        return enc_context, enc_pooled


def micro_conditioning(height: int, width: int, *, aesthetic: bool, original_size: tuple[int, int] | None = None,
                       crop: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                       aesthetic_score: float = 6.0) -> list[float]:
    """The scalars the label embedding takes, as diffusers' ``_get_add_time_ids``: base
    ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``; refiner ``[orig_h, orig_w,
    crop_top, crop_left, aesthetic_score]``. Sizes default to the output's (height, width)."""
    original = tuple(original_size or (height, width))
    last = (aesthetic_score,) if aesthetic else tuple(target_size or (height, width))
    return [float(v) for v in (*original, *crop, *last)]
