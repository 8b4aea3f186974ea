"""The import surface promised to plugin authors: import from here, nothing else in the core.

    from diffcore.api import hookimpl, ModelBundle, GuidanceProcessor, Branch

Names load on first use (PEP 562), so ``from diffcore.api import hookimpl`` in a plugin module
costs nothing: torch is imported only when a torch-backed name (``ModelBundle``, ``sample``...)
is asked for, which factories do lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    # plugins and configs (no torch)
    "hookimpl": "diffcore.hookspecs",
    "registry": "diffcore.plugins",
    "get_plugins": "diffcore.plugins",
    "NoConfig": "diffcore.registry",
    "Spec": "diffcore.config.spec",
    "component": "diffcore.config.spec",
    "component_list": "diffcore.config.spec",
    "structure": "diffcore.config.structure",
    "JobContext": "diffcore.jobs",
    "JobSettings": "diffcore.jobs",
    "is_main_process": "diffcore.jobs",
    # errors (no torch)
    "DiffcoreError": "diffcore.errors",
    "ConfigError": "diffcore.errors",
    "PluginError": "diffcore.errors",
    "CheckpointError": "diffcore.errors",
    "did_you_mean": "diffcore.errors",
    # models, attention, sampling, guidance
    "ModelBundle": "diffcore.models",
    "GenerationRequest": "diffcore.models",
    "Attention": "diffcore.nn.attention",
    "AttentionContext": "diffcore.nn.attention",
    "attention_layers": "diffcore.nn.attention",
    "patch_attention": "diffcore.nn.attention",
    "resolve_layers": "diffcore.nn.attention",
    "Linear": "diffcore.nn.linear",
    "GeluMLP": "diffcore.nn.linear",
    "linear": "diffcore.nn.linear",
    "plain": "diffcore.nn.linear",
    "sample": "diffcore.sampling.engine",
    "add_noise": "diffcore.sampling.denoisers",
    "make_denoiser": "diffcore.sampling.denoisers",
    "ddpm_sigma_table": "diffcore.sampling.schedules",
    "COND": "diffcore.sampling.guidance",
    "UNCOND": "diffcore.sampling.guidance",
    "Branch": "diffcore.sampling.guidance",
    "BranchPatch": "diffcore.sampling.guidance",
    "GuidanceProcessor": "diffcore.sampling.guidance",
    "StepInfo": "diffcore.sampling.guidance",
    # weights and images
    "checkpoint_files": "diffcore.io.checkpoint",
    "load_model": "diffcore.io.checkpoint",
    "load_state_dict": "diffcore.io.checkpoint",
    "save_file_atomic": "diffcore.io.checkpoint",
    "tensor_shapes": "diffcore.io.checkpoint",
    "load_image": "diffcore.io.images",
    "make_grid": "diffcore.io.images",
    "save_png": "diffcore.io.images",
    "to_pil": "diffcore.io.images",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"diffcore.api has no {name!r}; it offers: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
