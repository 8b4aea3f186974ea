"""Text encoders from single files, as ComfyUI and kohya's scripts keep them: ``clip_l.safetensors``,
``clip_g.safetensors``, ``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors`` and the
``_scaled`` fp8 variants. Their keys are transformers' own (``text_model.*`` for CLIP, ``shared`` and
``encoder.*`` for T5), so a transformers model built from a config fits them; the config comes from
a ``config.json`` beside the tokenizers when there is one, else from the tensor shapes.

fp8 files load as their values (upcast one tensor at a time, or kept in fp8 under
``text_weight_dtype``); scaled ones through ``diffcore.io.scaled_fp8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import checkpoint_files, tensor_shapes
from diffcore.io.pretrained import empty_model, file_sources, fill
from diffcore.nn.fp8_options import text_rounding_while_loading

__all__ = ["clip_config_fields", "load_text_file", "t5_config_fields"]

CLIP_HEAD_DIM = 64   # OpenAI's CLIP-L and OpenCLIP's bigG / H: heads of 64 channels
# keys such files carry that no text model reads: CLIP's logit scale, old position-id buffers, CLIP-L's
# projection under a model without one (FLUX.1 takes the pooled output unprojected)
IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "text_projection.weight")


def clip_config_fields(shapes: dict[str, tuple[int, ...]], *, hidden_act: str) -> dict[str, Any]:
    """``CLIPTextConfig`` fields read off a transformers-keyed CLIP text encoder's shapes.
    ``hidden_act``: ``quick_gelu`` for OpenAI's CLIP-L, ``gelu`` for OpenCLIP's bigG."""
    vocab, width = shapes["text_model.embeddings.token_embedding.weight"]
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("text_model.encoder.layers."))
    if width % CLIP_HEAD_DIM:
        raise ValueError(f"a {width}-wide CLIP text encoder has no {CLIP_HEAD_DIM}-wide heads: give its config.json")
    fields = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=width // CLIP_HEAD_DIM, hidden_act=hidden_act, layer_norm_eps=1e-5,
                  intermediate_size=shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0],
                  max_position_embeddings=shapes["text_model.embeddings.position_embedding.weight"][0])
    if "text_projection.weight" in shapes:
        fields["projection_dim"] = shapes["text_projection.weight"][0]
    return fields


def t5_config_fields(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``T5Config`` fields of a T5 encoder's shapes (T5-v1.1's gated GELU when ``wi_0`` is there,
    the original ReLU otherwise): the heads from the relative attention bias, their width from q."""
    embedding = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    attention = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = shapes[attention + "relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    return dict(vocab_size=embedding[0], d_model=embedding[1], d_kv=shapes[attention + "q.weight"][0] // heads,
                d_ff=d_ff, num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
                feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False)


def load_text_file(model_class: type, file: str | Path, config: Any, *, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> nn.Module:
    """``model_class`` (a transformers text model) with ``config`` from the single file ``file``,
    in ``dtype`` on ``device``, eval mode; inside ``text_rounding_on_load`` its linear weights are
    rounded to fp8 as they are read. Keys the model lacks or does not know are one
    ``CheckpointError`` naming the file."""
    file = Path(file)
    files = checkpoint_files(file)
    model = empty_model(model_class, config, dtype)
    sources = file_sources(model, set(tensor_shapes(file)), IGNORED)
    if isinstance(sources, str):
        raise CheckpointError(f"{file}: not a {model_class.__name__} file as transformers names its tensors: "
                              f"{sources}")
    return fill(model, files, sources, device, text_rounding_while_loading())
