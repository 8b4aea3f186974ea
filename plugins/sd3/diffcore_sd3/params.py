"""SD3 / SD3.5 variants as data: the MMDiT's numbers, one row per variant.

Values from Stability's reference (github.com/Stability-AI/sd3.5, ``mmditx.MMDiTX``, which derives
``hidden = 64 * depth`` and ``heads = depth``) and the released checkpoints, checked against
diffusers' ``SD3Transformer2DModel`` (see the tests). The four released variants differ in depth,
width, the positional table's size, RMS qk-norm and MMDiT-X's dual attention; everything else is
shared. No torch here, so the plugin can validate a job file without importing it.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class SD3Params:
    in_channels: int = 16          # VAE latent channels; patchify is a 2x2 stride-2 conv (not FLUX's packed 64)
    out_channels: int = 16
    patch_size: int = 2
    context_in_dim: int = 4096     # [CLIP-L | CLIP-G zero-padded ; T5-XXL] features
    pooled_dim: int = 2048         # CLIP-L pooled 768 | CLIP-G projected 1280
    hidden_size: int = 1536
    num_heads: int = 24
    depth: int = 24
    mlp_ratio: float = 4.0
    pos_embed_max_size: int = 192  # the stored table is (max * max, hidden), cropped at the centre
    pos_embed_base: int = 64       # grid the freshly initialised table is scaled to (diffusers' sample_size / patch)
    qk_norm: bool = False          # per-head RMS norm of q and k (SD3.5)
    dual_attention_layers: tuple[int, ...] = attrs.field(default=(), converter=tuple)  # MMDiT-X attn2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


SD3_MEDIUM = SD3Params()
SD35_LARGE = SD3Params(hidden_size=2432, num_heads=38, depth=38, qk_norm=True)
VARIANTS: dict[str, SD3Params] = {
    "sd3-medium": SD3_MEDIUM,
    "sd3.5-large": SD35_LARGE,
    "sd3.5-large-turbo": SD35_LARGE,     # distilled (ADD) weights, same shapes
    "sd3.5-medium": attrs.evolve(SD3_MEDIUM, pos_embed_max_size=384, qk_norm=True,
                                 dual_attention_layers=tuple(range(13))),
    # small rows for tests and examples: one with SD3.5-medium's parts, one plain
    "tiny": SD3Params(context_in_dim=48, pooled_dim=40, hidden_size=64, num_heads=2, depth=3, pos_embed_max_size=16,
                      pos_embed_base=8, qk_norm=True, dual_attention_layers=(0, 1)),
    "tiny-sd3": SD3Params(context_in_dim=48, pooled_dim=40, hidden_size=64, num_heads=2, depth=3,
                          pos_embed_max_size=16, pos_embed_base=8),
}


@attrs.frozen
class SamplingDefaults:
    """What a variant samples with unless the job says otherwise: steps, the CFG scale (1.0 is
    none) and the flow schedule's static shift, on the reference sampler's grid (1000 steps)."""

    steps: int = 28
    cfg_scale: float = 3.5
    shift: float = 3.0


# SD3.5: the model cards' settings (large 28 / 3.5, turbo 4 / CFG off, medium 40 / 4.5) with shift
# 3 as Stability's reference and diffusers' folders; SD3-medium as the reference runs it
# (sd3_infer.CONFIGS: shift 1, 50 steps, CFG 5; diffusers' folder says shift 3, 28 steps, CFG 7)
DEFAULTS: dict[str, SamplingDefaults] = {
    "sd3-medium": SamplingDefaults(steps=50, cfg_scale=5.0, shift=1.0),
    "sd3.5-large": SamplingDefaults(),
    "sd3.5-large-turbo": SamplingDefaults(steps=4, cfg_scale=1.0),
    "sd3.5-medium": SamplingDefaults(steps=40, cfg_scale=4.5),
    "tiny": SamplingDefaults(steps=4, cfg_scale=4.5),
    "tiny-sd3": SamplingDefaults(steps=4, cfg_scale=5.0, shift=1.0),
}
