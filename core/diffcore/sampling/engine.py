"""The sampling engine: a model bundle, a schedule, a sampler and a guidance chain put together.

Every model evaluation the sampler asks for becomes one guided step:

1. the active processors declare their branches (``cond`` always runs), deduplicated by name;
2. branches whose conditioning tensors have equal shapes (and equal non-tensor values) run as
   one forward, their rows concatenated along the batch; a branch's attention patch applies to
   its own rows only (``diffcore.nn.attention.patch_attention``);
   processors' ``BranchPatch``es patch the rows of a branch that runs anyway (``cond`` too), and
   one with a ``context`` branch sees that branch's rows of the same forward;
3. the processors' ``combine`` run in order on the raw predictions, starting from ``cond``;
4. the guided raw prediction becomes the x0 estimate the sampler sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from diffcore.errors import PluginError
from diffcore.models import ModelBundle
from diffcore.nn.attention import attention_layers, patch_attention, resolve_layers
from diffcore.sampling.denoisers import Denoiser, add_noise, make_denoiser
from diffcore.sampling.guidance import COND, Branch, BranchPatch, GuidanceProcessor, StepInfo

__all__ = ["GuidedDenoiser", "add_noise", "sample"]


def sample(bundle: ModelBundle, noise: torch.Tensor, conditions: Mapping[str, Mapping[str, Any]],
           sigmas: torch.Tensor, sampler: Callable[..., torch.Tensor], guidance: Sequence[GuidanceProcessor] = (),
           callback: Callable[[dict[str, Any]], None] | None = None, generator: torch.Generator | None = None,
           disable: bool | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``sampler`` over ``sigmas`` from ``noise`` and return the final latents.

    txt2img starts from ``sigmas[0] * noise`` (``alpha * 0 + sigma * noise``; for flow at sigma 1
    that is the noise itself). With ``x0`` (img2img) it starts from
    ``alpha(sigmas[0]) * x0 + sigmas[0] * noise``.
    """
    sigmas = sigmas.to(noise.device)
    model = GuidedDenoiser(bundle, conditions, guidance, sigmas)
    x = noise * sigmas[0] if x0 is None else add_noise(x0, noise, sigmas[0], bundle.prediction_type)
    return sampler(model, x, sigmas, extra_args={}, callback=callback, disable=disable, generator=generator)


