"""transformers models (the text encoders) from local folders, rounded to fp8 while they are read.

``from_pretrained`` builds the whole model in its dtype before anything could round it: T5-XXL's
9.5 GB in bf16 exist at once even when ``text_weight_dtype`` keeps 4.8 of them. Inside
``text_rounding_on_load`` (which ``store_text_fp8`` opens around a bundle's text loader)
``load_pretrained`` builds the model as ``from_pretrained`` would, on the meta device (buffers
computed, as accelerate's ``init_empty_weights`` leaves them), ties its weights, stores its linear
layers as fp8 ones and fills it through ``load_model``, one tensor at a time. The bits equal
loading first and rounding after. A folder this cannot read exactly (no safetensors, keys that
transformers converts rather than renames, fp16 with modules kept in float32) loads through
``from_pretrained`` and is rounded after, as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import checkpoint_files, load_model, tensor_shapes
from diffcore.nn.fp8_options import Rounding, text_rounding_while_loading

__all__ = ["empty_model", "file_sources", "fill", "load_pretrained"]

log = logging.getLogger(__name__)


def load_pretrained(model_class: type, folder: str | Path, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """``model_class.from_pretrained(folder)`` in ``dtype`` on ``device``, local files only, in eval
    mode; inside ``text_rounding_on_load`` with its linear weights rounded as they are read."""
    folder = Path(folder)
    rounding = text_rounding_while_loading()
    if rounding is not None and dtype is not None:
        model = _load_rounded(model_class, folder, dtype, device, rounding)
        if model is not None:
            return model
    kw = {"local_files_only": True, **({"dtype": dtype} if dtype is not None else {})}
    return model_class.from_pretrained(folder, **kw).to(device).eval()


def _load_rounded(model_class: type, folder: Path, dtype: torch.dtype, device: str | torch.device,
                  rounding: Rounding) -> nn.Module | None:
    """The model filled while rounding, or None (with the reason logged) where only
    ``from_pretrained`` reads the folder exactly."""
    try:
        files = checkpoint_files(folder)
    except CheckpointError as exc:
        return _declined(folder, str(exc))
    if any(f.suffix != ".safetensors" for f in files):
        return _declined(folder, "its weights are not safetensors")
    config = model_class.config_class.from_pretrained(folder, local_files_only=True)
    model = empty_model(model_class, config, dtype)
    if dtype == torch.float16 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):
        return _declined(folder, "in float16 transformers keeps some of its modules in float32")
    sources = file_sources(model, set(tensor_shapes(folder)))
    if isinstance(sources, str):
        return _declined(folder, sources)
    return fill(model, files, sources, device, rounding)


def empty_model(model_class: type, config: Any, dtype: torch.dtype) -> nn.Module:
    """``model_class`` as ``from_pretrained`` builds it in ``dtype``: parameters on meta, buffers
    (RoPE frequencies, position ids) computed, weights tied."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def fill(model: nn.Module, files: list[Path], sources: dict[str, str], device: str | torch.device,
         rounding: Rounding | None, given: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """``empty_model``'s ``model`` read from ``files`` through ``load_model`` (model key -> file key:
    ``sources``; ``given``: tensors for keys the files lack), its linear weights rounded as they are
    read when ``rounding`` is given; the ties restored, on ``device``, in eval mode."""
    given = given or {}
    tied = _tied_groups(model)
    if rounding is not None:
        rounding.apply(model)

    def rename(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: state[file_key] if file_key in state else given[file_key] for key, file_key in sources.items()}

    model = load_model(lambda: model, files, rename=rename, copied=lambda key: False, device=device,
                       rounding=rounding)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    for names in tied:   # load_state_dict(assign=True) gave each name its own Parameter: one again (a
        kept = [n for n in names if n in params]   # tied layer stored in fp8 keeps its own rounded copy)
        for name in kept[1:]:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(kept[0]))
    return model.to(device).eval()   # buffers were computed on the CPU


def _declined(folder: Path, why: str) -> None:
    log.info("%s: loaded at full precision and rounded after (%s)", folder, why)
    return None


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names that are one tensor (tied embeddings), by identity."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def file_sources(model: nn.Module, file_keys: set[str], ignored: tuple[str, ...] = ()) -> dict[str, str] | str:
    """Model key -> the file key it is read from (a tied key from whichever of its group the file
    has), or why there is no such map. File keys are the model's, or what transformers' own
    renaming (``revert_weight_conversion``, v5) turns them into when it saves, or the model's under
    one prefix that every file key has (transformers 5 names a ``CLIPTextModel``'s keys without the
    ``text_model.`` its files carry); ``ignored`` file keys may be left over."""
    expected = model.state_dict(keep_vars=True)
    saved = _saved_names(model, expected)
    heads = {key.split(".", 1)[0] for key in file_keys - set(ignored)}
    if len(heads) == 1 and not any(key.startswith(next(iter(heads)) + ".") for key in expected):
        saved = {key: f"{next(iter(heads))}.{saved.get(key, key)}" for key in expected}
    by_tensor: dict[int, list[str]] = {}
    for key, tensor in expected.items():
        by_tensor.setdefault(id(tensor), []).append(key)
    sources: dict[str, str] = {}
    for keys in by_tensor.values():
        found = [saved.get(k, k) for k in keys if saved.get(k, k) in file_keys]
        if not found:
            return f"no tensor of the file holds {keys[0]}"
        sources.update({k: found[0] for k in keys})
        file_keys = file_keys - set(found[1:])   # a tied tensor saved under two names: one is read
    unused = file_keys - set(sources.values()) - set(ignored)
    if unused:
        return f"{len(unused)} tensor(s) of the file match no parameter as they are named ({sorted(unused)[0]}, ...)"
    return sources


def _saved_names(model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model key -> the key transformers saves it under, where it renames (Mistral3's
    ``model.language_model.*`` saved as ``language_model.model.*``); tensors it would convert
    (fuse, split) have no such name and are left out."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {}
    probes = {key: tensor.detach() for key, tensor in expected.items()}   # one object per key, tied or not
    try:
        reverted = revert_weight_conversion(model, dict(probes))
    except Exception as exc:   # a conversion that needs real tensors: no renaming is known then
        log.debug("revert_weight_conversion on meta failed: %s", exc)
        return {}
    key_of = {id(t): k for k, t in probes.items()}
    return {key_of[id(t)]: saved for saved, t in reverted.items() if id(t) in key_of}
