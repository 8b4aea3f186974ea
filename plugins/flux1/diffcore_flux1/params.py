"""FLUX.1 variants as data: the transformer's and the autoencoder's numbers, one row per variant.

Values from BFL ``src/flux/util.py`` (``configs``, ``ae_params``), checked against diffusers'
``FluxTransformer2DModel`` / ``AutoencoderKL`` (see the tests). No torch here, so the plugin can
validate a job file without importing it.
"""

from __future__ import annotations

import attrs

from diffcore.api import AutoEncoderParams


@attrs.frozen
class FluxParams:
    in_channels: int = 64          # packed latent: 16 VAE channels x 2 x 2 (+ image conditions for fill / control)
    out_channels: int = 64
    vec_in_dim: int = 768          # pooled CLIP-L
    context_in_dim: int = 4096     # T5-XXL hidden
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = attrs.field(default=(16, 56, 56), converter=tuple)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True


DEV = FluxParams()
VARIANTS: dict[str, FluxParams] = {
    "dev": DEV,
    "schnell": attrs.evolve(DEV, guidance_embed=False),
    "kontext-dev": DEV,                              # reference image enters as extra tokens (t = 1)
    "fill-dev": attrs.evolve(DEV, in_channels=384),  # noisy 64 | masked image 64 | mask 256
    "canny-dev": attrs.evolve(DEV, in_channels=128),  # noisy 64 | control latents 64
    "depth-dev": attrs.evolve(DEV, in_channels=128),
    "tiny": FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=64,
                       num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12)),
}


@attrs.frozen
class SamplingDefaults:
    """What a variant samples with unless the job says otherwise: steps, embedded guidance, the
    schedule's resolution shift (FLUX's mu line; schnell is distilled on the unshifted one) and
    the T5 sequence length."""

    steps: int = 28
    guidance: float = 3.5
    shift: bool = True
    max_sequence_length: int = 512


# diffusers' pipeline defaults (FluxPipeline, FluxKontextPipeline, FluxFillPipeline), BFL's CLI where
# diffusers has none (cli_control: canny 30, depth 10); Kontext 28 steps / 2.5 as BFL's cli_kontext guides
DEFAULTS: dict[str, SamplingDefaults] = {
    "dev": SamplingDefaults(),
    "schnell": SamplingDefaults(steps=4, shift=False, max_sequence_length=256),
    "kontext-dev": SamplingDefaults(guidance=2.5),
    "fill-dev": SamplingDefaults(steps=50, guidance=30.0),
    "canny-dev": SamplingDefaults(steps=50, guidance=30.0),
    "depth-dev": SamplingDefaults(steps=50, guidance=10.0),
    "tiny": SamplingDefaults(),
}

# (width, height) Kontext was trained at; a reference image is resized to the closest aspect ratio
# (BFL ``sampling.PREFERED_KONTEXT_RESOLUTIONS``, diffusers ``PREFERRED_KONTEXT_RESOLUTIONS``)
KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
)


AE_VARIANTS: dict[str, AutoEncoderParams] = {
    "flux1": AutoEncoderParams(z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    "tiny": AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, scale_factor=0.3611,
                              shift_factor=0.1159),
}
