"""Learned guidance models: small networks that predict a correction to the sampling
model's raw prediction at each step.

Every model is ``forward(img, pred, txt, vec, timestep, step_idx) -> correction`` shaped like
``pred``:

- ``img``, ``pred``: the current sample and the raw prediction, either image-shaped
  ``(B, C, H, W)`` (every diffcore family's latent layout) or packed tokens ``(B, L, C)``;
- ``txt``: text token embeddings ``(B, L_txt, txt_dim)`` or None;
- ``vec``: a pooled conditioning vector ``(B, vec_dim)``, integer class labels ``(B,)``, or None.
  Class-conditional families (DiT) have no text: their labels go in ``vec`` and a model built
  with ``num_classes`` embeds them in a table of its own (``num_classes + 1`` rows, the last one
  the null class, DiT's convention); the attention model then attends to that embedding as a
  one-token context;
- ``timestep``: sigma per sample ``(B,)``; ``step_idx``: the schedule step, an int or ``(B,)``.

Output layers start at zero, so an untrained model returns an exact zero correction and leaves
sampling bit-identical. Models save and load as safetensors with their constructor config in
the file's metadata (``save_guidance_model`` / ``load_guidance_model``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffcore.api import CheckpointError, ConfigError

METADATA_KEY = "diffcore_guidance"


def timestep_features(timestep: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of ``scale * sigma`` (DDPM's embedding; flow sigmas in [0, 1] read as 0..1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float().reshape(-1, 1) * scale * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Conditioning(nn.Module):
    """Time, pooled vector / class label and text, embedded to ``hidden``: a global vector
    ``(B, hidden)`` and context tokens ``(B, L, hidden)`` for cross-attention."""

    def __init__(self, hidden: int, txt_dim: int = 0, vec_dim: int = 0, num_classes: int = 0,
                 use_timestep_embedding: bool = True, timestep_embed_dim: int = 128):
        super().__init__()
        self.hidden, self.timestep_embed_dim = hidden, timestep_embed_dim
        self.time = nn.Sequential(nn.Linear(timestep_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) \
            if use_timestep_embedding else None
        self.vec = nn.Linear(vec_dim, hidden) if vec_dim else None
        self.label = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.txt = nn.Linear(txt_dim, hidden) if txt_dim else None

    def forward(self, timestep: torch.Tensor, txt: torch.Tensor | None, vec: torch.Tensor | None,
                batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = timestep.device
        pooled = torch.zeros(batch, self.hidden, device=device, dtype=dtype)
        if self.time is not None:
            pooled = pooled + self.time(timestep_features(timestep.reshape(-1).expand(batch),
                                                          self.timestep_embed_dim).to(dtype))
        vec_token = None
        if vec is not None:
            if not torch.is_floating_point(vec):
                if self.label is None:
                    raise ConfigError("this guidance model got class labels but was built without num_classes")
                vec_token = self.label(vec.reshape(-1).long())
            elif self.vec is not None:
                vec_token = self.vec(vec.to(dtype))
            if vec_token is not None:
                pooled = pooled + vec_token
        tokens = None
        if txt is not None and self.txt is not None:
            tokens = self.txt(txt.to(dtype))
            pooled = pooled + tokens.mean(1)
        if tokens is None:   # no text: attend to the label / vector embedding, or the time one
            tokens = (vec_token if vec_token is not None else pooled)[:, None]
        return pooled, tokens


def to_tokens(x: torch.Tensor, patch: int) -> tuple[torch.Tensor, Any]:
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, C p p)`` tokens; ``(B, L, C)`` passes through."""
    if x.ndim == 3:
        return x, None
    if x.ndim != 4:
        raise ValueError(f"guidance models take (B, C, H, W) or (B, L, C) tensors, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not divisible by the guidance model's patch {patch}")
    return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=patch, q=patch), (h // patch, w // patch)


def from_tokens(t: torch.Tensor, grid: Any, patch: int) -> torch.Tensor:
    if grid is None:
        return t
    return rearrange(t, "b (h w) (c p q) -> b c (h p) (w q)", h=grid[0], w=grid[1], p=patch, q=patch)


class BaseGuidanceModel(nn.Module):
    """Base class: ``forward(img, pred, txt, vec, timestep, step_idx) -> correction`` of ``pred``'s
    shape, and ``config()`` returning the constructor arguments (saved with the weights)."""

    kind = ""

    def __init__(self, **config: Any):
        super().__init__()
        self._config = config

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, **self._config}

    def forward(self, img: torch.Tensor, pred: torch.Tensor, txt: torch.Tensor | None, vec: torch.Tensor | None,
                timestep: torch.Tensor, step_idx: int | torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class MLPGuidanceModel(BaseGuidanceModel):
    """A per-token MLP on ``[img, pred]`` (``patch x patch`` pixels a token for image latents),
    with time and conditioning added to the first hidden layer. Fast; no spatial context."""

    kind = "mlp"

    def __init__(self, latent_channels: int, txt_dim: int = 0, vec_dim: int = 0, num_classes: int = 0,
                 hidden_dim: int = 256, num_layers: int = 3, use_timestep_embedding: bool = True,
                 timestep_embed_dim: int = 128, patch: int = 1):
        super().__init__(latent_channels=latent_channels, txt_dim=txt_dim, vec_dim=vec_dim, num_classes=num_classes,
                         hidden_dim=hidden_dim, num_layers=num_layers, use_timestep_embedding=use_timestep_embedding,
                         timestep_embed_dim=timestep_embed_dim, patch=patch)
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        width = latent_channels * patch * patch
        self.patch = patch
        self.cond = Conditioning(hidden_dim, txt_dim, vec_dim, num_classes, use_timestep_embedding, timestep_embed_dim)
        self.inp = nn.Linear(2 * width, hidden_dim)
        self.hidden = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 1))
        self.out = zero_(nn.Linear(hidden_dim, width))

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        x, grid = to_tokens(torch.cat([img, pred], dim=1 if img.ndim == 4 else -1), self.patch)
        pooled, _ = self.cond(timestep, txt, vec, x.shape[0], self.inp.weight.dtype)
        h = self.inp(x.to(self.inp.weight.dtype)) + pooled[:, None]
        for layer in self.hidden:
            h = layer(F.silu(h))
        out = self.out(F.silu(h))
        return from_tokens(out, grid, self.patch).to(pred.dtype)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from latent tokens to context tokens, then an MLP."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_dim {hidden} is not divisible by num_heads {heads}")
        self.heads = heads
        self.norm1, self.norm_ctx, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.q, self.kv, self.proj = nn.Linear(hidden, hidden), nn.Linear(hidden, 2 * hidden), nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(approximate="tanh"), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(self.norm1(x)), "b l (h d) -> b h l d", h=self.heads)
        k, v = rearrange(self.kv(self.norm_ctx(context)), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        x = x + self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
        return x + self.mlp(self.norm2(x))


class AttentionGuidanceModel(BaseGuidanceModel):
    """Latent tokens cross-attend to the conditioning: the text tokens for text-to-image
    families, the class-label (or pooled vector) embedding as a one-token context otherwise."""

    kind = "attention"

    def __init__(self, latent_channels: int, txt_dim: int = 0, vec_dim: int = 0, num_classes: int = 0,
                 hidden_dim: int = 256, num_heads: int = 4, num_layers: int = 2, use_timestep_embedding: bool = True,
                 timestep_embed_dim: int = 128, patch: int = 1):
        super().__init__(latent_channels=latent_channels, txt_dim=txt_dim, vec_dim=vec_dim, num_classes=num_classes,
                         hidden_dim=hidden_dim, num_heads=num_heads, num_layers=num_layers,
                         use_timestep_embedding=use_timestep_embedding, timestep_embed_dim=timestep_embed_dim,
                         patch=patch)
        width = latent_channels * patch * patch
        self.patch = patch
        self.cond = Conditioning(hidden_dim, txt_dim, vec_dim, num_classes, use_timestep_embedding, timestep_embed_dim)
        self.inp = nn.Linear(2 * width, hidden_dim)
        self.blocks = nn.ModuleList(CrossAttentionBlock(hidden_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.out = zero_(nn.Linear(hidden_dim, width))

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        x, grid = to_tokens(torch.cat([img, pred], dim=1 if img.ndim == 4 else -1), self.patch)
        dtype = self.inp.weight.dtype
        pooled, context = self.cond(timestep, txt, vec, x.shape[0], dtype)
        h = self.inp(x.to(dtype)) + pooled[:, None]
        for block in self.blocks:
            h = block(h, context)
        return from_tokens(self.out(self.norm(h)), grid, self.patch).to(pred.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the conditioning as a per-channel scale and shift between."""

    def __init__(self, channels: int, cond_dim: int):
        super().__init__()
        groups = math.gcd(8, channels)
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = rearrange(self.film(cond), "b (two c) -> two b c 1 1", two=2)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return x + h


class ConvGuidanceModel(BaseGuidanceModel):
    """A small residual CNN over the spatial grid. Image latents ``(B, in_channels, H, W)`` go in
    as they are; packed tokens ``(B, h*w, in_channels*patch*patch)`` are unpacked to
    ``(B, in_channels, h*patch, w*patch)`` first (``grid = (h, w)``, or a square grid inferred
    from the token count) and packed back after."""

    kind = "conv"

    def __init__(self, in_channels: int, txt_dim: int = 0, vec_dim: int = 0, num_classes: int = 0,
                 hidden_channels: int = 64, num_blocks: int = 3, use_timestep_embedding: bool = True,
                 timestep_embed_dim: int = 128, patch: int = 2, grid: tuple[int, int] | list[int] | None = None):
        super().__init__(in_channels=in_channels, txt_dim=txt_dim, vec_dim=vec_dim, num_classes=num_classes,
                         hidden_channels=hidden_channels, num_blocks=num_blocks,
                         use_timestep_embedding=use_timestep_embedding, timestep_embed_dim=timestep_embed_dim,
                         patch=patch, grid=list(grid) if grid is not None else None)
        self.in_channels, self.patch, self.grid = in_channels, patch, tuple(grid) if grid is not None else None
        self.cond = Conditioning(hidden_channels, txt_dim, vec_dim, num_classes, use_timestep_embedding,
                                 timestep_embed_dim)
        self.conv_in = nn.Conv2d(2 * in_channels, hidden_channels, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(hidden_channels, hidden_channels) for _ in range(num_blocks))
        self.norm_out = nn.GroupNorm(math.gcd(8, hidden_channels), hidden_channels)
        self.conv_out = zero_(nn.Conv2d(hidden_channels, in_channels, 3, padding=1))

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``(B, L, C p p)`` tokens -> ``(B, C, h p, w p)``; image latents pass through."""
        if x.ndim == 4:
            if x.shape[1] != self.in_channels:
                raise ValueError(f"this guidance model takes {self.in_channels} channels, got {x.shape[1]}")
            return x
        if x.shape[-1] != self.in_channels * self.patch ** 2:
            raise ValueError(f"packed tokens of width {x.shape[-1]}, expected in_channels * patch^2 = "
                             f"{self.in_channels * self.patch ** 2}")
        h, w = self.grid if self.grid is not None else (math.isqrt(x.shape[1]),) * 2
        if h * w != x.shape[1]:
            raise ValueError(f"{x.shape[1]} tokens are not a square grid: build the model with grid=(h, w)")
        return rearrange(x, "b (h w) (c p q) -> b c (h p) (w q)", h=h, w=w, p=self.patch, q=self.patch)

    def pack(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.ndim == 4:
            return x
        return rearrange(x, "b c (h p) (w q) -> b (h w) (c p q)", p=self.patch, q=self.patch)

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        dtype = self.conv_in.weight.dtype
        x = torch.cat([self.unpack(img), self.unpack(pred)], dim=1).to(dtype)
        pooled, _ = self.cond(timestep, txt, vec, x.shape[0], dtype)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, pooled)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return self.pack(out, pred).to(pred.dtype)


class StepSpecificGuidanceWrapper(BaseGuidanceModel):
    """Different models for different steps: ``{(start, stop): model}`` applies ``model`` on steps
    ``start <= step < stop``; steps no range covers get a zero correction. Ranges may not overlap."""

    kind = "step-specific"

    def __init__(self, models: Mapping[tuple[int, int], BaseGuidanceModel]):
        super().__init__()
        items = sorted((((int(a), int(b)), model) for (a, b), model in models.items()), key=lambda item: item[0])
        for ((a, b), _), ((c, _), _) in zip(items, items[1:]):
            if c < b:
                raise ValueError(f"step ranges [{a}, {b}) and [{c}, ...) overlap")
        for (a, b), _ in items:
            if not 0 <= a < b:
                raise ValueError(f"step range [{a}, {b}) is empty or negative")
        self.ranges = [r for r, _ in items]
        self.models = nn.ModuleList(model for _, model in items)

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "ranges": [list(r) for r in self.ranges], "models": [m.config() for m in self.models]}

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        out = torch.zeros_like(pred)
        for (a, b), model in zip(self.ranges, self.models):
            if isinstance(step_idx, torch.Tensor) and step_idx.ndim:
                mask = (step_idx >= a) & (step_idx < b)
                if bool(mask.any()):
                    corr = model(img, pred, txt, vec, timestep, step_idx)
                    out = torch.where(mask.reshape(-1, *[1] * (pred.ndim - 1)).to(pred.device), corr, out)
            elif a <= int(step_idx) < b:
                return model(img, pred, txt, vec, timestep, step_idx)
        return out


class MultiObjectiveGuidance(BaseGuidanceModel):
    """A weighted sum of guidance models, one per objective: ``sum_i w_i * model_i(...)``."""

    kind = "multi-objective"

    def __init__(self, objective_models: Mapping[str, BaseGuidanceModel],
                 objective_weights: Mapping[str, float] | None = None):
        super().__init__()
        weights = dict(objective_weights or {})
        unknown = set(weights) - set(objective_models)
        if unknown:
            raise ValueError(f"weights for objectives without a model: {', '.join(sorted(unknown))}")
        self.objectives = nn.ModuleDict(dict(objective_models))
        self.weights = {name: float(weights.get(name, 1.0)) for name in objective_models}

    def config(self) -> dict[str, Any]:
        return {"type": self.kind, "weights": dict(self.weights),
                "models": {name: m.config() for name, m in self.objectives.items()}}

    def forward(self, img, pred, txt, vec, timestep, step_idx):
        out = torch.zeros_like(pred)
        for name, model in self.objectives.items():
            out = out + self.weights[name] * model(img, pred, txt, vec, timestep, step_idx)
        return out


LEAVES: dict[str, type[BaseGuidanceModel]] = {
    cls.kind: cls for cls in (MLPGuidanceModel, AttentionGuidanceModel, ConvGuidanceModel)}


def create_mlp_guidance_model(latent_channels: int, **kwargs: Any) -> MLPGuidanceModel:
    return MLPGuidanceModel(latent_channels, **kwargs)


def create_attention_guidance_model(latent_channels: int, **kwargs: Any) -> AttentionGuidanceModel:
    return AttentionGuidanceModel(latent_channels, **kwargs)


def create_conv_guidance_model(in_channels: int, **kwargs: Any) -> ConvGuidanceModel:
    return ConvGuidanceModel(in_channels, **kwargs)


def build_guidance_model(config: Mapping[str, Any]) -> BaseGuidanceModel:
    """A model from ``model.config()`` (freshly initialised; load weights separately)."""
    config = dict(config)
    kind = config.pop("type", None)
    if kind in LEAVES:
        return LEAVES[kind](**config)
    if kind == StepSpecificGuidanceWrapper.kind:
        return StepSpecificGuidanceWrapper({tuple(r): build_guidance_model(c)
                                            for r, c in zip(config["ranges"], config["models"])})
    if kind == MultiObjectiveGuidance.kind:
        return MultiObjectiveGuidance({n: build_guidance_model(c) for n, c in config["models"].items()},
                                      config["weights"])
    known = ", ".join([*LEAVES, StepSpecificGuidanceWrapper.kind, MultiObjectiveGuidance.kind])
    raise ConfigError(f"unknown guidance model type {kind!r}; known: {known}")


def save_guidance_model(model: BaseGuidanceModel, path: str | os.PathLike[str]) -> Path:
    """Weights as safetensors, the config as JSON in the file's metadata; written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(model.config()), "format": "pt"})
    os.replace(tmp, path)
    return path


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: no guidance model config in its metadata (was it written by "
                              f"save_guidance_model?)")
    return json.loads(metadata[METADATA_KEY])


def load_guidance_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> BaseGuidanceModel:
    """The model saved at ``path``, in eval mode."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such guidance model file")
    model = build_guidance_model(read_config(path))
    state = load_file(str(path), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the saved config (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]})")
    return model.to(device).eval()
