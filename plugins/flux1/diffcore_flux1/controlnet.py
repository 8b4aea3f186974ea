"""FLUX.1 ControlNets: a few FLUX.1 blocks that read the control map and add, through zero-initialised
linear projections, a residual to the image tokens after each block of the main transformer.

The network is diffusers' ``FluxControlNetModel`` (InstantX's and Shakker-Labs' ControlNets, the
Union ones with a control-mode token) and XLabs' ``ControlNetFlux`` (a pixel-space
``input_hint_block``, its residuals cycled over the blocks), written with the family's blocks and
BFL's parameter names; its own parts keep diffusers' names (``controlnet_x_embedder``,
``controlnet_blocks``, ``controlnet_single_blocks``, ``controlnet_mode_embedder``).

Files: a diffusers folder (``config.json`` + weights) or one ``.safetensors`` file in diffusers'
or XLabs' keys; the sizes come from the config, else the tensor shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from einops import rearrange
from torch import Tensor, nn

from diffcore.api import (
    CheckpointError,
    ConfigError,
    DoubleStreamBlock,
    EmbedND,
    GeluMLP,
    Linear,
    MLPEmbedder,
    SingleStreamBlock,
    block_indices,
    check_safetensors,
    checkpoint_files,
    controlnet_source,
    hint_encoder,
    hint_from_diffusers,
    hint_widths,
    load_model,
    tensor_shapes,
    trained_part,
    timestep_embedding,
    zero_,
)
from diffcore_flux1.convert import diffusers_to_bfl
from diffcore_flux1.model import ControlResiduals, FluxParams, _batched

__all__ = ["ControlNetParams", "FluxControl", "FluxControlNet", "controlnet_params", "load_controlnet", "to_ours"]

XLABS_HINT = (16, 16, 16, 16)   # XLabs' and diffusers' hint widths for FLUX.1 (8x down, 16 channels)


@attrs.frozen
class ControlNetParams:
    """A FLUX.1 ControlNet: the blocks' sizes (``FluxParams``: ``depth`` double and
    ``depth_single_blocks`` single blocks), a control-mode embedding for Union ControlNets
    (``num_mode`` modes), and a pixel-space hint encoder (``hint``: its output channels; the
    output is 2x2-packed to ``in_channels``) for XLabs'."""

    blocks: FluxParams
    num_mode: int | None = None
    hint: int | None = None

    @property
    def repeat(self) -> bool:
        """XLabs' residuals cycle over the main blocks (diffusers' ``controlnet_blocks_repeat``,
        which its pipeline sets exactly when there is a hint encoder)."""
        return self.hint is not None


