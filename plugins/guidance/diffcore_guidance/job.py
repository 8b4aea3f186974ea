"""The ``train-guidance`` job: collect a base model's own sampling trajectories, train a guidance
model on them, save it (and say how it does).

    [job]
    kind = "train-guidance"
    output_dir = "outputs/guidance-digits"
    objective = "reward"          # or "cfg-distill"
    num_samples = 64
    sampling_steps = 10
    train_steps = 300

    [model]
    family = "dit"
    checkpoint = "outputs/dit-digits/checkpoints/step-002000"

    [guidance_model]
    type = "conv"

    [reward]
    name = "classifier"
    path = "digit_classifier.pt"

Objectives:

- ``reward``: maximise a reward (a ``rewards`` component: ``diffcore rewards`` lists them) of the
  predicted clean sample ``x0(pred + s * correction)`` at every recorded step, ``pred`` being
  what the chain gives with ``cfg_scale``;
- ``cfg-distill``: learn CFG's effect: trajectories are sampled with CFG at
  ``teacher_cfg_scale`` and the target correction is ``(pred_cfg - pred_cond) / s``, so the
  learned guidance reproduces CFG from the conditional branch alone (one forward a step).

Writes ``guidance_model.safetensors`` (use it with ``[[guidance]] name = "learned"``),
``log.jsonl``, ``checkpoints/step-*/`` and, with ``eval_samples``, ``summary.json`` comparing
samples from held-out seeds with and without the learned guidance.

Trajectories and evaluation samples come from the core's generation pipeline
(``diffcore.api.Pipeline``: device, default schedule, steps and CFG as every job chooses them).
This module stays torch-free at import (``diffcore list`` reads its config classes) and imports
torch inside ``run_train_guidance``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v

from diffcore.api import JobContext, JobSettings, Spec, component


@attrs.define
class TrainGuidanceSettings(JobSettings):
    objective: Literal["reward", "cfg-distill"] = "reward"
    # trajectories
    num_samples: int = attrs.field(default=64, validator=v.gt(0))
    batch_size: int = attrs.field(default=16, validator=v.gt(0))
    sampling_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))   # None: the model's
    class_label: int | None = attrs.field(default=None, validator=v.optional(v.ge(0)))
    prompt: str | list[str] | None = None
    cfg_scale: float = attrs.field(default=1.0, validator=v.ge(0))          # the chain the model is trained after
    teacher_cfg_scale: float = attrs.field(default=3.0, validator=v.ge(0))  # cfg-distill's target
    # training
    train_steps: int = attrs.field(default=200, validator=v.gt(0))
    train_batch: int = attrs.field(default=64, validator=v.gt(0))
    lr: float = attrs.field(default=1e-3, validator=v.gt(0))
    weight_decay: float = attrs.field(default=0.0, validator=v.ge(0))
    max_grad_norm: float = attrs.field(default=1.0, validator=v.ge(0))      # 0: no clipping
    guidance_scale: float = attrs.field(default=1.0, validator=v.gt(0))
    reg_weight: float = attrs.field(default=0.0, validator=v.ge(0))
    num_guidance_steps: int = attrs.field(default=0, validator=v.ge(0))
    guidance_lr: float = attrs.field(default=0.1, validator=v.gt(0))
    checkpoint_every: int = attrs.field(default=0, validator=v.ge(0))       # 0: only the final model
    log_every: int = attrs.field(default=10, validator=v.gt(0))
    eval_samples: int = attrs.field(default=0, validator=v.ge(0))           # held-out seeds for summary.json


@attrs.define
class GuidanceModelSpec:
    """The guidance model to train; channels and conditioning sizes come from the base model."""

    type: Literal["mlp", "attention", "conv"] = "conv"
    hidden: int = attrs.field(default=64, validator=v.gt(0))
    layers: int = attrs.field(default=3, validator=v.gt(0))
    heads: int = attrs.field(default=4, validator=v.gt(0))
    patch: int = attrs.field(default=1, validator=v.gt(0))
    txt_key: str = "auto"
    vec_key: str = "auto"


@attrs.define(kw_only=True)
class TrainGuidanceJob:
    job: TrainGuidanceSettings = attrs.Factory(TrainGuidanceSettings)
    model: Spec = component("models")
    sampler: Spec = component("samplers", default={"name": "euler"})
    schedule: Spec | None = component("schedules", optional=True)
    guidance_model: GuidanceModelSpec = attrs.Factory(GuidanceModelSpec)
    reward: Spec | None = component("rewards", optional=True)

    renamed: ClassVar[dict[str, str]] = {"job.num_steps": "job.sampling_steps"}


def run_train_guidance(config: TrainGuidanceJob, ctx: JobContext) -> dict[str, Any]:
    import torch

    from diffcore.api import ConfigError, Pipeline, is_main_process

    from diffcore_guidance.learned import LearnedGuidance
    from diffcore_guidance.models import save_guidance_model
    from diffcore_guidance.training import GuidanceModelTrainer
    from diffcore_guidance.trajectories import collect_trajectories

    s = config.job
    if s.objective == "reward" and config.reward is None:
        raise ConfigError("objective = \"reward\" needs a [reward] table naming a reward (diffcore rewards "
                          "lists them)", path="reward")
    torch.manual_seed(s.seed)
    pipeline = Pipeline.build(config.model, config.sampler, config.schedule, device=s.device)
    bundle, device = pipeline.bundle, pipeline.device
    requests = _requests(s, bundle, device, s.teacher_cfg_scale if s.objective == "cfg-distill" else s.cfg_scale)
    spec = config.guidance_model
    data = collect_trajectories(bundle, requests, pipeline.sampler, pipeline.sigmas(requests[0]),
                                guidance=pipeline.chain(requests[0]), seed=s.seed, txt_key=spec.txt_key,
                                vec_key=spec.vec_key)
    model = _build_model(spec, data, bundle).to(device)
    reward_fn = config.reward.build() if config.reward is not None else None
    trainer = GuidanceModelTrainer(model, lr=s.lr, weight_decay=s.weight_decay, max_grad_norm=s.max_grad_norm,
                                   guidance_scale=s.guidance_scale, reg_weight=s.reg_weight)
    out = ctx.output_dir
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("a") if main else None
    generator = torch.Generator("cpu").manual_seed(s.seed)
    metrics: dict[str, float] = {}
    try:
        for step in range(1, s.train_steps + 1):
            index = torch.randint(len(data), (min(s.train_batch, len(data)),), generator=generator)
            b = data.batch(index)
            if s.objective == "cfg-distill":
                target = (b["pred"] - b["cond_pred"]) / s.guidance_scale
                metrics = trainer.train_step(b["img"], b["cond_pred"], b["txt"], b["vec"], b["timestep"],
                                             b["step_idx"], target_correction=target)
            else:
                metrics = trainer.train_from_reward(b["img"], b["pred"], b["txt"], b["vec"], b["timestep"],
                                                    b["step_idx"], reward_fn, to_denoised=data.to_denoised(b),
                                                    cond=b["cond"], num_guidance_steps=s.num_guidance_steps,
                                                    guidance_lr=s.guidance_lr)
            if log is not None and (step % s.log_every == 0 or step == s.train_steps):
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if main and s.checkpoint_every and step % s.checkpoint_every == 0:
                trainer.save_checkpoint(out / "checkpoints" / f"step-{step:06d}")
    finally:
        if log is not None:
            log.close()
    model.eval()
    summary: dict[str, Any] = {"objective": s.objective, "records": len(data), "train_steps": s.train_steps,
                               "final": metrics}
    if main:
        save_guidance_model(model, out / "guidance_model.safetensors")
    if s.eval_samples:
        learned = LearnedGuidance(model=model, guidance_scale=s.guidance_scale, txt_key=spec.txt_key,
                                  vec_key=spec.vec_key)
        summary["eval"] = _evaluate(s, pipeline, learned, reward_fn)
    if main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _requests(s: TrainGuidanceSettings, bundle: Any, device: Any, cfg_scale: float, count: int | None = None,
              offset: int = 0) -> list[Any]:
    """Generation requests of ``batch_size``: every class in turn for class-conditional models
    (or ``class_label``), the prompts in turn for text ones, else unconditional batches."""
    import torch

    from diffcore.api import GenerationRequest

    total = count or s.num_samples
    prompts = [s.prompt] if isinstance(s.prompt, str) else list(s.prompt or [])
    out = []
    for start in range(0, total, s.batch_size):
        n = min(s.batch_size, total - start)
        index = torch.arange(offset + start, offset + start + n)
        fields: dict[str, Any] = {"batch": n, "sampling_steps": s.sampling_steps, "cfg_scale": cfg_scale}
        if bundle.num_classes is not None:
            labels = torch.full((n,), s.class_label) if s.class_label is not None else index % bundle.num_classes
            fields["labels"] = labels.to(device)
        elif prompts:
            fields["prompts"] = [prompts[i % len(prompts)] for i in index.tolist()]
        out.append(GenerationRequest(**fields))
    return out


def _build_model(spec: GuidanceModelSpec, data: Any, bundle: Any) -> Any:
    from diffcore_guidance.models import AttentionGuidanceModel, ConvGuidanceModel, MLPGuidanceModel

    img = data.data["img"]
    channels = img.shape[1] if img.ndim == 4 else img.shape[-1]
    cond: dict[str, int] = {}
    if data.txt is not None:
        cond["txt_dim"] = data.txt.shape[-1]
    if data.vec is not None:
        if data.vec.is_floating_point():
            cond["vec_dim"] = data.vec.shape[-1]
        else:
            cond["num_classes"] = int(getattr(bundle, "num_classes", int(data.vec.max())))
    if spec.type == "mlp":
        return MLPGuidanceModel(channels, hidden_dim=spec.hidden, num_layers=spec.layers, patch=spec.patch, **cond)
    if spec.type == "attention":
        return AttentionGuidanceModel(channels, hidden_dim=spec.hidden, num_heads=spec.heads, num_layers=spec.layers,
                                      patch=spec.patch, **cond)
    return ConvGuidanceModel(channels, hidden_channels=spec.hidden, num_blocks=spec.layers, patch=spec.patch, **cond)


def _evaluate(s: TrainGuidanceSettings, pipeline: Any, learned: Any, reward_fn: Any) -> dict[str, float]:
    """Final samples from held-out seeds (``seed + 1``) without and with the learned guidance;
    the reward of each (reward objective) or the distance to the CFG teacher (cfg-distill)."""
    import attrs
    import torch

    requests = _requests(s, pipeline.bundle, pipeline.device, s.cfg_scale, count=s.eval_samples,
                         offset=s.num_samples)
    runs = {"base": (s.cfg_scale, []), "learned": (s.cfg_scale, [learned])}   # (CFG scale, guidance after CFG)
    if s.objective == "cfg-distill":
        runs = {"base": (1.0, []), "learned": (1.0, [learned]), "teacher": (s.teacher_cfg_scale, [])}
    finals: dict[str, list[Any]] = {k: [] for k in runs}
    for name, (scale, guidance) in runs.items():
        run = attrs.evolve(pipeline, guidance=guidance)
        generator = torch.Generator("cpu").manual_seed(s.seed + 1)
        for request in requests:
            finals[name].append(run.latents(attrs.evolve(request, cfg_scale=scale), generator=generator))
    result: dict[str, float] = {}
    if s.objective == "cfg-distill":
        teacher = torch.cat(finals["teacher"])
        for name in ("base", "learned"):
            result[f"{name}_mse_to_teacher"] = float((torch.cat(finals[name]) - teacher).pow(2).mean())
    elif reward_fn is not None:
        conds = [pipeline.bundle.conditions(request)["cond"] for request in requests]
        with torch.no_grad():
            for name in ("base", "learned"):
                scores = [reward_fn(x, c) for x, c in zip(finals[name], conds)]
                result[f"{name}_reward"] = float(torch.cat(scores).mean())
    return result
