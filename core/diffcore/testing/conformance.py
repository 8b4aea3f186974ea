"""Conformance checks every guidance processor and every model family must pass.

Call them from your plugin's tests, e.g.::

    from diffcore.testing.conformance import check_guidance_processor
    check_guidance_processor(MyProcessor(scale=2.0), bundle, request)

Each check raises AssertionError with a message saying what the contract is.
"""

from __future__ import annotations

from typing import Any

import torch

from diffcore.models import GenerationRequest, ModelBundle
from diffcore.nn.attention import attention_layers
from diffcore.sampling.guidance import Branch, BranchPatch, GuidanceProcessor, StepInfo

PREDICTION_TYPES = ("flow", "epsilon", "v")


def _step(bundle: ModelBundle, x: torch.Tensor, step: int, num_steps: int,
          conditions: dict[str, Any] | None = None) -> StepInfo:
    from diffcore.sampling.denoisers import make_denoiser

    denoiser = make_denoiser(bundle)
    sigma = torch.full((x.shape[0],), 1.0 - step / num_steps * 0.9)
    return StepInfo(x=x, sigma=sigma, step=step, num_steps=num_steps, prediction_type=bundle.prediction_type,
                    to_denoised=lambda raw: denoiser.to_denoised(x, sigma, raw),
                    from_denoised=lambda d: denoiser.from_denoised(x, sigma, d), conditions=conditions or {},
                    bundle=bundle)


def check_model_family(bundle: ModelBundle, request: GenerationRequest, *, seed: int = 0) -> None:
    """The bundle's pieces agree with each other: shapes, conditions, determinism, layer names."""
    assert bundle.prediction_type in PREDICTION_TYPES, f"prediction_type must be one of {PREDICTION_TYPES}"
    conditions = bundle.conditions(request)
    assert "cond" in conditions, "conditions(request) must provide the 'cond' branch"
    shape = (request.batch, *bundle.latent_shape(request))
    seq_len = bundle.seq_len(request)
    assert seq_len is None or (isinstance(seq_len, int) and seq_len > 0), \
        f"seq_len(request) must be a positive int (image tokens) or None, got {seq_len!r}"
    for name in ("sequence_condition", "pooled_condition"):
        value = getattr(bundle, name)(conditions["cond"])
        assert value is None or (torch.is_tensor(value) and value.shape[0] == request.batch), \
            f"{name}(cond) must be None or a tensor with one row per sample"
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    sigma = torch.full((request.batch,), 0.5)
    with torch.no_grad():
        outs = [bundle.forward(x, sigma, **conditions[key]) for key in conditions]
        again = bundle.forward(x, sigma, **conditions["cond"])
    for key, out in zip(conditions, outs):
        assert out.shape == x.shape, f"forward with {key!r} returned {tuple(out.shape)}, expected {tuple(x.shape)}"
        assert torch.isfinite(out).all(), f"forward with {key!r} returned non-finite values"
    assert torch.equal(outs[0], again), "forward must be deterministic in eval mode"
    if len(outs) > 1 and bool(outs[0].abs().sum()):
        # each branch's kwargs concatenate along the batch, as the engine batches them
        both = {k: torch.cat([conditions["cond"][k], conditions["uncond"][k]]) if torch.is_tensor(conditions["cond"][k])
                else conditions["cond"][k] for k in conditions["cond"]}
        with torch.no_grad():
            batched = bundle.forward(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        torch.testing.assert_close(batched, torch.cat(outs[:2]), rtol=1e-4, atol=1e-5,
                                   msg="cond and uncond batched into one forward must equal two forwards")
    images = bundle.decode(x)
    assert images.ndim == 4 and images.shape[0] == request.batch, "decode must return (batch, C, H, W) images"
    layers = attention_layers(bundle.network)
    for name in layers:
        assert bundle.attention_alias(name) == name, f"attention_alias must map our own name {name!r} to itself"


def check_guidance_processor(processor: GuidanceProcessor, bundle: ModelBundle, request: GenerationRequest,
                             *, num_steps: int = 10, seed: int = 0) -> None:
    """Branches and patches are well-formed, combine keeps shape and dtype, never mutates its
    inputs, is deterministic (for the same step: a processor with state across steps, such as
    momentum, must give the same result when a step is combined again), honours its window, and
    a whole sampling run with it stays finite."""
    from diffcore.sampling.engine import sample
    from diffcore.sampling.samplers import euler

    conditions = bundle.conditions(request)
    shape = (request.batch, *bundle.latent_shape(request))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    for step in range(num_steps):
        info = _step(bundle, x, step, num_steps, conditions)
        if not processor.active(info):
            assert not (processor.start <= info.progress < processor.stop), "active() must follow start/stop"
            continue
        branches = processor.branches(info)
        assert all(isinstance(b, Branch) for b in branches), "branches() must return Branch objects"
        names = [b.name for b in branches]
        assert len(set(names)) == len(names) and "cond" not in names, "branch names must be unique and not 'cond'"
        for b in branches:
            assert b.cond in conditions, f"branch {b.name!r} uses conditioning {b.cond!r} the model does not provide"
        for bp in processor.patches(info):
            assert isinstance(bp, BranchPatch), "patches() must return BranchPatch objects"
            for target in filter(None, (bp.branch, bp.context)):
                assert target == "cond" or target in names, \
                    f"a patch targets branch {target!r}, which is neither 'cond' nor one of the processor's own branches"
        preds = {"cond": torch.randn(shape, generator=g), **{n: torch.randn(shape, generator=g) for n in names}}
        before = {k: v.clone() for k, v in preds.items()}
        out = processor.combine(preds["cond"], preds, info)
        again = processor.combine(preds["cond"], preds, info)
        assert out.shape == preds["cond"].shape and out.dtype == preds["cond"].dtype, "combine must keep shape/dtype"
        assert all(torch.equal(before[k], preds[k]) for k in preds), "combine must not modify its inputs"
        assert torch.equal(out, again), "combine must be deterministic"
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1) if bundle.prediction_type == "flow" else \
        torch.linspace(14.6, 0.0, num_steps + 1)
    with torch.no_grad():
        result = sample(bundle, noise, conditions, sigmas, euler, guidance=[processor], disable=True)
    assert result.shape == noise.shape and torch.isfinite(result).all(), "sampling with the processor must stay finite"


def identity_request(batch: int = 2, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(batch=batch, **kwargs)
