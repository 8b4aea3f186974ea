"""The generation pipeline: each choice (steps, CFG, schedule, token count, img2img, noise) made once."""

from __future__ import annotations

import attrs
import pytest
import torch

from diffcore.errors import ConfigError
from diffcore.models import GenerationRequest, ModelBundle
from diffcore.sampling.cfg import CFG
from diffcore.sampling.guidance import GuidanceProcessor
from diffcore.sampling.pipeline import Pipeline, build_schedule, pick_device
from diffcore.sampling.samplers import euler
from diffcore.testing import plugins_for_test


class Velocity(torch.nn.Module):
    """A constant velocity per branch: 0 for cond (label 0), 1 for uncond (label 1)."""

    def forward(self, x, sigma, label):
        return label.to(x).reshape(-1, 1, 1, 1).expand_as(x).clone()


@attrs.define(eq=False)
class Toy(ModelBundle):
    default_sampling_steps: int = 3
    default_cfg_scale: float = 2.0
    tokens: int = 7

    def conditions(self, request):
        return {"cond": {"label": torch.zeros(request.batch)}, "uncond": {"label": torch.ones(request.batch)}}

    def latent_shape(self, request):
        return (1, 2, 2)

    def seq_len(self, request):
        return self.tokens

    def encode(self, images):
        return images * 0.5       # an encoder the test can tell apart from the identity


@attrs.define
class Recording:
    """A schedule that records what it was asked for and returns a linear flow grid."""

    calls: list = attrs.Factory(list)

    def sigmas(self, steps, *, seq_len=None):
        self.calls.append((steps, seq_len))
        return torch.linspace(1.0, 0.0, steps + 1)


def pipeline(**kw) -> Pipeline:
    return Pipeline(bundle=Toy(network=Velocity()), sampler=euler, schedule=Recording(), device=torch.device("cpu"),
                    **kw)


def test_defaults_come_from_the_bundle_and_the_request_wins():
    p = pipeline()
    request = GenerationRequest(batch=1)
    assert (p.sampling_steps(request), p.cfg_scale(request)) == (3, 2.0)
    assert [type(g) for g in p.chain(request)] == [CFG] and p.chain(request)[0].scale == 2.0
    given = GenerationRequest(batch=1, sampling_steps=5, cfg_scale=1.0)
    assert (p.sampling_steps(given), p.chain(given)) == (5, [])
    p.sigmas(given)
    assert p.schedule.calls == [(5, 7)]     # the token count is the bundle's seq_len, not the latent's shape


def test_images_follow_cfg_and_the_guidance_after_it():
    """cond velocity 0, uncond 1: CFG at 3 gives -2 all the way, so Euler ends at noise + 2; a
    processor after CFG sees CFG's result."""
    seen = []

    @attrs.define
    class Spy(GuidanceProcessor):
        def combine(self, pred, preds, step):
            seen.append(pred.clone())
            return pred

    p = pipeline(guidance=[Spy()])
    request = GenerationRequest(batch=2, cfg_scale=3.0)
    images = p(request, generator=torch.Generator().manual_seed(4))
    noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(images, (noise + 2).clamp(-1, 1))
    assert len(seen) == 3 and all(torch.equal(s, torch.full_like(s, -2.0)) for s in seen)


def test_callback_gets_every_step():
    steps = []
    pipeline().latents(GenerationRequest(batch=1, sampling_steps=4), callback=lambda d: steps.append(d["i"]))
    assert steps == [0, 1, 2, 3]


@pytest.mark.parametrize("strength, kept", [(1.0, 4), (0.5, 2), (0.3, 2), (0.01, 1)])
def test_img2img_skips_diffusers_share_of_the_schedule(strength, kept):
    """The first ``int(steps - steps * strength)`` of 4 steps are skipped, at least one runs; the
    start is the encoded image noised to the first kept sigma."""
    starts = []
    p = pipeline()
    p.sampler = lambda model, x, sigmas, **kw: (starts.append((x.clone(), sigmas)), x)[1]
    image = torch.full((1, 2, 2), 0.6)
    p.latents(GenerationRequest(batch=2, init_image=image, strength=strength, sampling_steps=4, cfg_scale=1.0),
              generator=torch.Generator().manual_seed(0))
    x, sigmas = starts[0]
    assert len(sigmas) - 1 == kept
    noise = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    sigma = float(sigmas[0])
    torch.testing.assert_close(x, (1 - sigma) * 0.3 + sigma * noise)


def test_an_init_image_of_the_wrong_size_names_the_setting():
    with pytest.raises(ConfigError, match=r"job.init_image: the init image is \(1, 3, 3\).*makes \(1, 2, 2\)"):
        pipeline()(GenerationRequest(batch=1, init_image=torch.zeros(1, 3, 3), strength=0.5))


def test_device_and_default_schedule():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with plugins_for_test(entry_points=False):
        schedule = build_schedule(Toy(network=Velocity(), default_schedule={"name": "flow", "shift": 3.0}))
        torch.testing.assert_close(schedule.sigmas(2), torch.tensor([1.0, 0.75, 0.0]))
        with pytest.raises(ConfigError, match="shift"):
            build_schedule(Toy(network=Velocity(), default_schedule={"name": "flow", "shift": -1.0}))
