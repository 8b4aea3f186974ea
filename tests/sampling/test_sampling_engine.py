"""The engine: branch batching, guidance windows, attention patches on their own rows, img2img."""

import attrs
import pytest
import torch
from einops import rearrange
from torch import nn

from diffcore.errors import ConfigError, PluginError
from diffcore.models import GenerationRequest, ModelBundle
from diffcore.nn.attention import Attention, attention_layers, patch_attention
from diffcore.sampling import samplers
from diffcore.sampling.cfg import CFG
from diffcore.sampling.denoisers import add_noise, make_denoiser
from diffcore.sampling.engine import sample
from diffcore.sampling.guidance import Branch, GuidanceProcessor
from diffcore.sampling.schedules import ddpm_sigma_table, flow_sigmas, karras_sigmas

B, T, D, HEADS = 2, 5, 8, 2


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.op = Attention()
        self.out = nn.Linear(D, D)

    def forward(self, x):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=HEADS)
        return self.out(rearrange(self.op(q, k, v), "b h t d -> b t (h d)"))


class TinyNet(nn.Module):
    """Tokens (B, T, D), a time input (B,) and a context (B, L, D); two attention blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.time = nn.Linear(1, D)
        self.ctx = nn.Linear(D, D)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": SelfAttention()}) for _ in range(2)])
        self.head = nn.Linear(D, D)

    def forward(self, x, time, context, scale=1.0):
        h = x + self.time(time[:, None].float()).unsqueeze(1) + self.ctx(context.mean(1, keepdim=True)) * scale
        for block in self.blocks:
            h = h + block["attn"](h)
        return self.head(h)


@attrs.define(eq=False)
class TinyBundle(ModelBundle):
    batches: list = attrs.Factory(list)

    def forward(self, x, sigma, **cond):
        self.batches.append(x.shape[0])
        return self.network(x, sigma, **cond)

    def conditions(self, request):
        g = torch.Generator().manual_seed(1)
        n = request.batch
        return {"cond": {"context": torch.randn(n, 4, D, generator=g), "scale": 1.0},
                "uncond": {"context": torch.zeros(n, 4, D), "scale": 1.0},
                "short": {"context": torch.randn(n, 3, D, generator=g), "scale": 1.0},
                "other_scale": {"context": torch.randn(n, 4, D, generator=g), "scale": 0.5}}

    def latent_shape(self, request):
        return (T, D)

    def decode(self, latents):
        return latents[:, None]

    def attention_alias(self, name):
        return name.replace("transformer_blocks", "blocks").replace("attn1", "attn")


def make(prediction_type="flow"):
    table = None if prediction_type == "flow" else ddpm_sigma_table().float()
    return TinyBundle(TinyNet().eval(), prediction_type=prediction_type, sigma_table=table)


def schedule(prediction_type, steps):
    return flow_sigmas(steps, shift=3.0) if prediction_type == "flow" else karras_sigmas(steps)


def start(bundle):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(2)), bundle.conditions(GenerationRequest(B))


class Plain:
    """Hand-written CFG, one forward per branch: the reference the engine's batching must equal."""

    def __init__(self, bundle, cond, uncond, scale):
        self.bundle, self.den, self.cond, self.uncond, self.scale = bundle, make_denoiser(bundle), cond, uncond, scale
        self.alpha = self.den.alpha

    def __call__(self, x, sigma):
        x_in, time = self.den.inputs(x, sigma)
        c = self.bundle.network(x_in, time, **self.cond)
        u = self.bundle.network(x_in, time, **self.uncond)
        return self.den.to_denoised(x, sigma, u + self.scale * (c - u))


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon", "v"])
def test_cfg_runs_one_forward_of_twice_the_batch_per_step_and_equals_separate_forwards(prediction_type):
    bundle = make(prediction_type)
    noise, conds = start(bundle)
    sigmas = schedule(prediction_type, 6)
    with torch.no_grad():
        got = sample(bundle, noise, conds, sigmas, samplers.dpmpp_2m, guidance=[CFG(scale=3.0)], disable=True)
        want = samplers.dpmpp_2m(Plain(bundle, conds["cond"], conds["uncond"], 3.0), noise * sigmas[0], sigmas,
                                 disable=True)
    assert bundle.batches == [2 * B] * 6
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_runs_the_conditional_branch_only():
    bundle = make()
    noise, conds = start(bundle)
    with torch.no_grad():
        got = sample(bundle, noise, conds, schedule("flow", 4), samplers.euler, guidance=[CFG(scale=1.0)], disable=True)
        want = sample(make(), noise, conds, schedule("flow", 4), samplers.euler, disable=True)
    assert bundle.batches == [B] * 4
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("uncond", ["short", "other_scale"])
def test_branches_that_cannot_share_a_forward_run_separately(uncond):
    """A context of another length, or another non-tensor argument, takes its own forward."""
    bundle = make()
    noise, conds = start(bundle)
    conds = {"cond": conds["cond"], "uncond": conds[uncond]}
    with torch.no_grad():
        got = sample(bundle, noise, conds, schedule("flow", 3), samplers.euler, guidance=[CFG(2.0)], disable=True)
        want = samplers.euler(Plain(bundle, conds["cond"], conds["uncond"], 2.0), noise, schedule("flow", 3),
                              disable=True)
    assert bundle.batches == [B, B] * 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_processor_window_is_honoured():
    bundle = make()
    noise, conds = start(bundle)
    with torch.no_grad():
        sample(bundle, noise, conds, schedule("flow", 10), samplers.euler, guidance=[CFG(3.0, start=0.3, stop=0.7)],
               disable=True)
    assert bundle.batches == [B] * 3 + [2 * B] * 4 + [B] * 3


