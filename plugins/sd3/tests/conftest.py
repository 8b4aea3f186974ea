"""Tiny random SD3 models in both implementations, for parity and loading tests."""

import pytest
import torch

# diffusers SD3Transformer2DModel kwargs of the tiny shapes: hidden 64 = 2 heads x 32, 3 blocks
TINY_DIFFUSERS = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                      attention_head_dim=32, num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=64,
                      pooled_projection_dim=40, pos_embed_max_size=16)
# the variant shapes in small: SD3-medium (no qk-norm), SD3.5-large (RMS qk-norm), SD3.5-medium (+ MMDiT-X)
SHAPES = {"sd3-medium": dict(), "sd3.5-large": dict(qk_norm="rms_norm"),
          "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm scales around 1), so no block is a no-op and errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


@pytest.fixture
def diffusers_sd3():
    """``make(shape, seed=0, **overrides)`` -> a tiny random diffusers ``SD3Transformer2DModel``."""
    from diffusers import SD3Transformer2DModel

    def make(shape: str = "sd3.5-medium", seed: int = 0, **overrides):
        return randomize(SD3Transformer2DModel(**{**TINY_DIFFUSERS, **SHAPES[shape], **overrides}), seed)

    return make


@pytest.fixture
def sd3_inputs():
    """``make(batch, h, w, tokens)`` -> random latents (B, 16, h, w), context, pooled and sigmas."""

    def make(batch=2, h=8, w=6, tokens=7, seed=0):
        g = torch.Generator().manual_seed(seed)
        return dict(x=torch.randn(batch, 16, h, w, generator=g), context=torch.randn(batch, tokens, 48, generator=g),
                    y=torch.randn(batch, 40, generator=g), timesteps=torch.rand(batch, generator=g))

    return make