class FluxControlNet(nn.Module):
    """``forward(...)`` -> ``ControlResiduals``: one projected sample per block, times ``scale``."""

    def __init__(self, params: ControlNetParams):
        super().__init__()
        self.params = params
        p = params.blocks
        if p.hidden_size % p.num_heads or sum(p.axes_dim) != p.hidden_size // p.num_heads:
            raise ValueError(f"hidden_size {p.hidden_size} / num_heads {p.num_heads} must be a whole head dim "
                             f"that the rope axes {p.axes_dim} sum to")
        h, mlp_hidden = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
        self.pe_embedder = EmbedND(p.axes_dim, p.theta)
        self.img_in = Linear(p.in_channels, h)
        self.time_in = MLPEmbedder(256, h)
        self.vector_in = MLPEmbedder(p.vec_in_dim, h)
        self.guidance_in = MLPEmbedder(256, h) if p.guidance_embed else nn.Identity()
        self.txt_in = Linear(p.context_in_dim, h)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(h, p.num_heads, lambda: GeluMLP(h, mlp_hidden), qkv_bias=p.qkv_bias)
            for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(h, p.num_heads, mlp_hidden)
                                           for _ in range(p.depth_single_blocks))
        self.controlnet_blocks = nn.ModuleList(zero_(Linear(h, h)) for _ in range(p.depth))
        self.controlnet_single_blocks = nn.ModuleList(zero_(Linear(h, h)) for _ in range(p.depth_single_blocks))
        self.controlnet_x_embedder = Linear(p.in_channels, h)
        if params.hint is None:
            zero_(self.controlnet_x_embedder)
        self.input_hint_block = hint_encoder(XLABS_HINT, params.hint) if params.hint else nn.Identity()
        self.controlnet_mode_embedder = nn.Embedding(params.num_mode, h) if params.num_mode else None

    @classmethod
    def from_transformer(cls, flux: nn.Module, depth: int = 4, depth_single_blocks: int = 10) -> FluxControlNet:
        """A ControlNet to train for ``flux``: its embeddings and first ``depth`` double and
        ``depth_single_blocks`` single blocks copied, the projections zero (diffusers'
        ``FluxControlNetModel.from_transformer``, which its training script starts from)."""
        params = ControlNetParams(attrs.evolve(flux.params, depth=depth, depth_single_blocks=depth_single_blocks))
        net = cls(params)
        own = net.state_dict()
        net.load_state_dict({k: v for k, v in flux.state_dict().items() if k in own}, strict=False)
        return net

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                cond: Tensor, guidance: Tensor | None = None, mode: Tensor | None = None,
                scale: float = 1.0) -> ControlResiduals:
        """``img`` (B, L, in_channels) the noisy packed latents; ``cond`` the control map as packed
        latents (B or 1, L, in_channels) or, with a hint encoder, pixels (B or 1, 3, 16 h, 16 w) in
        [-1, 1]; ``mode`` (B,) the Union mode. The rest as ``Flux.forward``."""
        p = self.params
        if p.hint is not None:
            cond = rearrange(self.input_hint_block(cond), "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        img = self.img_in(img) + self.controlnet_x_embedder(cond)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if p.blocks.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 ControlNet embeds the guidance: pass guidance per sample")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        txt_ids, img_ids = _batched(txt_ids, txt), _batched(img_ids, img)
        if self.controlnet_mode_embedder is not None:
            if mode is None:
                raise ValueError("a Union ControlNet needs the control mode (an integer per sample)")
            txt = torch.cat((self.controlnet_mode_embedder(mode)[:, None].expand(txt.shape[0], -1, -1), txt), dim=1)
            txt_ids = torch.cat((txt_ids[:, :1], txt_ids), dim=1)
        if txt_ids.shape[0] != img_ids.shape[0]:
            txt_ids, img_ids = (ids.expand(img.shape[0], -1, -1) for ids in (txt_ids, img_ids))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        double = []
        for block, out in zip(self.double_blocks, self.controlnet_blocks):
            img, txt = block(img, txt, pe, vec)
            double.append(out(img) * scale)
        x, single = torch.cat((txt, img), dim=1), []
        for block, out in zip(self.single_blocks, self.controlnet_single_blocks):
            x = block(x, pe, vec)
            single.append(out(x[:, txt.shape[1]:]) * scale)
        return ControlResiduals(tuple(double), tuple(single), repeat=p.repeat)


# -- files ----------------------------------------------------------------------------------------

_XLABS = {"pos_embed_input.": "controlnet_x_embedder."}


