"""SDXL ControlNets (Zhang et al. 2023, arXiv:2302.05543): a trainable copy of the UNet's down path
and middle block that reads the control image through a small conv encoder, and hands each skip
connection and the middle block's output a residual through a zero-initialised 1x1 conv.

The layout is SGM's ``cldm`` ControlNet (the UNet's own ``time_embed``, ``label_emb``,
``input_blocks``, ``middle_block``, plus ``input_hint_block``, ``zero_convs.i.0`` and
``middle_block_out.0``); diffusers' ``ControlNetModel`` files (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``) are renamed on load. Files: a diffusers folder
(``config.json`` + weights) or one ``.safetensors`` in either layout; sizes from the config or the
tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from diffcore.api import (
    CheckpointError,
    ConfigError,
    check_safetensors,
    controlnet_source,
    hint_encoder,
    hint_from_diffusers,
    hint_widths,
    load_model,
    tensor_shapes,
    trained_part,
    zero_,
)
from diffcore_sdxl.convert import diffusers_to_stability, infer_params
from diffcore_sdxl.layers import timestep_sinusoid
from diffcore_sdxl.load import weights_in
from diffcore_sdxl.model import UNet, UNetParams

__all__ = ["ControlNetParams", "SDXLControl", "SDXLControlNet", "controlnet_params", "load_controlnet", "to_ours"]

HINT_WIDTHS = (16, 32, 96, 256)   # diffusers' and SGM's: 8x down, to the latent's size


@attrs.frozen
class ControlNetParams:
    """The UNet whose down path is copied (``unet``; its up path is not built) and the hint
    encoder's widths and input channels (3: an RGB control image)."""

    unet: UNetParams
    hint_widths: tuple[int, ...] = attrs.field(default=HINT_WIDTHS, converter=tuple)
    hint_channels: int = 3


class SDXLControlNet(nn.Module):
    """``forward(...)`` -> (down residuals, one per UNet input block; mid residual), times ``scale``."""

    def __init__(self, params: ControlNetParams):
        super().__init__()
        self.params = params
        here = torch.empty(0).device   # the device modules are being built on (meta inside load_model)
        with torch.device("meta"):     # the down path is the UNet's (so its keys are too); its up path is never made
            unet = UNet(params.unet)
        self.time_embed, self.label_emb = unet.time_embed, unet.label_emb
        self.input_blocks, self.middle_block = unet.input_blocks, unet.middle_block
        if here.type != "meta":
            for part in (self.time_embed, self.label_emb, self.input_blocks, self.middle_block):
                part.to_empty(device=here)
                for module in part.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        self.input_hint_block = hint_encoder(params.hint_widths, params.unet.model_channels, params.hint_channels)
        zero_(self.input_hint_block[-1])
        widths = skip_widths(params.unet)
        self.zero_convs = nn.ModuleList(nn.Sequential(zero_(nn.Conv2d(w, w, 1))) for w in widths)
        self.middle_block_out = nn.Sequential(zero_(nn.Conv2d(widths[-1], widths[-1], 1)))

    @classmethod
    def from_unet(cls, unet: UNet, hint_widths: tuple[int, ...] = HINT_WIDTHS) -> SDXLControlNet:
        """A ControlNet to train for ``unet``: its embeddings, down path and middle block copied, the
        zero convs zero and the hint encoder freshly initialised (diffusers' ``ControlNetModel.from_unet``)."""
        net = cls(ControlNetParams(unet.params, hint_widths=hint_widths))
        for name in ("time_embed", "label_emb", "input_blocks", "middle_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor, cond: Tensor,
                scale: float = 1.0) -> tuple[list[Tensor], Tensor]:
        """``x`` the UNet's input latents, ``cond`` the control image (B or 1, 3, 8 h, 8 w) in [0, 1]
        (diffusers' ControlNet image processor does not normalise), the rest as ``UNet.forward``."""
        p = self.params.unet
        t = timesteps.expand(x.shape[0]) if timesteps.ndim == 0 else timesteps
        emb = self.time_embed(timestep_sinusoid(t, p.model_channels).to(x.dtype)) + self.label_emb(y.to(x.dtype))
        hint = self.input_hint_block(cond)
        h, outs = x, []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0:
                h = h + hint
            outs.append(h)
        h = self.middle_block(h, emb, context)
        return [zc(o) * scale for zc, o in zip(self.zero_convs, outs)], self.middle_block_out(h) * scale


def skip_widths(p: UNetParams) -> list[int]:
    """The channels of each UNet input block's output (its skip connections), in order."""
    out = [p.model_channels]
    for level, width in enumerate(p.widths):
        out += [width] * p.num_res_blocks + ([width] if level != len(p.widths) - 1 else [])
    return out


