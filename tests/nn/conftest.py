"""Every family's network at a tiny size with inputs for one forward, for the toolbox tests that
must hold for all of them (compiling, fp8 weights). A family whose plugin is missing is skipped."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch
from torch import nn

Case = tuple[nn.Module, tuple, dict[str, Any]]


def dit_case() -> Case:
    pytest.importorskip("diffcore_dit")
    from diffcore_dit.model import DiT2D
    from diffcore_dit.params import DiTParams

    model = DiT2D(DiTParams(hidden=32, depth=2, heads=4, patch=2, in_channels=3, image_size=8, num_classes=5))
    return model, (torch.randn(2, 3, 8, 8), torch.full((2,), 0.6), torch.tensor([1, 4])), {}


def flux1_case(single_blocks: int = 2, size: tuple[int, int] = (4, 4)) -> Case:
    pytest.importorskip("diffcore_flux1")
    from diffcore_flux1.model import VARIANTS, Flux
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    kw = dict(img=torch.randn(2, size[0] * size[1], 64), img_ids=prepare_img_ids(*size)[0], txt=torch.randn(2, 7, 48),
              txt_ids=prepare_txt_ids(7)[0], y=torch.randn(2, 32), timesteps=torch.tensor([0.8, 0.3]),
              guidance=torch.full((2,), 3.5))
    return Flux(attrs.evolve(VARIANTS["tiny"], depth=1, depth_single_blocks=single_blocks)), (), kw


def flux2_case(single_blocks: int = 2, size: tuple[int, int] = (4, 6)) -> Case:
    pytest.importorskip("diffcore_flux2")
    from diffcore_flux2.model import VARIANTS, Flux2
    from diffcore_flux2.sampling import image_ids, text_ids

    p = attrs.evolve(VARIANTS["tiny"], depth=1, depth_single_blocks=single_blocks)
    kw = dict(x=torch.randn(2, size[0] * size[1], 16), ctx=torch.randn(2, 7, 48), x_ids=image_ids(*size),
              ctx_ids=text_ids(7), timesteps=torch.tensor([0.83, 0.31]))
    if p.guidance_embed:
        kw["guidance"] = torch.full((2,), 4.0)
    return Flux2(p), (), kw


def sd3_case(size: tuple[int, int] = (4, 3)) -> Case:
    """``size``: the token grid (the latent is twice it, patch 2)."""
    pytest.importorskip("diffcore_sd3")
    from diffcore_sd3.model import VARIANTS, MMDiT

    latent = (2, 16, 2 * size[0], 2 * size[1])
    return MMDiT(VARIANTS["tiny"]), (), dict(x=torch.randn(latent), context=torch.randn(2, 7, 48),
                                             y=torch.randn(2, 40), timesteps=torch.rand(2))


def sdxl_case(size: tuple[int, int] = (4, 4)) -> Case:
    """Every kind of block (res, attention, down, up, middle), one of each; ``size``: half the
    latent's (one downsampling)."""
    pytest.importorskip("diffcore_sdxl")
    from diffcore_sdxl.model import VARIANTS, UNet, label_vector

    p = attrs.evolve(VARIANTS["tiny"], channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1,
                     num_res_blocks=1)
    ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 64.0, 64.0][:(p.adm_in_channels - 32) // p.time_embed_scalar_dim]] * 2)
    label = label_vector(torch.randn(2, 32), ids, p.time_embed_scalar_dim)
    latent = (2, p.in_channels, 2 * size[0], 2 * size[1])
    return UNet(p), (torch.randn(latent), torch.tensor([981.0, 7.5]), torch.randn(2, 5, p.context_dim),
                     label), {}


FAMILIES: dict[str, Callable[..., Case]] = {"dit": dit_case, "flux1": flux1_case, "flux2": flux2_case,
                                            "sd3": sd3_case, "sdxl": sdxl_case}


@pytest.fixture
def tiny_case() -> Callable[..., Case]:
    """``tiny_case(family, **options) -> (network, args, kwargs)``, the network in eval mode."""
    def build(family: str, **options: Any) -> Case:
        torch.manual_seed(0)
        model, args, kw = FAMILIES[family](**options)
        return model.eval(), args, kw
    return build
