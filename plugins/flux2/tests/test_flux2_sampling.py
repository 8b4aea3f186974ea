"""FLUX.2 schedule, ids and Euler loops against diffusers' scheduler and pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcore_flux2 import sampling as S
from diffcore_flux2.vae import unpatchify

FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)  # diffusers builds FLUX.2 pipelines with FLUX.1-dev's scheduler config


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 4300, 4301, 16384])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_schedule_matches_diffusers(seq_len, steps):
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    mu = S.compute_empirical_mu(seq_len, steps)
    assert mu == compute_empirical_mu(seq_len, steps)
    scheduler = _scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = torch.tensor(S.get_schedule(steps, seq_len))
    assert ours.shape == (steps + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    assert (ours - scheduler.sigmas.double()).abs().max() <= 1e-6


def test_empirical_mu_examples_from_the_facts_file():
    assert round(S.compute_empirical_mu(4096, 50), 3) == 2.023
    assert round(S.compute_empirical_mu(4096, 4), 3) == 2.291
    assert round(S.compute_empirical_mu(16384, 50), 3) == 3.230


def test_position_ids():
    img = S.image_ids(2, 3)
    assert img.dtype == torch.long and img.tolist() == [[0, r, c, 0] for r in range(2) for c in range(3)]
    assert S.text_ids(4).tolist() == [[0, 0, 0, i] for i in range(4)]
    tokens, ids = S.reference_tokens([torch.zeros(8, 2, 2), torch.ones(1, 8, 1, 3)])
    assert tokens.shape == (7, 8) and ids[:, 0].tolist() == [10] * 4 + [20] * 3
    lat = torch.randn(2, 8, 3, 5)
    assert torch.equal(S.unpack(S.pack(lat), 3, 5), lat)


def _pipeline_parts(diffusers_transformer, diffusers_vae, guidance: bool):
    transformer = diffusers_transformer(guidance)
    return dict(scheduler=_scheduler(), vae=diffusers_vae, text_encoder=None, tokenizer=None, transformer=transformer)


def test_dev_sampling_run_matches_flux2_pipeline(diffusers_transformer, diffusers_vae, to_ours):
    """Flux2Pipeline (embedded guidance 3.5, 4 steps) from the same prompt embeddings and initial
    noise; its latent output is packed normalised tokens, as our ``denoise`` returns them."""
    from diffusers import Flux2Pipeline

    parts = _pipeline_parts(diffusers_transformer, diffusers_vae, guidance=True)
    pipe = Flux2Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    h, w, text = 4, 6, 5
    emb, noise = torch.randn(1, text, 48, generator=g), torch.randn(1, 16, h, w, generator=g)
    expected = pipe(prompt_embeds=emb, latents=noise, height=4 * h, width=4 * w, num_inference_steps=4,
                    guidance_scale=3.5, output_type="latent").images
    ours = to_ours(parts["transformer"])
    with torch.no_grad():
        got = S.denoise(ours, S.pack(noise), S.image_ids(h, w), emb, S.text_ids(text),
                        S.get_schedule(4, h * w), guidance=3.5)
        # the pipeline's own float32 sigmas (it feeds the model sigma * 1000 / 1000)
        same_sigmas = S.denoise(ours, S.pack(noise), S.image_ids(h, w), emb, S.text_ids(text),
                                (pipe.scheduler.timesteps / 1000).tolist() + [0.0], guidance=3.5)
    err = (got - expected).abs().max().item()
    print(f"Flux2Pipeline run: max abs err {err:.3g} (ours schedule), "
          f"{(same_sigmas - expected).abs().max().item():.3g} (pipeline sigmas); "
          f"latents max {expected.abs().max():.3g}")
    assert err <= 1e-5
    # with the pipeline's own sigmas only the arithmetic order differs (complex RoPE, fused
    # multiply-adds, joint QK-norm): float32 rounding
    assert (same_sigmas - expected).abs().max() <= 2e-6


def test_klein_base_cfg_run_with_two_references_matches_klein_pipeline(diffusers_transformer, diffusers_vae,
                                                                       to_ours, ae_from):
    """Flux2KleinPipeline (true CFG 4.0, 3 steps, two reference images encoded by the VAE) against
    our AE + ``reference_tokens`` + ``denoise_cfg``; its latent output is de-normalised and
    unpatchified VAE latents (B, 4, 2h, 2w)."""
    from PIL import Image

    from diffusers import Flux2KleinPipeline

    parts = _pipeline_parts(diffusers_transformer, diffusers_vae, guidance=False)
    pipe = Flux2KleinPipeline(**parts, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(2)
    h, w, text = 4, 4, 6
    emb, neg = torch.randn(1, text, 48, generator=g), torch.randn(1, text, 48, generator=g)
    noise = torch.randn(1, 16, h, w, generator=g)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))]
    expected = pipe(image=images, prompt_embeds=emb, negative_prompt_embeds=neg, latents=noise, height=4 * h,
                    width=4 * w, num_inference_steps=3, guidance_scale=4.0, output_type="latent").images

    ae, ours = ae_from(diffusers_vae), to_ours(parts["transformer"])
    with torch.no_grad():
        pixels = [pipe.image_processor.preprocess(im, height=im.height, width=im.width, resize_mode="crop")
                  for im in images]
        ref, ref_ids = S.reference_tokens([ae.encode(p) for p in pixels])
        tokens = S.denoise_cfg(ours, S.pack(noise), S.image_ids(h, w), emb, S.text_ids(text), neg, S.text_ids(text),
                               S.get_schedule(3, h * w), 4.0, ref=ref, ref_ids=ref_ids)
        got = S.unpack(tokens, h, w)
        got = unpatchify(ae.denormalize(got))
    err = (got - expected).abs().max().item()
    print(f"Flux2KleinPipeline CFG + 2 refs run: max abs err {err:.3g}; latents max {expected.abs().max():.3g}")
    assert got.shape == expected.shape == (1, 4, 2 * h, 2 * w)
    assert err <= 1e-5


def test_denoise_cfg_with_unequal_text_lengths_runs_two_forwards(diffusers_transformer, to_ours):
    ours = to_ours(diffusers_transformer(False))
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 48, generator=g)
    neg = torch.randn(1, 3, 48, generator=g)
    calls = []
    ours.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    ids = S.image_ids(2, 3)
    with torch.no_grad():
        out = S.denoise_cfg(ours, img, ids, txt, S.text_ids(5), neg, S.text_ids(3), [1.0, 0.5, 0.0], 1.0)
        plain = S.denoise(ours, img, ids, txt, S.text_ids(5), [1.0, 0.5, 0.0])
    assert calls == [1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(out, plain)  # cfg 1 is the conditional prediction
