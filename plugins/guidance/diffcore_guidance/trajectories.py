"""Trajectories of a base model's own sampling, the training data of learned guidance.

A recording processor at the end of the guidance chain keeps, for every model evaluation, the
current sample ``img``, the conditional prediction ``cond_pred``, the chain's prediction so far
``pred`` (after CFG, if the chain has it), sigma, the step index and the conditioning. It also
keeps the raw -> x0 map of that evaluation, which is affine for every parametrisation:
``x0 = base + slope * raw`` (flow: ``base = x``, ``slope = -sigma``), so rewards on x0 can be
trained later without the sampler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
import torch

from diffcore.api import GenerationRequest, GuidanceProcessor, ModelBundle, StepInfo, sample

from diffcore_guidance.learned import conditioning_inputs

FIELDS = ("img", "pred", "cond_pred", "base", "slope", "timestep", "step_idx")


@attrs.define
class Recorder(GuidanceProcessor):
    """An identity processor that records what it sees (put it last in the chain)."""

    records: list[dict[str, torch.Tensor]] = attrs.Factory(list)

    def combine(self, pred: torch.Tensor, preds: dict[str, torch.Tensor], step: StepInfo) -> torch.Tensor:
        base = step.to_denoised(torch.zeros_like(pred))
        slope = (step.to_denoised(torch.ones_like(pred)) - base).flatten(1)[:, 0]
        batch = pred.shape[0]
        self.records.append({
            "img": step.x.detach(), "pred": pred.detach(), "cond_pred": preds["cond"].detach(), "base": base.detach(),
            "slope": slope.detach(), "timestep": step.sigma.reshape(-1).expand(batch).detach(),
            "step_idx": torch.full((batch,), step.step, dtype=torch.long, device=pred.device)})
        return pred


@attrs.define
class Trajectories:
    """Recorded model evaluations, stacked: every tensor has one row per (sample, evaluation)."""

    data: dict[str, torch.Tensor]
    txt: torch.Tensor | None = None
    vec: torch.Tensor | None = None
    cond: dict[str, torch.Tensor] = attrs.Factory(dict)

    def __len__(self) -> int:
        return self.data["img"].shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, Any]:
        """Rows ``index`` of everything (tensors stay where they are)."""
        out: dict[str, Any] = {k: v[index.to(v.device)] for k, v in self.data.items()}
        out["txt"] = self.txt[index.to(self.txt.device)] if self.txt is not None else None
        out["vec"] = self.vec[index.to(self.vec.device)] if self.vec is not None else None
        out["cond"] = {k: v[index.to(v.device)] for k, v in self.cond.items()}
        return out

    def to_denoised(self, batch: Mapping[str, Any]) -> Any:
        base, slope = batch["base"], batch["slope"]
        return lambda raw: base + slope.reshape(-1, *[1] * (raw.ndim - 1)) * raw


def collect_trajectories(bundle: ModelBundle, requests: Iterable[GenerationRequest], sampler: Any,
                         sigmas: torch.Tensor, *, guidance: Sequence[GuidanceProcessor] = (), seed: int = 0,
                         txt_key: str | None = "auto", vec_key: str | None = "auto") -> Trajectories:
    """Sample every request with ``guidance`` (e.g. CFG) and record each model evaluation."""
    device = next(bundle.network.parameters()).device
    generator = torch.Generator("cpu").manual_seed(seed)
    rows: list[dict[str, torch.Tensor]] = []
    txts, vecs, conds = [], [], []
    for request in requests:
        conditions = bundle.conditions(request)
        noise = torch.randn((request.batch, *bundle.latent_shape(request)), generator=generator).to(device)
        recorder = Recorder()
        with torch.no_grad():
            sample(bundle, noise, conditions, sigmas.to(device), sampler, guidance=[*guidance, recorder],
                   generator=generator, disable=True)
        cond = conditions["cond"]
        txt, vec = conditioning_inputs(bundle, cond, txt_key, vec_key)
        per_sample = {k: v for k, v in cond.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == request.batch}
        for record in recorder.records:
            rows.append(record)
            txts.append(txt)
            vecs.append(vec)
            conds.append(per_sample)
    data = {k: torch.cat([r[k] for r in rows]) for k in FIELDS}
    txt = torch.cat(txts) if txts and txts[0] is not None else None
    vec = torch.cat(vecs) if vecs and vecs[0] is not None else None
    cond = {k: torch.cat([c[k] for c in conds]) for k in (conds[0] if conds else {})}
    return Trajectories(data, txt, vec, cond)
