"""LDM autoencoder keys in every layout the families meet, and the shape of an autoencoder read
off its file or its diffusers ``config.json``.

Layouts:

- ours (``diffcore.nn.autoencoder``): the original LDM names, quant convs inside the coders
  (``encoder.quant_conv``, ``decoder.post_quant_conv``) as BFL's FLUX.2 ``ae.safetensors`` has them;
  BFL's FLUX.1 file is the same without quant convs;
- Stability's (SGM / SD3 ``first_stage_model.*``): the same names, quant convs at the top level;
- diffusers' ``AutoencoderKL`` / ``AutoencoderKLFlux2``: ``down_blocks.N.resnets.M``, up blocks
  numbered from the lowest resolution, attention as Linears (``to_q``) where LDM has 1x1 convs.

FLUX.2's ``bn.*`` statistics have the same name everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from diffcore.errors import CheckpointError
from diffcore.nn.keys import meta_state, rename_keys, strip_prefix
from diffcore.nn.params import AutoEncoderParams

__all__ = ["vae_diffusers_config", "vae_diffusers_to_ldm", "vae_ldm_to_diffusers", "vae_ldm_to_stability",
           "vae_params_from_diffusers", "vae_params_from_shapes", "vae_to_ldm"]

PREFIXES = ("first_stage_model.", "vae.")  # all-in-one files (Stability, some FLUX exports)
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}


def _up_levels(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def vae_ldm_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` (1x1-conv attention ->
    Linear weights); consumes ``sd``."""
    n = _up_levels(sd, r"decoder\.up\.(\d+)\.")
    out = rename_keys(sd, [
        (r"^encoder\.quant_conv\.", "quant_conv."),
        (r"^decoder\.post_quant_conv\.", "post_quant_conv."),
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}."),
        (r"^(decoder\.up_blocks\.\d+\.)block\.", r"\1resnets."),
        (r"^(decoder\.up_blocks\.\d+\.)upsample\.", r"\1upsamplers.0."),
        (r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}."),
        (r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.", lambda m: f".mid_block.attentions.0.{_ATTN[m.group(1)]}."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
    ])
    for key, t in out.items():
        if ".attentions.0.to_" in key and key.endswith(".weight") and t.ndim == 4:
            out[key] = t[:, :, 0, 0]
    return out