class GuidedDenoiser:
    """The sampler's ``model``: ``(x, sigma) -> x0`` with the guidance chain applied in raw space."""

    def __init__(self, bundle: ModelBundle, conditions: Mapping[str, Mapping[str, Any]],
                 guidance: Sequence[GuidanceProcessor], sigmas: torch.Tensor):
        self.bundle = bundle
        self.denoiser: Denoiser = make_denoiser(bundle)
        self.conditions = conditions
        self.guidance = list(guidance)
        self.sigmas = sigmas
        self._layers: dict[tuple[str, ...], dict[str, Any]] = {}

    def alpha(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.denoiser.alpha(sigma)

    def step_index(self, sigma: torch.Tensor) -> int:
        """The schedule step this sigma belongs to: the nearest scheduled sigma (a Heun corrector
        at ``sigmas[i + 1]`` counts as step i + 1, as the next step's processors see it)."""
        return int((self.sigmas[:-1] - sigma.reshape(-1)[0]).abs().argmin())

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        den = self.denoiser
        info = StepInfo(x=x, sigma=sigma, step=self.step_index(sigma), num_steps=len(self.sigmas) - 1,
                        prediction_type=self.bundle.prediction_type,
                        to_denoised=lambda raw: den.to_denoised(x, sigma, raw),
                        from_denoised=lambda x0: den.from_denoised(x, sigma, x0), conditions=self.conditions,
                        bundle=self.bundle)
        active = [p for p in self.guidance if p.active(info)]
        branches = {"cond": COND}
        for processor in active:
            for branch in processor.branches(info):
                known = branches.setdefault(branch.name, branch)
                if known != branch or known.patch != branch.patch:
                    raise PluginError(f"two guidance processors declare different branches named {branch.name!r}: "
                                      f"{known} and {branch}")
        patches = [(processor, bp) for processor in active for bp in processor.patches(info)]
        for processor, bp in patches:
            for name in filter(None, (bp.branch, bp.context)):
                if name not in branches:
                    raise PluginError(f"{type(processor).__name__} patches attention on branch {name!r}, which no "
                                      f"active processor runs this step (running: {', '.join(branches)})")
        x_in, time = den.inputs(x, sigma)
        preds = self.run_branches(list(branches.values()), x_in, time, extra, [bp for _, bp in patches])
        pred = preds["cond"]
        for processor in active:
            pred = processor.combine(pred, preds, info)
        return den.to_denoised(x, sigma, pred)

    def run_branches(self, branches: list[Branch], x_in: torch.Tensor, time: torch.Tensor,
                     extra: Mapping[str, Any], patches: Sequence[BranchPatch] = ()) -> dict[str, torch.Tensor]:
        """Raw predictions per branch name, one forward per group of batchable branches."""
        preds = {}
        groups = self._groups(branches)
        where = {b.name: (i, j) for i, group in enumerate(groups) for j, b in enumerate(group)}
        for bp in patches:
            if bp.context is not None and where[bp.context][0] != where[bp.branch][0]:
                raise PluginError(f"an attention patch on branch {bp.branch!r} needs the rows of {bp.context!r} in the "
                                  f"same forward, but their conditioning cannot be batched together (different keys, "
                                  f"shapes or values)")
        for index, group in enumerate(groups):
            kwargs = [{**self._conditioning(b), **extra} for b in group]
            n, batch = len(group), x_in.shape[0]
            if n == 1:
                args = (x_in, time, kwargs[0])
            else:
                args = (torch.cat([x_in] * n), torch.cat([time] * n),
                        {k: torch.cat([kw[k] for kw in kwargs]) if torch.is_tensor(v) else v
                         for k, v in kwargs[0].items()})
            rows = [slice(j * batch, (j + 1) * batch) for j in range(n)]
            with contextlib.ExitStack() as stack:
                for j, b in enumerate(group):
                    if b.patch is not None:
                        stack.enter_context(patch_attention(self._resolve(b.layers), rows[j], b.patch))
                for bp in patches:
                    if where[bp.branch][0] == index:
                        context = rows[where[bp.context][1]] if bp.context is not None else None
                        stack.enter_context(patch_attention(self._resolve(bp.layers), rows[where[bp.branch][1]],
                                                            bp.patch, context=context))
                out = self.bundle.forward(args[0], args[1], **args[2])
            for j, b in enumerate(group):
                preds[b.name] = out[j * batch:(j + 1) * batch] if n > 1 else out
        return preds

    def _conditioning(self, branch: Branch) -> Mapping[str, Any]:
        if branch.cond not in self.conditions:
            raise PluginError(f"guidance branch {branch.name!r} needs conditioning {branch.cond!r}, but the model "
                              f"provides only: {', '.join(self.conditions)}")
        return self.conditions[branch.cond]

    def _groups(self, branches: list[Branch]) -> list[list[Branch]]:
        """Branches in order, grouped where one forward can carry them (same keys, same tensor
        shapes and dtypes, equal non-tensor values)."""
        groups: list[list[Branch]] = []
        for b in branches:
            for group in groups:
                if _batchable(self._conditioning(group[0]), self._conditioning(b)):
                    group.append(b)
                    break
            else:
                groups.append([b])
        return groups

    def _resolve(self, layers: tuple[str, ...]) -> dict[str, Any]:
        """Attention layers by name (a patch without names applies to every attention layer)."""
        if layers not in self._layers:
            net = self.bundle.network
            self._layers[layers] = (resolve_layers(net, list(layers), self.bundle.attention_alias) if layers
                                    else attention_layers(net))
        return self._layers[layers]


def _batchable(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for k, va in a.items():
        vb = b[k]
        if torch.is_tensor(va) or torch.is_tensor(vb):
            if not (torch.is_tensor(va) and torch.is_tensor(vb)) or va.shape != vb.shape or va.dtype != vb.dtype \
                    or va.ndim == 0:
                return False
        elif not _equal(va, vb):
            return False
    return True


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:   # values whose == is not a plain truth value (arrays, ...)
        return a is b
