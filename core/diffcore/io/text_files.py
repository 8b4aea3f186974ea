"""Text encoders from single files, as ComfyUI and kohya's scripts keep them: ``clip_l.safetensors``,
``clip_g.safetensors``, ``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn.safetensors`` and the
``_scaled`` fp8 variants. Their keys are transformers' own (``text_model.*`` for CLIP, ``shared`` and
``encoder.*`` for T5), so a transformers model built from a config fits them; the config comes from
a ``config.json`` beside the tokenizers when there is one, else from the tensor shapes.

fp8 files load as their values (upcast one tensor at a time, or kept in fp8 under
``text_weight_dtype``); scaled ones through ``diffcore.io.scaled_fp8``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import CheckpointError, ConfigError
from diffcore.io.headers import check_safetensors
from diffcore.io.checkpoint import checkpoint_files, tensor_shapes
from diffcore.io.pretrained import empty_model, file_sources, fill, load_pretrained
from diffcore.nn.fp8_options import text_rounding_while_loading

__all__ = ["clip_config_fields", "load_text_encoder", "load_text_file", "single_files", "t5_config_fields"]

CLIP_HEAD_DIM = 64   # OpenAI's CLIP-L and OpenCLIP's bigG / H: heads of 64 channels
# keys such files carry that no text model reads: CLIP's logit scale, old position-id buffers, CLIP-L's
# projection under a model without one (FLUX.1 takes the pooled output unprojected)
IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "text_projection.weight")


def clip_config_fields(shapes: dict[str, tuple[int, ...]], *, hidden_act: str, tokenizer: Any = None
                       ) -> dict[str, Any]:
    """``CLIPTextConfig`` fields read off a transformers-keyed CLIP text encoder's shapes.
    ``hidden_act``: ``quick_gelu`` for OpenAI's CLIP-L, ``gelu`` for OpenCLIP's bigG; the special
    token ids from ``tokenizer`` where given (the pooled output is read at the end-of-text token)."""
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
    if tokenizer is not None:
        fields.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
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
                   device: str | torch.device = "cpu", given: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``model_class`` (a transformers text model) with ``config`` from the single file ``file``,
    in ``dtype`` on ``device``, eval mode; inside ``text_rounding_on_load`` its linear weights are
    rounded to fp8 as they are read. ``given``: tensors for model keys the file may lack. Keys the
    model lacks or does not know are one ``CheckpointError`` naming the file."""
    file, given = Path(file), given or {}
    files = checkpoint_files(file)
    model = empty_model(model_class, config, dtype)
    if dtype == torch.float16:   # as from_pretrained: T5's wo stays float32, where fp16 would overflow
        keep = {*(getattr(model, "_keep_in_fp32_modules", None) or ()),
                *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())}
        for name, module in model.named_modules():
            if keep.intersection(name.split(".")):
                module.to(torch.float32)
    in_file = set(tensor_shapes(file))
    sources = file_sources(model, in_file | (set(given) - in_file), IGNORED)
    if isinstance(sources, str):
        raise CheckpointError(f"{file}: not a {model_class.__name__} file as transformers names its tensors: "
                              f"{sources}")
    return fill(model, files, sources, device, text_rounding_while_loading(), given)


def load_text_encoder(model_class: type, folder: str | Path | None, file: str | Path | None = None, *,
                      fields: Callable[[dict[str, tuple[int, ...]]], dict[str, Any]],
                      dtype: torch.dtype | None, device: str | torch.device = "cpu",
                      given: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A family's text encoder: the diffusers component ``folder`` (``load_pretrained``), or the
    single file ``file`` with the folder's ``config.json`` where it has one, else the config that
    ``fields(shapes)`` reads off the file."""
    if file is None:
        return load_pretrained(model_class, folder, dtype=dtype, device=device)
    config_class = model_class.config_class
    if folder is not None and (Path(folder) / "config.json").is_file():
        config = config_class.from_pretrained(folder, local_files_only=True)
    else:
        try:
            config = config_class(**fields(tensor_shapes(file)))
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{file}: its shapes do not describe a {config_class.__name__.removesuffix('Config')}"
                                  f" text encoder ({type(exc).__name__}: {exc}); put its config.json in "
                                  f"{folder or 'the folder of the tokenizers'}") from None
    return load_text_file(model_class, file, config, dtype=dtype or torch.float32, device=device, given=given)


def single_files(**named: str | None) -> dict[str, Path]:
    """The ``[model]`` keys naming text-encoder files (``clip_l = "..."``) that are set, as paths,
    each checked to be a whole safetensors file before anything loads (a ``ConfigError`` naming
    the key otherwise)."""
    files = {key: Path(value).expanduser() for key, value in named.items() if value}
    for key, file in files.items():
        if not file.is_file():
            raise ConfigError(f"{file}: no such file", path=key)
        try:
            check_safetensors(file)
        except CheckpointError as exc:
            raise ConfigError(str(exc), path=key) from None
    return files
