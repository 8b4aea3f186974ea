"""Patches on branches that run anyway (``BranchPatch``): composition, context rows, errors;
layer patterns; the conditioning a processor sees."""

import attrs
import pytest
import torch
from test_sampling_engine import B, Recorder, make, schedule, start

from diffcore.errors import ConfigError, PluginError
from diffcore.nn.attention import AttentionContext, attention_layers, patch_attention, resolve_layers
from diffcore.sampling import samplers
from diffcore.sampling.cfg import CFG
from diffcore.sampling.engine import sample
from diffcore.sampling.guidance import UNCOND, BranchPatch, GuidanceProcessor


@attrs.define
class Patching(GuidanceProcessor):
    """Declares ``extra`` branches and ``patches``; records the steps it sees."""

    extra: tuple = ()
    patch_list: tuple = ()
    seen: list = attrs.Factory(list)

    def branches(self, step):
        return list(self.extra)

    def patches(self, step):
        return list(self.patch_list)

    def combine(self, pred, preds, step):
        self.seen.append(step)
        return pred


def run(bundle, guidance, steps=2):
    noise, conds = start(bundle)
    with torch.no_grad():
        return sample(bundle, noise, conds, schedule("flow", steps), samplers.euler, guidance=guidance, disable=True)


def test_a_cond_patch_costs_no_forward_and_equals_patching_the_network():
    bundle = make()
    double = BranchPatch(lambda q, k, v, attend: 2 * attend(q, k, v), layers=("blocks.1.attn",))
    got = run(bundle, [Patching(patch_list=(double,))])
    assert bundle.batches == [B] * 2
    layer = resolve_layers(bundle.network, ["blocks.1.attn"])
    with patch_attention(layer, slice(None), lambda q, k, v, attend: 2 * attend(q, k, v)):
        want = run(bundle, [])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, run(bundle, []))


def test_patches_on_the_same_rows_compose_in_processor_order():
    calls = []

    def first(q, k, v, attend):
        out = attend(q, k, v) + 1
        calls.append("first")
        return out

    def second(q, k, v, attend):
        out = 3 * attend(q, k, v)       # attend is the first patch here
        calls.append("second")
        return out

    bundle = make()
    got = run(bundle, [Patching(patch_list=(BranchPatch(first),)), Patching(patch_list=(BranchPatch(second),))], 1)
    assert calls == ["first", "second"] * 2          # two attention layers, each patched once by both
    with patch_attention(attention_layers(bundle.network), slice(None),
                         lambda q, k, v, attend: 3 * (attend(q, k, v) + 1)):
        want = run(bundle, [], 1)
    torch.testing.assert_close(got, want)


def test_a_context_patch_sees_the_other_branch_rows_of_the_same_forward():
    bundle, seen = make(), {}

    def patch(q, k, v, attend, *, context):
        assert isinstance(context, AttentionContext)
        seen.update(q=q, k=k, context=context)
        return context.attend(q, context.k, context.v)   # attend over the uncond keys and values

    proc = Patching(extra=(UNCOND,), patch_list=(BranchPatch(patch, ("blocks.0.attn",), "cond", "uncond"),))
    run(bundle, [CFG(2.0), proc], 1)
    assert bundle.batches == [2 * B]                 # cond and uncond in one forward, as for CFG alone
    assert seen["q"].shape[0] == seen["context"].k.shape[0] == B
    assert not torch.equal(seen["k"], seen["context"].k)


def test_patch_errors_name_the_branch():
    bundle = make()
    orphan = Patching(patch_list=(BranchPatch(lambda q, k, v, a: v, branch="perturbed"),))
    with pytest.raises(PluginError, match="patches attention on branch 'perturbed', which no active processor runs"):
        run(bundle, [orphan])
    apart = Patching(extra=(UNCOND,), patch_list=(BranchPatch(lambda q, k, v, a, context: v, context="uncond"),))
    noise, conds = start(bundle)
    conds = {"cond": conds["cond"], "uncond": conds["short"]}   # another context length: not batchable
    with pytest.raises(PluginError, match="needs the rows of 'uncond' in the same forward"):
        sample(bundle, noise, conds, schedule("flow", 1), samplers.euler, guidance=[apart], disable=True)
    assert all(not a.routes for a in attention_layers(bundle.network).values())


def test_layer_patterns():
    net = make().network
    assert list(resolve_layers(net, ["*"])) == ["blocks.0.attn", "blocks.1.attn"]
    assert list(resolve_layers(net, ["blocks.[1].attn"])) == ["blocks.1.attn"]
    with pytest.raises(ConfigError, match="pattern 'double_blocks.\\*' matches no layer; this model has: blocks.0.attn"):
        resolve_layers(net, ["double_blocks.*"])


def test_processors_see_the_conditioning():
    bundle, proc = make(), Patching()
    noise, conds = start(bundle)
    with torch.no_grad():
        sample(bundle, noise, conds, schedule("flow", 1), samplers.euler, guidance=[proc, Recorder()], disable=True)
    assert proc.seen[0].conditions["cond"] is conds["cond"]
