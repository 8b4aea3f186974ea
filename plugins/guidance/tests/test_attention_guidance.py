"""PAG, NAG and NAG-PAG on the DiT family: what they patch, for whom, at what cost."""

import pytest
import torch
from guidance_helpers import LAYERS, ForwardCounter, run

from diffcore.api import (ConfigError, GuidanceProcessor, PluginError, attention_layers, patch_attention, registry,
                          resolve_layers)
from diffcore.testing.conformance import check_guidance_processor
from diffcore_guidance.attention import NAG, NAGPAG, PAG, identity_attention, nag_combine
from diffcore_guidance.config import NAGPAGConfig


class Keep(GuidanceProcessor):
    """Records the chain's prediction at every evaluation."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def combine(self, pred, preds, step):
        self.seen.append((step.x.clone(), step.sigma.clone(), pred.clone()))
        return pred


def cfg(scale):
    comp = registry("guidance").get("cfg")
    return comp.factory(comp.config(scale=scale))


@pytest.mark.parametrize("processor", [
    PAG(layers=["blocks.1.attn"]), PAG(scale=2.0, layers=["*"], start=0.3), NAG(), NAG(layers=["blocks.0.attn"]),
    NAGPAG(layers=LAYERS), NAGPAG(scale=10.0, tau=1.5, alpha=0.5, layers=["transformer_blocks.1.attn"])],
    ids=["pag", "pag-all-window", "nag", "nag-one-layer", "nag-pag", "nag-pag-alias"])
def test_conformance_on_dit(processor, dit, req):
    check_guidance_processor(processor, dit, req)


def test_pag_without_layers_is_plain_sampling(dit, req):
    with ForwardCounter(dit.network) as counter:
        guided = run(dit, [PAG(layers=[])], req)
    assert counter.batches == [2] * 4
    assert torch.equal(guided, run(dit, [], req))


def test_pag_is_one_batched_extra_pass_with_identity_attention_on_its_rows(dit, req):
    keep = Keep()
    with ForwardCounter(dit.network) as counter:
        run(dit, [PAG(scale=2.0, layers=["blocks.1.attn"]), keep], req)
    assert counter.batches == [4] * 4                    # cond + perturbed cond, one forward a step
    y = dit.conditions(req)["cond"]["y"]
    layers = resolve_layers(dit.network, ["blocks.1.attn"])
    for x, sigma, pred in keep.seen:
        with torch.no_grad():
            cond = dit.forward(x, sigma, y=y)
            with patch_attention(layers, slice(None), lambda q, k, v, attend: v):
                perturbed = dit.forward(x, sigma, y=y)
        torch.testing.assert_close(pred, cond + 2.0 * (cond - perturbed), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cond, perturbed)
    assert all(not layer.routes for layer in attention_layers(dit.network).values())


def test_pag_after_cfg_adds_to_the_guided_prediction(dit, req):
    with ForwardCounter(dit.network) as counter:
        both = run(dit, [cfg(3.0), PAG(scale=1.5, layers=["blocks.0.attn"])], req)
    assert counter.batches == [6] * 4                    # cond, uncond, perturbed
    assert not torch.allclose(both, run(dit, [cfg(3.0)], req))


def test_nag_pag_costs_no_forward_pass(dit, req):
    with ForwardCounter(dit.network) as plain:
        base = run(dit, [], req)
    with ForwardCounter(dit.network) as counted:
        guided = run(dit, [NAGPAG(layers=LAYERS)], req)
    assert counted.batches == plain.batches == [2] * 4
    assert (guided - base).abs().max() > 1e-3           # and it does guide


def test_nag_pag_patches_the_cond_rows_with_normalised_identity_extrapolation(dit, req):
    proc, keep = NAGPAG(scale=4.0, tau=2.0, alpha=0.5, layers=["blocks.1.attn"]), Keep()
    with ForwardCounter(dit.network) as counter:
        run(dit, [cfg(2.0), proc, keep], req)
    assert counter.batches == [4] * 4                    # with CFG: cond + uncond only
    y = dit.conditions(req)["cond"]["y"]
    layers = resolve_layers(dit.network, ["blocks.1.attn"])

    def reference(q, k, v, attend):
        return nag_combine(attend(q, k, v), v, 5.0, 2.0, 0.5)

    u = torch.full_like(y, dit.num_classes)
    for x, sigma, pred in keep.seen:
        with torch.no_grad():
            with patch_attention(layers, slice(None), reference):
                cond = dit.forward(x, sigma, y=y)
            uncond = dit.forward(x, sigma, y=u)          # the uncond rows are not patched
        torch.testing.assert_close(pred, uncond + 2.0 * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_nag_pag_scale_zero_is_plain_sampling(dit, req):
    assert torch.equal(run(dit, [NAGPAG(scale=0.0, layers=LAYERS)], req), run(dit, [], req))


def test_nag_reads_the_negative_rows_of_the_same_forward(dit, req):
    proc, keep = NAG(scale=3.0, tau=2.5, alpha=0.5, layers=["blocks.1.attn"]), Keep()
    with ForwardCounter(dit.network) as counter:
        run(dit, [proc, keep], req)
    assert counter.batches == [4] * 4                    # cond + negative, batched
    y = dit.conditions(req)["cond"]["y"]
    u = torch.full_like(y, dit.num_classes)
    layers = resolve_layers(dit.network, ["blocks.1.attn"])
    op = layers["blocks.1.attn"]
    for x, sigma, pred in keep.seen:
        captured = {}
        hook = op.register_forward_pre_hook(lambda m, args: captured.update(k=args[1], v=args[2]))
        with torch.no_grad():
            dit.forward(x, sigma, y=u)                   # the negative branch alone: its keys and values
        hook.remove()

        def reference(q, k, v, attend):
            return nag_combine(attend(q, k, v), attend(q, captured["k"], captured["v"]), 3.0, 2.5, 0.5)

        with torch.no_grad(), patch_attention(layers, slice(None), reference):
            want = dit.forward(x, sigma, y=y)
        torch.testing.assert_close(pred, want, rtol=1e-5, atol=1e-5)


def test_nag_shares_the_uncond_branch_with_cfg(dit, req):
    with ForwardCounter(dit.network) as counter:
        guided = run(dit, [cfg(3.0), NAG(layers=["*"])], req)
    assert counter.batches == [4] * 4
    assert not torch.allclose(guided, run(dit, [cfg(3.0)], req))


def test_nag_scale_one_is_plain_sampling(dit, req):
    with ForwardCounter(dit.network) as counter:
        out = run(dit, [NAG(scale=1.0)], req)
    assert counter.batches == [2] * 4
    assert torch.equal(out, run(dit, [], req))


def test_nag_combine_limits():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    torch.testing.assert_close(nag_combine(pos, neg, 1.0, 2.5, 0.7), pos)          # phi = 1: nothing to extrapolate
    torch.testing.assert_close(nag_combine(pos, neg, 8.0, 2.5, 0.0), pos)          # alpha = 0: the positive output
    guided = nag_combine(pos, neg, 50.0, 1.5, 1.0)                                 # alpha = 1: the clipped extrapolation
    ratio = guided.abs().sum((1, 3)) / pos.abs().sum((1, 3))
    assert ratio.max() <= 1.5 + 1e-5 and ratio.min() > 1.4                          # clipped at tau
    same = nag_combine(pos, pos, 5.0, 2.5, 0.5)                                     # Z- = Z+: no change
    torch.testing.assert_close(same, pos)
    assert torch.isfinite(nag_combine(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 3.0, 2.5, 0.5)).all()


def test_identity_attention_refuses_cross_attention():
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(PluginError, match="4 queries and 6 keys"):
        identity_attention(q, kv, kv)


def test_unknown_layers_are_errors_listing_the_model_layers(dit, req):
    for proc in (PAG(layers=["blocks.9.attn"]), NAGPAG(), NAG(layers=["blocks.0.atn"])):
        with pytest.raises(ConfigError, match=r"this model has: blocks.0.attn .. blocks.1.attn"):
            run(dit, [proc], req, steps=1)
    with pytest.raises(ConfigError, match="pattern 'double_blocks.\\*' matches no layer"):
        run(dit, [NAGPAG(layers=["double_blocks.*"])], req, steps=1)


def test_diffusers_names_and_patterns_select_the_same_layers(dit, req):
    ours = run(dit, [NAGPAG(layers=["blocks.0.attn", "blocks.1.attn"])], req)
    assert torch.equal(run(dit, [NAGPAG(layers=["transformer_blocks.0.attn1", "transformer_blocks.1.attn"])], req), ours)
    assert torch.equal(run(dit, [NAGPAG(layers=["blocks.*.attn"])], req), ours)


def test_nag_pag_config_bounds_and_defaults():
    assert NAGPAGConfig().scale == 3.0
    assert NAGPAGConfig().layers == ["transformer_blocks.8.attn", "transformer_blocks.12.attn",
                                     "transformer_blocks.16.attn"]
    for bad in (-0.1, 10.5):
        with pytest.raises(ValueError):
            NAGPAGConfig(scale=bad)