# -- files ----------------------------------------------------------------------------------------

def to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' ``ControlNetModel`` keys -> SGM's (ours); SGM keys pass, unknown keys too."""
    sd = trained_part(sd)
    if "conv_in.weight" not in sd and not any(k.startswith("down_blocks.") for k in sd):
        return sd
    sd = diffusers_to_stability(sd)
    sd = hint_from_diffusers({k.replace("controlnet_cond_embedding.", "input_hint_block.", 1): v
                              for k, v in sd.items()}, "input_hint_block")
    out = {}
    for key, value in sd.items():
        if key.startswith("controlnet_down_blocks."):
            i, leaf = key.split(".")[1:]
            key = f"zero_convs.{i}.0.{leaf}"
        elif key.startswith("controlnet_mid_block."):
            key = "middle_block_out.0." + key.split(".")[-1]
        out[key] = value
    return out


def _weights(path: Path) -> tuple[Path, dict | None]:
    path, config = controlnet_source(path, "ControlNetModel", "an SDXL ControlNetModel")
    if config is not None and config.get("global_pool_conditions"):
        raise CheckpointError(f"{path}: a ControlNet with global_pool_conditions (shuffle-style) is not supported")
    return (weights_in(path) if path.is_dir() else path), config


class _Shape:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)


def controlnet_params(path: str | Path, base: UNetParams) -> ControlNetParams:
    """The ControlNet's sizes from its tensor shapes (head width and sinusoid width, never stored,
    from the UNet ``base``); it must fit ``base``: the same level widths and latent channels."""
    weights, _ = _weights(Path(path))
    if weights.suffix == ".safetensors":
        check_safetensors(weights)
    shapes = trained_part(tensor_shapes(weights))
    keys = set(shapes)
    if any(k.startswith(("controlnet_blocks.", "controlnet_single_blocks.")) for k in keys):
        raise CheckpointError(f"{weights}: not an SDXL ControlNet: the keys are those of a FLUX.1 ControlNet "
                              f"(controlnet_blocks.*): use it with the flux1 family")
    if not any(k.startswith(("controlnet_down_blocks.", "zero_convs.")) for k in keys):
        raise CheckpointError(f"{weights}: not an SDXL ControlNet (no controlnet_down_blocks.* / zero_convs.* keys)")
    renamed = to_ours({k: _Shape(s) for k, s in shapes.items()})
    unet_shapes = {k: v.shape for k, v in renamed.items()
                   if not k.startswith(("input_hint_block.", "zero_convs.", "middle_block_out."))}
    unet_shapes["out.2.weight"] = (base.out_channels, 1)   # no up path in a ControlNet: the UNet's
    if "label_emb.0.0.weight" not in unet_shapes:
        raise CheckpointError(f"{weights}: a ControlNet without SDXL's label embedding (an SD 1.x / 2.x one?): "
                              f"not supported")
    try:
        found = infer_params(unet_shapes, head_dim=base.head_dim, time_embed_scalar_dim=base.time_embed_scalar_dim)
        widths, _, hint_in = hint_widths({k: v.shape for k, v in renamed.items()}, "input_hint_block")
    except (CheckpointError, KeyError) as exc:
        raise CheckpointError(f"{weights}: not a complete SDXL ControlNet: {exc}") from None
    unet = found
    wanted = {"in_channels": base.out_channels, **{k: getattr(base, k) for k in (
        "model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")}}
    differs = {k: (getattr(unet, k), v) for k, v in wanted.items() if getattr(unet, k) != v}
    if differs:
        found_text = ", ".join(f"{k} {a} (the UNet: {b})" for k, (a, b) in differs.items())
        raise CheckpointError(f"{weights}: this ControlNet does not fit the SDXL UNet: {found_text}")
    return ControlNetParams(unet, hint_widths=widths, hint_channels=hint_in)


def load_controlnet(path: str | Path, base: UNetParams, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> SDXLControlNet:
    """The SDXL ControlNet at ``path`` (diffusers folder or file, diffusers' or SGM's keys), checked
    against the UNet's ``base`` params."""
    params = controlnet_params(path, base)
    weights, _ = _weights(Path(path))
    return load_model(lambda: SDXLControlNet(params), weights, rename=to_ours, dtype=dtype, device=device).eval()


# -- sampling -------------------------------------------------------------------------------------

