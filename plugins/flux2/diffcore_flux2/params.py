"""FLUX.2 variants as data (torch-free, so the plugin module validates configs without torch).

Shapes from BFL's ``Flux2Params`` and the released klein configs (see the facts in
``shared/research/architectures.md`` part A): every variant has 128-dim heads, RoPE axes
(32, 32, 32, 32) with theta 2000, a SwiGLU MLP of ratio 3 and no biases; klein and klein-base
checkpoints have the same shapes (base is the undistilled model sampled with true CFG).
"""

from __future__ import annotations

import attrs

from diffcore.api import AutoEncoderParams


@attrs.frozen
class Flux2Params:
    """Everything that fixes a FLUX.2 transformer's shape."""

    hidden_size: int
    num_heads: int
    depth: int                 # double-stream (joint) blocks
    depth_single_blocks: int
    context_in_dim: int        # text features: 3 stacked hidden states of the text encoder
    guidance_embed: bool
    in_channels: int = 128     # 32 VAE channels after the 2x2 patchify
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    theta: int = 2000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@attrs.frozen
class Flux2Defaults:
    """How a variant is sampled: BFL's CLI defaults. ``guidance`` is the embedded guidance
    (dev), the CFG scale (``true_cfg``, klein-base) or unused (distilled klein)."""

    steps: int
    guidance: float
    true_cfg: bool = False
    reference_cache: bool = False  # klein-9b-kv: reference keys and values kept from the first step


VARIANTS: dict[str, Flux2Params] = {
    "dev": Flux2Params(hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48,
                       context_in_dim=15360, guidance_embed=True),
    "klein-4b": Flux2Params(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                            context_in_dim=7680, guidance_embed=False),
    "klein-9b": Flux2Params(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                            context_in_dim=12288, guidance_embed=False),
    "klein-base-4b": Flux2Params(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20,
                                 context_in_dim=7680, guidance_embed=False),
    "klein-base-9b": Flux2Params(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                                 context_in_dim=12288, guidance_embed=False),
    "klein-9b-kv": Flux2Params(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24,
                               context_in_dim=12288, guidance_embed=False),
    # test shapes: a few hundred thousand parameters, 16 input channels for a 4-channel tiny VAE
    "tiny": Flux2Params(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                        guidance_embed=True, in_channels=16, axes_dim=(8, 8, 8, 8)),
    "tiny-klein": Flux2Params(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                              guidance_embed=False, in_channels=16, axes_dim=(8, 8, 8, 8)),
    "tiny-klein-kv": Flux2Params(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=48,
                                 guidance_embed=False, in_channels=16, axes_dim=(8, 8, 8, 8)),
}
# variants that share another's shapes; a file is taken for one of these only when its name (or
# its diffusers folder's model_index.json) says so
TAGGED = ("base", "kv")

DEFAULTS: dict[str, Flux2Defaults] = {
    "dev": Flux2Defaults(steps=50, guidance=4.0),
    "klein-4b": Flux2Defaults(steps=4, guidance=1.0),
    "klein-9b": Flux2Defaults(steps=4, guidance=1.0),
    "klein-base-4b": Flux2Defaults(steps=50, guidance=4.0, true_cfg=True),
    "klein-base-9b": Flux2Defaults(steps=50, guidance=4.0, true_cfg=True),
    "klein-9b-kv": Flux2Defaults(steps=4, guidance=1.0, reference_cache=True),
    "tiny": Flux2Defaults(steps=4, guidance=4.0),
    "tiny-klein": Flux2Defaults(steps=4, guidance=4.0, true_cfg=True),
    "tiny-klein-kv": Flux2Defaults(steps=4, guidance=1.0, reference_cache=True),
}


# the FLUX.2 autoencoder (BFL flux2 ``autoencoder.py``): FLUX.1's encoder / decoder with 32 latent
# channels, 1x1 quant convs and BatchNorm statistics of the 2x2-patchified latents
AE_VARIANTS: dict[str, AutoEncoderParams] = {
    "flux2": AutoEncoderParams(z_channels=32, quant_conv=True, batch_norm=True, patch=2),
    "tiny": AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, quant_conv=True,
                              batch_norm=True, patch=2),
}


# the text encoder each variant was trained with, and the hidden states stacked into its context
# (B2 text_encoder.py OUTPUT_LAYERS_MISTRAL / OUTPUT_LAYERS_QWEN3); the tiny rows pair with a
# 3-layer test LLM of width 16 (3 x 16 = the tiny context width 48)
TEXT_ENCODERS: dict[str, tuple[str, tuple[int, ...]]] = {
    "dev": ("mistral3", (10, 20, 30)),
    "klein-4b": ("qwen3", (9, 18, 27)),
    "klein-9b": ("qwen3", (9, 18, 27)),
    "klein-base-4b": ("qwen3", (9, 18, 27)),
    "klein-base-9b": ("qwen3", (9, 18, 27)),
    "klein-9b-kv": ("qwen3", (9, 18, 27)),
    "tiny": ("mistral3", (1, 2, 3)),
    "tiny-klein": ("qwen3", (1, 2, 3)),
    "tiny-klein-kv": ("qwen3", (1, 2, 3)),
}