@attrs.define
class Recorder(GuidanceProcessor):
    """Identity processor that records what it sees and optionally asks for extra branches."""

    extra: tuple = ()
    seen: list = attrs.Factory(list)

    def branches(self, step):
        return list(self.extra)

    def combine(self, pred, preds, step):
        self.seen.append((step, {k: v.clone() for k, v in preds.items()}))
        return pred


def test_a_heun_corrector_counts_as_the_next_step():
    bundle, rec = make(), Recorder()
    noise, conds = start(bundle)
    with torch.no_grad():
        sample(bundle, noise, conds, schedule("flow", 4), samplers.heun, guidance=[rec], disable=True)
    assert [step.step for step, _ in rec.seen] == [0, 1, 1, 2, 2, 3, 3]
    assert {step.num_steps for step, _ in rec.seen} == {4}


@attrs.define
class Double(GuidanceProcessor):
    def combine(self, pred, preds, step):
        return 2 * pred


@attrs.define
class PlusOne(GuidanceProcessor):
    def combine(self, pred, preds, step):
        torch.testing.assert_close(step.from_denoised(step.to_denoised(pred)), pred, rtol=1e-4, atol=1e-4)
        return pred + 1


def test_processors_combine_in_order_starting_from_cond():
    bundle = make()
    noise, conds = start(bundle)
    sigmas = schedule("flow", 2)
    seen = []
    with torch.no_grad():
        sample(bundle, noise, conds, sigmas, samplers.euler, guidance=[Double(), PlusOne()], callback=seen.append,
               disable=True)
        raw = bundle.network(noise, sigmas[0].expand(B), **conds["cond"])
    want = make_denoiser(bundle).to_denoised(noise, sigmas[0].expand(B), 2 * raw + 1)
    torch.testing.assert_close(seen[0]["denoised"], want)


def pag_patch(calls):
    def patch(q, k, v, attend):
        calls.append(q.shape[0])
        return v          # perturbed-attention guidance's identity attention
    return patch


@pytest.mark.parametrize("layer", ["blocks.1.attn", "transformer_blocks.1.attn1"])
def test_an_attention_patch_applies_to_its_branch_rows_only(layer):
    bundle, calls = make(), []
    perturbed = Branch("perturbed", cond="cond", layers=(layer,), patch=pag_patch(calls))
    rec = Recorder(extra=(perturbed,))
    noise, conds = start(bundle)
    with torch.no_grad():
        sample(bundle, noise, conds, schedule("flow", 3), samplers.euler, guidance=[CFG(2.0), rec], disable=True)
    assert bundle.batches == [3 * B] * 3            # cond, uncond and perturbed in one forward
    assert calls == [B] * 3                          # the patch saw the perturbed rows only
    layers = attention_layers(bundle.network)
    assert all(not a.routes for a in layers.values())
    den = make_denoiser(bundle)
    for step, preds in rec.seen:
        x_in, time = den.inputs(step.x, step.sigma)
        with torch.no_grad():
            plain = bundle.network(x_in, time, **conds["cond"])
            with patch_attention({"blocks.1.attn": layers["blocks.1.attn"]}, slice(None), lambda q, k, v, a: v):
                patched = bundle.network(x_in, time, **conds["cond"])
        torch.testing.assert_close(preds["cond"], plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(preds["perturbed"], patched, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(preds["perturbed"], preds["cond"])


def test_branches_are_deduplicated_by_name_and_conflicts_are_errors():
    bundle = make()
    noise, conds = start(bundle)
    sigmas = schedule("flow", 2)
    twice = [CFG(2.0), Recorder(extra=(Branch("uncond", cond="uncond"),))]
    with torch.no_grad():
        sample(bundle, noise, conds, sigmas, samplers.euler, guidance=twice, disable=True)
    assert bundle.batches == [2 * B] * 2
    clash = [CFG(2.0), Recorder(extra=(Branch("uncond", cond="short"),))]
    with pytest.raises(PluginError, match="two guidance processors declare different branches named 'uncond'"):
        sample(bundle, noise, conds, sigmas, samplers.euler, guidance=clash, disable=True)


def test_missing_conditioning_and_unknown_layers_are_errors():
    bundle = make()
    noise, conds = start(bundle)
    sigmas = schedule("flow", 2)
    with pytest.raises(PluginError, match="needs conditioning 'uncond', but the model provides only: cond"):
        sample(bundle, noise, {"cond": conds["cond"]}, sigmas, samplers.euler, guidance=[CFG(2.0)], disable=True)
    bad = Recorder(extra=(Branch("p", layers=("blocks.7.attn",), patch=lambda q, k, v, a: v),))
    with pytest.raises(ConfigError, match="unknown attention layer 'blocks.7.attn'"):
        sample(bundle, noise, conds, sigmas, samplers.euler, guidance=[bad], disable=True)


@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_start_from_noise_or_from_an_image(prediction_type):
    bundle = make(prediction_type)
    noise, conds = start(bundle)
    sigmas = schedule(prediction_type, 8)[3:]
    image = torch.randn(B, T, D, generator=torch.Generator().manual_seed(5))
    first = {}
    with torch.no_grad():
        for key, x0 in (("txt2img", None), ("img2img", image)):
            sample(bundle, noise, conds, sigmas, samplers.euler, x0=x0, disable=True,
                   callback=lambda info, key=key: first.setdefault(key, info["x"]))
    torch.testing.assert_close(first["txt2img"], noise * sigmas[0])
    torch.testing.assert_close(first["img2img"], add_noise(image, noise, sigmas[0], prediction_type))


def test_cfg_passes_the_guidance_conformance_check():
    from diffcore.testing.conformance import check_guidance_processor

    check_guidance_processor(CFG(scale=3.0, start=0.2, stop=0.8), make(), GenerationRequest(B))
