"""Conditioning-image makers for the controlnet trainer: the core's ``canny`` and ``precomputed``, a
plugin's own through ``register_conditioning``, and the errors naming the trainer's keys."""

from __future__ import annotations

import attrs
import pytest
import torch

from diffcore.errors import ConfigError
from diffcore.hookspecs import hookimpl
from diffcore.nn.control import canny
from diffcore.testing import plugins_for_test
from diffcore.training.controlnet import conditioning_maker


def boxes() -> torch.Tensor:
    images = torch.full((2, 3, 16, 16), -1.0)
    images[0, :, 2:9, 3:12] = 1.0
    images[1, :, 6:14, 1:7] = 1.0
    return images


def test_canny_and_precomputed():
    images = boxes()
    with plugins_for_test():
        edges = conditioning_maker("canny", {"low": 50, "high": 150})({"image": images})
        given = torch.rand(2, 3, 16, 16) * 2 - 1
        assert conditioning_maker("precomputed", {})({"image": images, "conditioning_image": given}) is given
    assert edges.shape == (2, 3, 16, 16) and set(edges.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(edges[1, 0] > 0, canny(images[1], 50, 150))


@attrs.frozen
class DepthConfig:
    far: float = 1.0


class DepthPlugin:
    """A plugin's conditioning ("depth" maps come from a model the user picks): here the image's
    brightness as a stand-in depth, the same for all three channels."""

    @hookimpl
    def register_conditioning(self, register):
        def build(config):
            return lambda batch: (batch["image"].mean(1, keepdim=True) * config.far).expand(-1, 3, -1, -1)

        register("depth", build, config=DepthConfig, description="brightness as depth (test)")


def test_a_plugins_conditioning_is_used():
    images = boxes()
    with plugins_for_test(DepthPlugin()):
        made = conditioning_maker("depth", {"far": 0.5})({"image": images})
    assert torch.equal(made, (images.mean(1, keepdim=True) * 0.5).expand(-1, 3, -1, -1))


def test_errors_name_the_trainer_keys():
    with plugins_for_test():
        with pytest.raises(ConfigError, match=r"trainer\.conditioning.*unknown conditioning 'cany'.*canny"):
            conditioning_maker("cany", {})
        with pytest.raises(ConfigError, match=r"trainer\.conditioning_options\.low"):
            conditioning_maker("canny", {"low": -1})
        with pytest.raises(ConfigError, match=r"trainer\.conditioning.*cached latents only"):
            conditioning_maker("canny", {})({"latents": torch.zeros(1, 4, 2, 2)})
        with pytest.raises(ConfigError, match=r"trainer\.conditioning.*needs a dataset giving conditioning_image"):
            conditioning_maker("precomputed", {})({"image": boxes()})
