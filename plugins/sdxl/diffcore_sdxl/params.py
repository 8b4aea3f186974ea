"""SDXL variants as data: the UNet's numbers, one row per variant.

Values from Stability's ``generative-models`` configs (``configs/inference/sd_xl_base.yaml``,
``sd_xl_refiner.yaml``), checked against diffusers' ``UNet2DConditionModel`` configs of
stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 (see the tests, which build both at
full size). No torch here, so the plugin can validate a job file without importing it.
"""

from __future__ import annotations

import attrs


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


@attrs.frozen
class UNetParams:
    """One UNet. ``transformer_depth[i]`` is the number of transformer blocks in each
    SpatialTransformer of level ``i`` (0: the level has no attention; SGM's
    ``attention_resolutions`` is where this is nonzero)."""

    in_channels: int = 4                 # 9 for inpainting UNets: noisy 4 | mask 1 | masked image 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = attrs.field(default=(1, 2, 4), converter=_ints)
    num_res_blocks: int = 2              # per level on the way down; one more on the way up
    transformer_depth: tuple[int, ...] = attrs.field(default=(0, 2, 10), converter=_ints)
    transformer_depth_middle: int = 10
    head_dim: int = 64                   # SGM num_head_channels: heads = channels / 64
    context_dim: int = 2048              # CLIP-L 768 | OpenCLIP bigG 1280
    adm_in_channels: int = 2816          # pooled bigG 1280 + 6 micro-conditioning scalars x 256
    time_embed_scalar_dim: int = 256     # the sinusoid width of each micro-conditioning scalar
    norm_groups: int = 32

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)


BASE = UNetParams()
REFINER = UNetParams(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                     transformer_depth_middle=4, context_dim=1280, adm_in_channels=2560)

VARIANTS: dict[str, UNetParams] = {
    "base-1.0": BASE,
    "refiner-1.0": REFINER,
    "inpaint-1.0": attrs.evolve(BASE, in_channels=9),   # diffusers/stable-diffusion-xl-1.0-inpainting-0.1
    # tiny rows for tests and the step benchmark: the same structure, small numbers
    "tiny": UNetParams(model_channels=32, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 2),
                       transformer_depth_middle=2, head_dim=16, context_dim=48, adm_in_channels=32 + 6 * 8,
                       time_embed_scalar_dim=8),
    "tiny-refiner": UNetParams(model_channels=32, channel_mult=(1, 2, 2, 2), transformer_depth=(0, 1, 1, 0),
                               transformer_depth_middle=1, head_dim=16, context_dim=32,
                               adm_in_channels=32 + 5 * 8, time_embed_scalar_dim=8),
}

# Which conditioning a variant's label embedding takes: base-style (original size, crop, target
# size) or refiner-style (original size, crop, aesthetic score).
MICRO_CONDITIONING = {"base-1.0": "size", "inpaint-1.0": "size", "tiny": "size",
                      "refiner-1.0": "aesthetic", "tiny-refiner": "aesthetic"}


@attrs.frozen
class SamplingDefaults:
    """What a variant samples with unless the job says otherwise (diffusers'
    StableDiffusionXLPipeline / Img2Img defaults; Stability's demo uses the same steps and CFG)."""

    steps: int = 50
    cfg_scale: float = 5.0
    size: int = 1024
    prediction_type: str = "epsilon"     # v-prediction finetunes say so in the job (prediction_type = "v")
    strength: float = 0.3                # img2img; the refiner's default in diffusers' Img2Img pipeline
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5


DEFAULTS: dict[str, SamplingDefaults] = {name: SamplingDefaults() for name in VARIANTS}
