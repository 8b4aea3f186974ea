"""The import surface promised to plugin authors: import from here, nothing else in the core
(tests may also use ``diffcore.testing``).

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
    "ConvertSettings": "diffcore.jobs.convert",
    "check_converted": "diffcore.jobs.convert",
    "DIFFUSERS_WEIGHTS": "diffcore.jobs.convert",
    "is_main_process": "diffcore.jobs",
    # errors (no torch)
    "DiffcoreError": "diffcore.errors",
    "ConfigError": "diffcore.errors",
    "PluginError": "diffcore.errors",
    "CheckpointError": "diffcore.errors",
    "did_you_mean": "diffcore.errors",
    # config validators every family needs (no torch until resolve_dtype runs)
    "DTYPES": "diffcore.config.validators",
    "one_of": "diffcore.config.validators",
    "variant_of": "diffcore.config.validators",
    "local_path": "diffcore.config.validators",
    "resolve_dtype": "diffcore.config.validators",
    "renamed_field": "diffcore.config.validators",
    # models, attention, sampling, guidance
    "ModelBundle": "diffcore.models",
    "LazyComponent": "diffcore.models",
    "run_block": "diffcore.nn.checkpointing",
    "fingerprint": "diffcore.io.fingerprint",
    "module_fingerprint": "diffcore.io.fingerprint",
    "GenerationRequest": "diffcore.models",
    "Control": "diffcore.models",
    "Attention": "diffcore.nn.attention",
    "AttentionContext": "diffcore.nn.attention",
    "attention_layers": "diffcore.nn.attention",
    "patch_attention": "diffcore.nn.attention",
    "resolve_layers": "diffcore.nn.attention",
    "Linear": "diffcore.nn.linear",
    "GeluMLP": "diffcore.nn.linear",
    "linear": "diffcore.nn.linear",
    "fresh_gelu": "diffcore.nn.linear",
    "linear_plus": "diffcore.nn.linear",
    "linear_times": "diffcore.nn.linear",
    "onednn_matmul": "diffcore.nn.linear",
    "Conv2d": "diffcore.nn.conv",
    "conv_plus": "diffcore.nn.conv",
    "plain": "diffcore.nn.linear",
    "activated_linear": "diffcore.nn.lora_linear",
    # the family toolbox: layers every family is made of (diffcore.nn)
    "timestep_embedding": "diffcore.nn.embeddings",
    "rope": "diffcore.nn.embeddings",
    "apply_rope": "diffcore.nn.embeddings",
    "EmbedND": "diffcore.nn.embeddings",
    "MLPEmbedder": "diffcore.nn.embeddings",
    "RMSNorm": "diffcore.nn.norms",
    "QKNorm": "diffcore.nn.norms",
    "layer_norm": "diffcore.nn.norms",
    "attention_heads": "diffcore.nn.qk_norm_rope",
    "modulate": "diffcore.nn.mmdit",
    "Modulation": "diffcore.nn.mmdit",
    "ModulationOut": "diffcore.nn.mmdit",
    "FusedModulationOut": "diffcore.nn.mmdit",
    "SelfAttention": "diffcore.nn.mmdit",
    "LastLayer": "diffcore.nn.mmdit",
    "DoubleStreamBlock": "diffcore.nn.mmdit",
    "SingleStreamBlock": "diffcore.nn.mmdit",
    "SwiGLU": "diffcore.nn.mmdit",
    "swiglu": "diffcore.nn.mmdit",
    "swiglu_mlp": "diffcore.nn.mmdit",
    "SwiGLUMLP": "diffcore.nn.mmdit",
    "AutoEncoderParams": "diffcore.nn.params",
    "AutoEncoder": "diffcore.nn.autoencoder",
    "patchify": "diffcore.nn.autoencoder",
    "unpatchify": "diffcore.nn.autoencoder",
    "vae_diffusers_to_ldm": "diffcore.nn.autoencoder_keys",
    "vae_ldm_to_diffusers": "diffcore.nn.autoencoder_keys",
    "vae_ldm_to_stability": "diffcore.nn.autoencoder_keys",
    "vae_to_ldm": "diffcore.nn.autoencoder_keys",
    "vae_params_from_shapes": "diffcore.nn.autoencoder_keys",
    "vae_params_from_diffusers": "diffcore.nn.autoencoder_keys",
    "vae_diffusers_config": "diffcore.nn.autoencoder_keys",
    "canny": "diffcore.nn.control",
    "hint_encoder": "diffcore.nn.control",
    "hint_from_diffusers": "diffcore.nn.control",
    "hint_widths": "diffcore.nn.control",
    "trained_part": "diffcore.nn.control",
    "controlnet_source": "diffcore.nn.control",
    "zero_": "diffcore.nn.control",
    # the family toolbox: key conversion helpers (diffcore.nn.keys)
    "Offload": "diffcore.nn.offload",
    "swap_halves": "diffcore.nn.keys",
    "meta_state": "diffcore.nn.keys",
    "detect_layout": "diffcore.nn.keys",
    "rename_keys": "diffcore.nn.keys",
    "strip_prefix": "diffcore.nn.keys",
    "block_indices": "diffcore.nn.keys",
    "sample": "diffcore.sampling.engine",
    "euler": "diffcore.sampling.samplers",
    "heun": "diffcore.sampling.samplers",
    "dpmpp_2m": "diffcore.sampling.samplers",
    "euler_ancestral": "diffcore.sampling.samplers",
    "dpmpp_2m_sde": "diffcore.sampling.samplers",
    "ddim": "diffcore.sampling.samplers",
    "Pipeline": "diffcore.sampling.pipeline",
    "FlowConfig": "diffcore.sampling.catalog",
    "DynamicShiftConfig": "diffcore.sampling.catalog",
    "flow_schedule": "diffcore.sampling.catalog",
    "time_shift": "diffcore.sampling.schedules",
    "dynamic_shift_mu": "diffcore.sampling.schedules",
    "pick_device": "diffcore.sampling.pipeline",
    "build_schedule": "diffcore.sampling.pipeline",
    "CFG": "diffcore.sampling.cfg",
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
    "check_safetensors": "diffcore.io.headers",
    "read_config_json": "diffcore.io.headers",
    "checkpoint_files": "diffcore.io.checkpoint",
    "load_model": "diffcore.io.checkpoint",
    "load_pretrained": "diffcore.io.pretrained",
    "load_text_file": "diffcore.io.text_files",
    "load_text_encoder": "diffcore.io.text_files",
    "single_files": "diffcore.io.text_files",
    "clip_config_fields": "diffcore.io.text_files",
    "t5_config_fields": "diffcore.io.text_files",
    "load_state_dict": "diffcore.io.checkpoint",
    "save_file_atomic": "diffcore.io.checkpoint",
    "save_converted": "diffcore.io.checkpoint",
    "cast_state": "diffcore.io.checkpoint",
    "tensor_shapes": "diffcore.io.checkpoint",
    "Float8Conv2d": "diffcore.nn.fp8",
    "Float8Linear": "diffcore.nn.fp8",
    "Rounding": "diffcore.nn.fp8_options",
    "rounding_on_load": "diffcore.nn.fp8_options",
    "store_fp8": "diffcore.nn.fp8",
    "LoraLayer": "diffcore.lora.weights",
    "LoraWeights": "diffcore.lora.weights",
    "load_lora": "diffcore.lora.files",
    "read_lora": "diffcore.lora.files",
    "match_lora": "diffcore.lora.files",
    "save_lora": "diffcore.lora.files",
    "apply_lora": "diffcore.lora.apply",
    "apply_lora_to_bundle": "diffcore.lora.apply",
    "remove_lora": "diffcore.lora.apply",
    "describe_lora": "diffcore.lora.inspect",
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
