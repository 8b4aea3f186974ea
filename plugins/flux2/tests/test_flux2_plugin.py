"""The flux2 plugin end to end: registration, the bundle through diffcore's sampling engine, and
whole generations against diffusers' pipelines from the same prompts, weights and initial noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore.api import CFG, euler, GenerationRequest, sample
from diffcore.testing import plugins_for_test
from diffcore.testing.conformance import check_model_family
from diffcore_flux2.sampling import get_schedule

SEQ = 16  # text tokens: short, to keep the tiny runs fast
# Whole runs agree to float32 rounding, not bit for bit: the engine batches cond and uncond into
# one forward, its Euler goes through x0 = x - sigma v, and diffusers' scheduler shifts its sigmas
# in float32 where ours are rounded once from float64; CFG 4 amplifies each difference about 7x.
# Measured on pixels in [0, 1]: ~1e-5 (klein-base CFG edit), ~1e-6 (dev).
END_TO_END = 5e-5


def _build(root, **overrides):
    with plugins_for_test() as pm:
        component = pm.registry("models").get("flux2")
        return component.build(component.config(path=str(root), dtype="float32", max_sequence_length=SEQ,
                                                **overrides))


def test_flux_schedule_registered_by_both_flux_plugins_without_a_clash():
    """FLUX.1's ``flux`` preset comes from either family (the same factory and config), so either
    alone or both installed give the same schedule: the flow schedule shifted by image size."""
    import diffcore_flux2.plugin as flux2

    from diffcore.api import DynamicShiftConfig, FlowConfig, flow_schedule

    flux1 = pytest.importorskip("diffcore_flux1.plugin")
    expected = flow_schedule(FlowConfig(dynamic=True)).sigmas(4, seq_len=1024)
    for modules in ((flux2,), (flux1, flux2), (flux2, flux1)):
        with plugins_for_test(*modules, entry_points=False) as pm:
            component = pm.registry("schedules").get("flux")
            assert component.config is DynamicShiftConfig and component.plugin == modules[0].__name__
            assert torch.equal(component.build().sigmas(4, seq_len=1024), expected)


def test_registered_model_and_schedule():
    with plugins_for_test() as pm:
        model = pm.registry("models").get("flux2")
        schedule = pm.registry("schedules").get("flux2").build()
    assert model.plugin and "FLUX.2" in model.description
    assert torch.equal(schedule.sigmas(4, seq_len=1024), torch.tensor(get_schedule(4, 1024), dtype=torch.float32))
    with pytest.raises(ValueError, match="pass seq_len"):
        schedule.sigmas(4)


def test_klein_base_cfg_edit_matches_klein_pipeline(flux2_folder, make_pipeline):
    """Prompt + one reference image, true CFG 4.0 against the empty prompt, 3 steps, decoded:
    diffcore (bundle.conditions -> engine with euler + CFG -> bundle.decode) vs Flux2KleinPipeline."""
    from PIL import Image

    from diffusers import Flux2KleinPipeline

    root, parts = flux2_folder(False)
    bundle = _build(root)
    assert bundle.network.params.guidance_embed is False and bundle.default_sampling_steps == 4
    prompt, h, w, steps = "a red cat on the mat", 4, 6, 3
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = make_pipeline(Flux2KleinPipeline, parts, is_distilled=False)
    expected = pipe(image=[image], prompt=prompt, latents=noise, height=4 * h, width=4 * w, num_inference_steps=steps,
                    guidance_scale=4.0, max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3),
                    output_type="pt").images

    pixels = pipe.image_processor.preprocess(image, height=64, width=64, resize_mode="crop")[0]
    request = GenerationRequest(batch=1, prompts=[prompt], negative_prompts=[""], height=4 * h, width=4 * w,
                                reference_images=[pixels])
    assert bundle.latent_shape(request) == (16, h, w)
    with torch.no_grad():
        conditions = bundle.conditions(request)
        sigmas = _schedule(bundle).sigmas(steps, seq_len=h * w)
        latents = sample(bundle, noise, conditions, sigmas, euler, guidance=[CFG(scale=4.0)], disable=True)
        got = (bundle.decode(latents) / 2 + 0.5).clamp(0, 1)
    err = (got - expected).abs().max().item()
    print(f"klein-base CFG edit, end to end (prompt -> pixels): max abs err {err:.3g}")
    assert got.shape == expected.shape == (1, 3, 4 * h, 4 * w)
    assert err <= END_TO_END


def test_dev_embedded_guidance_matches_flux2_pipeline(flux2_folder, make_pipeline):
    from diffusers import Flux2Pipeline

    root, parts = flux2_folder(True)
    bundle = _build(root, guidance=3.5)
    prompt, h, w, steps = "a blue dog", 6, 4, 4
    noise = torch.randn(1, 16, h, w, generator=torch.Generator().manual_seed(3))
    expected = make_pipeline(Flux2Pipeline, parts)(prompt=prompt, latents=noise, height=4 * h, width=4 * w,
                                               num_inference_steps=steps, guidance_scale=3.5, max_sequence_length=SEQ,
                                               text_encoder_out_layers=(1, 2, 3), output_type="pt").images
    request = GenerationRequest(batch=1, prompts=[prompt], height=4 * h, width=4 * w)
    with torch.no_grad():
        latents = sample(bundle, noise, bundle.conditions(request), _schedule(bundle).sigmas(steps, seq_len=h * w),
                         euler, disable=True)
        got = (bundle.decode(latents) / 2 + 0.5).clamp(0, 1)
    err = (got - expected).abs().max().item()
    print(f"dev embedded guidance, end to end (prompt -> pixels): max abs err {err:.3g}")
    assert err <= END_TO_END


def test_bundle_conformance(flux2_folder):
    root, _ = flux2_folder(False)
    bundle = _build(root, variant="tiny-klein")
    check_model_family(bundle, GenerationRequest(batch=2, prompts=["a cat", "a dog"], height=16, width=24))
    assert bundle.attention_alias("single_transformer_blocks.1.attn") == "single_blocks.1"


def test_config_errors_name_the_field(tmp_path):
    from diffcore.api import ConfigError

    with plugins_for_test() as pm:
        config = pm.registry("models").get("flux2").config
    with pytest.raises(ConfigError, match='unknown FLUX.2 variant .*did you mean "klein-9b"'):
        config(variant="klein-9")
    with pytest.raises(ConfigError, match="no such file or folder"):
        config(path=str(tmp_path / "absent"))


def test_text_encoder_is_the_old_name_of_text_encoders(tmp_path):
    """FLUX.1 (and SDXL, SD3) call the folder of the text encoders ``text_encoders``; FLUX.2's
    earlier ``text_encoder`` still loads, with a deprecation warning."""
    from diffcore.api import ConfigError, structure
    from diffcore_flux2.plugin import Flux2Config

    with pytest.warns(FutureWarning, match="'text_encoder' is deprecated, call it 'text_encoders'"):
        config = structure({"text_encoder": str(tmp_path)}, Flux2Config)
    assert config.text_encoders == str(tmp_path) and config.text_encoder is None
    assert Flux2Config(text_encoders=str(tmp_path)).text_encoders == str(tmp_path)
    with pytest.raises(ConfigError, match="set only text_encoders"):
        Flux2Config(text_encoder=str(tmp_path), text_encoders=str(tmp_path.parent))


def _schedule(bundle):
    with plugins_for_test() as pm:
        return pm.registry("schedules").get(bundle.default_schedule["name"]).build()