@attrs.define(eq=False)
class SDXLControl:
    """One ``[[control]]`` entry, ready to run: the network, its image (1, 3, H, W) in [0, 1], the
    request's ``Control`` (scale, start, end) and the schedule's times (set by ``schedule_controls``)."""

    net: SDXLControlNet
    cond: Tensor
    control: Any
    times: Tensor | None = None

    def scale_at(self, t: Tensor) -> float:
        if self.times is None:
            return self.control.scale
        step = int((self.times.to(t.device) - t.reshape(-1)[0]).abs().argmin())
        return self.control.scale_at(step, len(self.times))

    def __call__(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor] | None:
        scale = self.scale_at(t)
        if scale == 0:
            return None
        dtype = next(self.net.parameters()).dtype
        # one image per row, as diffusers runs it: a batch-1 hint encoder rounds its convs otherwise
        cond = self.cond.to(x.device, dtype).expand(x.shape[0], -1, -1, -1)
        return self.net(x.to(dtype), t, context.to(dtype), y.to(dtype), cond, scale=scale)


def residuals(controls: Any, x: Tensor, t: Tensor, context: Tensor, y: Tensor) -> dict[str, Any]:
    """The UNet's ``down_residuals`` / ``mid_residual`` kwargs: every active control's, summed
    (diffusers' MultiControlNetModel); ``{}`` when none runs this step."""
    down, mid = None, None
    for control in controls or ():
        out = control(x, t, context, y)
        if out is None:
            continue
        d, m = out
        down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
    return {} if down is None else {"down_residuals": down, "mid_residual": mid}


def control_conditions(bundle: Any, request: Any, size: tuple[int, int]) -> dict[str, list[SDXLControl]]:
    """``{"control": [SDXLControl, ...]}`` for the request's ``controls`` (none: ``{}``); each
    ControlNet loads once per bundle and path, its image is resized to the output ``size``."""
    import torch.nn.functional as F

    controls = list(getattr(request, "controls", None) or ())
    if not controls:
        return {}
    if bundle.refiner is not None:
        raise ConfigError("[[control]] with a refiner: the ControlNet steers the base UNet only; drop the refiner",
                          path="control")
    cache: dict[str, SDXLControlNet] = bundle.controlnets
    dtype, device = next(bundle.network.parameters()).dtype, next(bundle.network.parameters()).device
    out = []
    for i, control in enumerate(controls):
        where = f"control[{i}]"
        image = control.image
        control.check_image(*size, where)
        if control.mode is not None:
            raise ConfigError("SDXL ControlNets take no mode (Union ControlNets are FLUX.1's here)",
                              path=f"{where}.mode")
        if control.path not in cache:
            try:
                cache[control.path] = load_controlnet(control.path, bundle.network.params, dtype=dtype, device=device)
            except CheckpointError as exc:
                raise ConfigError(str(exc), path=f"{where}.path") from None
        pixels = image[None].float()
        if tuple(pixels.shape[-2:]) != tuple(size):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
        # [0, 1] as diffusers' processor makes it from the 8-bit file: byte / 255, exactly
        unit = ((pixels + 1) * 127.5).round().clamp(0, 255) / 255
        out.append(SDXLControl(cache[control.path], unit.to(device, dtype), control))
    return {"control": out}


def schedule_controls(conditions: Mapping[str, dict[str, Any]], times: Tensor) -> dict[str, dict[str, Any]]:
    """Each ``SDXLControl`` told the schedule's times (for start / end)."""
    for cond in conditions.values():
        for control in cond.get("control", ()):
            control.times = times
    return dict(conditions)


# -- training -------------------------------------------------------------------------------------

def new_controlnet(bundle: Any, hint_widths: tuple[int, ...] | None = None) -> SDXLControlNet:
    """The ``controlnet`` trainer's start: ``SDXLControlNet.from_unet`` of the base UNet, its hint
    encoder halving as often as the VAE downsamples (SDXL's 8x: diffusers' four widths)."""
    import math

    halvings = int(math.log2(bundle.latent_scale))
    widths = tuple(hint_widths) if hint_widths else HINT_WIDTHS[:halvings + 1]
    if 2 ** (len(widths) - 1) != bundle.latent_scale:
        raise ConfigError(f"hint_widths {widths} halve {len(widths) - 1} times; the latents are 1/{bundle.latent_scale} "
                          f"of the image", path="trainer.options.hint_widths")
    first = next(bundle.network.parameters())
    return SDXLControlNet.from_unet(bundle.network, widths).to(first.device, first.dtype)


def training_controls(net: SDXLControlNet, image: Tensor, scale: float) -> dict[str, list[SDXLControl]]:
    """``forward``'s ``control`` for training: conditioning images (B, 3, H, W) in [-1, 1] as [0, 1]."""
    from diffcore.api import Control

    dtype = next(net.parameters()).dtype
    control = Control(path="(trained)", image=image[0], scale=scale)
    return {"control": [SDXLControl(net, ((image.float() + 1) / 2).to(dtype), control)]}