def to_ours(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' (``x_embedder``, ``transformer_blocks``, ``input_hint_block.conv_in``) or XLabs'
    (BFL blocks, ``pos_embed_input``) ControlNet keys -> ours; unknown keys pass, to be reported."""
    sd = hint_from_diffusers(trained_part(sd), "input_hint_block")
    sd = {next((new + k[len(old):] for old, new in _XLABS.items() if k.startswith(old)), k): v for k, v in sd.items()}
    return diffusers_to_bfl(sd) if "x_embedder.weight" in sd else sd


def _file_kind(keys: set[str]) -> str | None:
    """What a file that is not a FLUX.1 ControlNet holds (None: it may be one)."""
    if any(k.startswith(("controlnet_down_blocks.", "zero_convs.", "controlnet_mid_block.")) for k in keys):
        return "an SDXL / Stable Diffusion ControlNet (controlnet_down_blocks / zero_convs)"
    if any(k.startswith(("controlnet_blocks.", "controlnet_single_blocks.")) for k in keys):
        return None
    if any(k.startswith(("double_blocks.", "transformer_blocks.", "model.diffusion_model.")) for k in keys):
        return "a FLUX.1 transformer, not a ControlNet (set it as the model's path)"
    return "no ControlNet (no controlnet_blocks.* keys)"


def _weights(path: Path) -> tuple[Path, dict | None]:
    path, config = controlnet_source(path, "FluxControlNetModel", "a FLUX.1 FluxControlNetModel")
    if path.is_dir() and not [f for f in checkpoint_files(path) if f.suffix == ".safetensors"]:
        raise CheckpointError(f"{path}: no .safetensors ControlNet weights in this folder")
    return path, config


def controlnet_params(path: str | Path, base: FluxParams) -> ControlNetParams:
    """The ControlNet's sizes from its config.json, else its tensor shapes; what is stored in
    neither (RoPE axes, theta) is the main transformer's ``base``. The ControlNet must fit ``base``:
    the same width, latent channels and text sizes."""
    weights, config = _weights(Path(path))
    for file in checkpoint_files(weights):
        if file.suffix == ".safetensors":
            check_safetensors(file)
    shapes = trained_part(tensor_shapes(weights))
    kind = _file_kind(set(shapes))
    if kind is not None:
        raise CheckpointError(f"{weights}: not a FLUX.1 ControlNet: the keys are those of {kind}")
    sd = to_ours({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    try:
        hidden, in_channels = sd["img_in.weight"].shape
        norm = "double_blocks.0.img_attn.norm.query_norm.scale"
        head_dim = sd[norm if norm in sd else "single_blocks.0.norm.query_norm.scale"].shape[0]
        mlp_hidden = (sd["double_blocks.0.img_mlp.0.weight"].shape[0] if "double_blocks.0.img_mlp.0.weight" in sd
                      else sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden)
        blocks = attrs.evolve(base, in_channels=in_channels, out_channels=in_channels,
                              vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
                              context_in_dim=sd["txt_in.weight"].shape[1], hidden_size=hidden,
                              mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim,
                              depth=len(block_indices(sd, "double_blocks")),
                              depth_single_blocks=len(block_indices(sd, "single_blocks")),
                              guidance_embed="guidance_in.in_layer.weight" in sd)
    except KeyError as exc:
        raise CheckpointError(f"{weights}: not a complete FLUX.1 ControlNet: {exc.args[0]} is missing") from None
    if config is not None and config.get("axes_dims_rope"):
        blocks = attrs.evolve(blocks, axes_dim=tuple(config["axes_dims_rope"]))
    mode = sd.get("controlnet_mode_embedder.weight")
    hint = hint_widths({k: tuple(v.shape) for k, v in sd.items()}, "input_hint_block")[1] \
        if "input_hint_block.0.weight" in sd else None
    params = ControlNetParams(blocks, num_mode=None if mode is None else mode.shape[0], hint=hint)
    _check_fits(params, base, weights)
    return params


def _check_fits(params: ControlNetParams, base: FluxParams, where: Path) -> None:
    p = params.blocks
    wanted = {"hidden_size": base.hidden_size, "in_channels": base.out_channels, "context_in_dim": base.context_in_dim,
              "vec_in_dim": base.vec_in_dim}
    differs = {k: (getattr(p, k), v) for k, v in wanted.items() if getattr(p, k) != v}
    if differs:
        found = ", ".join(f"{k} {a} (the transformer: {b})" for k, (a, b) in differs.items())
        raise CheckpointError(f"{where}: this ControlNet does not fit the FLUX.1 transformer: {found}")
    if sum(p.axes_dim) != p.hidden_size // p.num_heads:
        raise CheckpointError(f"{where}: the ControlNet's head dim {p.hidden_size // p.num_heads} differs from the "
                              f"transformer's RoPE axes {p.axes_dim}")


def load_controlnet(path: str | Path, base: FluxParams, *, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> FluxControlNet:
    """The FLUX.1 ControlNet at ``path`` (diffusers folder or file, diffusers' or XLabs' keys),
    checked against the main transformer's ``base`` params."""
    params = controlnet_params(path, base)
    weights, _ = _weights(Path(path))
    return load_model(lambda: FluxControlNet(params), weights, rename=to_ours, dtype=dtype, device=device).eval()


# -- sampling -------------------------------------------------------------------------------------

@attrs.define(eq=False)
class FluxControl:
    """One ``[[control]]`` entry of a request, ready to run: the network, its conditioning (packed
    latents or, for a hint encoder, pixels; batch 1, broadcast), the Union mode, and the request's
    ``Control`` (scale, start, end). ``times`` are the schedule's (set by ``schedule``)."""

    net: FluxControlNet
    cond: Tensor
    control: Any
    mode: int | None = None
    times: Tensor | None = None

    def scale_at(self, t: Tensor) -> float:
        """The conditioning scale at the step whose time ``t`` is (the nearest scheduled one)."""
        if self.times is None:
            return self.control.scale
        step = int((self.times.to(t.device) - t.reshape(-1)[0]).abs().argmin())
        return self.control.scale_at(step, len(self.times))

    def __call__(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                 guidance: Tensor | None) -> ControlResiduals | None:
        scale = self.scale_at(timesteps)
        if scale == 0:
            return None
        dtype = next(self.net.parameters()).dtype
        mode = None if self.mode is None else torch.full((img.shape[0],), self.mode, device=img.device)
        return self.net(img.to(dtype), img_ids, txt.to(dtype), txt_ids, timesteps.to(dtype), y.to(dtype),
                        self.cond.to(img.device, dtype), guidance.to(dtype) if self.net.params.blocks.guidance_embed
                        else None, mode=mode, scale=scale)


def control_conditions(bundle: Any, request: Any) -> dict[str, list[FluxControl]]:
    """``{"control": [FluxControl, ...]}`` for the request's ``controls`` (empty: ``{}``). Each
    ControlNet loads once per bundle and path; its image becomes packed latents (or pixels for
    XLabs' hint encoder) at the request's size."""
    from diffcore_flux1.images import fit
    from diffcore_flux1.vae import pack

    controls = list(getattr(request, "controls", None) or ())
    if not controls:
        return {}
    if request.reference_images or bundle.network.params.in_channels != bundle.network.params.out_channels:
        raise ConfigError("[[control]] ControlNets steer the text-to-image FLUX.1 transformers (dev, schnell); "
                          "this one takes reference images or image channels", path="control")
    cache: dict[str, FluxControlNet] = bundle.controlnets
    size, out = bundle._size(request), []
    for i, control in enumerate(controls):
        where = f"control[{i}]"
        image = control.image
        control.check_image(*size, where)
        if control.path not in cache:
            try:
                cache[control.path] = load_controlnet(control.path, bundle.network.params, dtype=bundle.dtype,
                                                      device=bundle.device)
            except CheckpointError as exc:
                raise ConfigError(str(exc), path=f"{where}.path") from None
        net = cache[control.path]
        if (net.params.num_mode is None) != (control.mode is None):
            need = f"a mode (0..{net.params.num_mode - 1})" if net.params.num_mode else "no mode (not a Union one)"
            raise ConfigError(f"the ControlNet {control.path} takes {need}", path=f"{where}.mode")
        pixels = fit(image, *size)[None].to(bundle.device)
        cond = pixels if net.params.hint else pack(bundle.vae_encode(pixels))
        out.append(FluxControl(net, cond.to(bundle.dtype), control, mode=control.mode))
    return {"control": out}


def schedule_controls(conditions: Mapping[str, dict[str, Any]], times: Tensor) -> dict[str, dict[str, Any]]:
    """The branches with each ``FluxControl`` told the schedule's times (for start / end)."""
    for cond in conditions.values():
        for control in cond.get("control", ()):
            control.times = times
    return dict(conditions)


# -- training -------------------------------------------------------------------------------------

def new_controlnet(bundle: Any, depth: int = 4, depth_single_blocks: int = 10) -> FluxControlNet:
    """The ``controlnet`` trainer's start: ``FluxControlNet.from_transformer`` (diffusers' training
    script defaults: 4 double, 10 single blocks), on the transformer's device and dtype."""
    first = next(bundle.network.parameters())
    return FluxControlNet.from_transformer(bundle.network, depth, depth_single_blocks).to(first.device, first.dtype)


def training_controls(bundle: Any, net: FluxControlNet, image: Tensor, scale: float) -> dict[str, list[FluxControl]]:
    """``forward``'s ``control`` for training: conditioning images (B, 3, H, W) in [-1, 1] as packed latents."""
    from diffcore.api import Control
    from diffcore_flux1.vae import pack

    with torch.no_grad():
        cond = pack(bundle.vae_encode(image))
    control = Control(path="(trained)", image=image[0], scale=scale)
    return {"control": [FluxControl(net, cond.to(next(net.parameters()).dtype), control)]}