def vae_diffusers_to_ldm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` keys -> ours (Linear attention
    weights -> 1x1 convs); consumes ``sd``."""
    n = _up_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = rename_keys(sd, [
        (r"^quant_conv\.", "encoder.quant_conv."),
        (r"^post_quant_conv\.", "decoder.post_quant_conv."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n - 1 - int(m.group(1))}."),
        (r"^(decoder\.up\.\d+\.)resnets\.", r"\1block."),
        (r"^(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}."),
        (r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
         lambda m: f".mid.attn_1.{_ATTN_BACK[m.group(1)]}."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ])
    for key, t in out.items():
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and t.ndim == 2:
            out[key] = t[:, :, None, None]
    return out


def vae_ldm_to_stability(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> Stability's (quant convs at the top level), for writing SGM / SD3-style files."""
    return rename_keys(sd, [(r"^encoder\.quant_conv\.", "quant_conv."),
                            (r"^decoder\.post_quant_conv\.", "post_quant_conv.")])


def vae_to_ldm(sd: dict[str, Tensor], what: str = "an LDM autoencoder") -> dict[str, Tensor]:
    """Any layout -> ours: diffusers, ours, Stability's, or either under a ``first_stage_model.`` /
    ``vae.`` prefix (an all-in-one file: only those keys are kept). The ``rename`` to give
    ``load_model``; ``what`` names the expected file in the error when it is none of these."""
    sd = strip_prefix(sd, PREFIXES)
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        return vae_diffusers_to_ldm(sd)
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):
        return rename_keys(sd, [(r"^quant_conv\.", "encoder.quant_conv."),
                                (r"^post_quant_conv\.", "decoder.post_quant_conv.")])
    raise CheckpointError(f"not {what} checkpoint: no encoder.down.* (LDM / BFL) or encoder.down_blocks.* "
                          f"(diffusers) keys; first keys: {', '.join(sorted(sd)[:5])}")


def vae_params_from_shapes(shapes: Mapping[str, tuple[int, ...]], **unstored: Any) -> AutoEncoderParams:
    """``AutoEncoderParams`` read off an autoencoder's tensor shapes (any layout). ``unstored``
    gives what no file holds: ``scale_factor`` and ``shift_factor`` (and a BatchNorm's ``bn_eps``)."""
    sd = vae_to_ldm(meta_state(shapes))
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.")})
        widths = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
        blocks = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        io = sd["encoder.conv_in.weight"].shape[1], sd["decoder.conv_out.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a complete autoencoder: {exc.args[0]} is missing") from None
    if any(w % ch for w in widths):
        raise CheckpointError(f"autoencoder level widths {widths} are not multiples of conv_in's {ch}")
    found: dict[str, Any] = dict(in_channels=io[0], out_ch=io[1], ch=ch, ch_mult=tuple(w // ch for w in widths),
                                 num_res_blocks=blocks, z_channels=z_channels,
                                 quant_conv="encoder.quant_conv.weight" in sd)
    if "bn.running_mean" in sd:
        patch = round((sd["bn.running_mean"].shape[0] / z_channels) ** 0.5)
        found.update(batch_norm=True, patch=patch)
    return AutoEncoderParams(**{**found, **unstored})


def vae_params_from_diffusers(config: Mapping[str, Any]) -> AutoEncoderParams:
    """``AutoEncoderParams`` from a diffusers ``AutoencoderKL`` or ``AutoencoderKLFlux2``
    ``config.json`` (whose defaults fill what it leaves out)."""
    flux2 = config.get("_class_name") == "AutoencoderKLFlux2"
    widths = list(config.get("block_out_channels", (128, 256, 512, 512) if flux2 else (64,)))
    if any(w % widths[0] for w in widths):
        raise CheckpointError(f"autoencoder block_out_channels {widths} are not multiples of the first")
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        raise CheckpointError("an autoencoder with only one of the two quant convs has no LDM form")
    params = dict(in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3), ch=widths[0],
                  ch_mult=tuple(w // widths[0] for w in widths),
                  num_res_blocks=config.get("layers_per_block", 2 if flux2 else 1),
                  z_channels=config.get("latent_channels", 32 if flux2 else 4),
                  quant_conv=config.get("use_quant_conv", True))
    if flux2:
        patch = tuple(config.get("patch_size", (2, 2)))
        if patch[0] != patch[1]:
            raise CheckpointError(f"autoencoder patch_size {patch} is not square")
        params.update(batch_norm=True, patch=patch[0], bn_eps=config.get("batch_norm_eps", 1e-4),
                      bn_momentum=config.get("batch_norm_momentum", 0.1))
    else:
        params.update(scale_factor=config.get("scaling_factor", 0.18215),
                      shift_factor=config.get("shift_factor") or 0.0)
    return AutoEncoderParams(**params)


def vae_diffusers_config(params: AutoEncoderParams) -> dict[str, Any]:
    """The ``config.json`` of the diffusers autoencoder with these parameters: ``AutoencoderKL``,
    or ``AutoencoderKLFlux2`` for a BatchNorm one."""
    levels = len(params.ch_mult)
    config: dict[str, Any] = {
        "_class_name": "AutoencoderKLFlux2" if params.batch_norm else "AutoencoderKL",
        "in_channels": params.in_channels, "out_channels": params.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "act_fn": "silu", "latent_channels": params.z_channels, "norm_num_groups": 32,
        "use_quant_conv": params.quant_conv, "use_post_quant_conv": params.quant_conv,
        "mid_block_add_attention": True}
    if params.batch_norm:
        config.update(batch_norm_eps=params.bn_eps, batch_norm_momentum=params.bn_momentum,
                      patch_size=[params.patch, params.patch])
    else:
        config.update(scaling_factor=params.scale_factor, shift_factor=params.shift_factor, force_upcast=True)
    return config
