"""Torch-free descriptions of toolbox modules, so a plugin's variant table (and the config
checks that read it) loads without importing torch."""

from __future__ import annotations

import attrs

__all__ = ["AutoEncoderParams"]


@attrs.frozen
class AutoEncoderParams:
    """The LDM KL autoencoder (Rombach et al. 2022, ``first_stage_model``) as one row of numbers.

    FLUX.1: 16 latent channels, no quant convs, ``(z - 0.1159) * 0.3611``. FLUX.2: 32 channels,
    quant convs, latents patchified 2 x 2 and normalised by BatchNorm running statistics
    (``batch_norm``, ``patch``, ``bn_eps``). SDXL: 4 channels, quant convs, ``z * 0.13025``.
    SD3 / SD3.5: 16 channels, no quant convs, ``(z - 0.0609) * 1.5305``. All share ``ch`` 128,
    ``ch_mult`` (1, 2, 4, 4), 2 res blocks per level (3 in the decoder), GroupNorm(32, eps 1e-6).

    ``scale_factor`` / ``shift_factor`` are not stored in checkpoints: a family names its own."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = attrs.field(default=(1, 2, 4, 4), converter=tuple)
    num_res_blocks: int = 2
    z_channels: int = 16
    quant_conv: bool = False       # 1x1 convs on the moments (encoder) and the latents (decoder)
    scale_factor: float = 1.0      # encode: (z - shift_factor) * scale_factor
    shift_factor: float = 0.0
    batch_norm: bool = False       # encode: (patchify(z) - running_mean) / sqrt(running_var + bn_eps)
    patch: int = 1                 # latents leave ``encode`` patchified patch x patch (FLUX.2: 2)
    bn_eps: float = 1e-4
    bn_momentum: float = 0.1

    @property
    def latent_channels(self) -> int:
        """Channels of what ``encode`` returns (after patchify): what the denoiser reads."""
        return self.z_channels * self.patch**2

    @property
    def factor(self) -> int:
        """Pixels per latent pixel along each side, before patchify (8 for four levels)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def downscale(self) -> int:
        """Pixels per element of ``encode``'s output along each side (FLUX.2: 8 x 2 = 16)."""
        return self.factor * self.patch
