"""The ``train`` job: a model family, a dataset and a trainer, run through ``training.loop``.

    [job]
    kind = "train"
    output_dir = "outputs/dit-digits"
    steps = 2000
    batch_size = 64
    lr = 3e-4

    [model]
    family = "dit"
    variant = "digits"

    [dataset]
    name = "digits"

It writes ``log.jsonl``, ``samples/step-*.png`` previews (EMA weights, CFG), checkpoints under
``checkpoints/step-*/`` and, at the end, ``grid.png``: ``final_grid.samples_per_class`` samples
of every class, one class per row, enlarged ``final_grid.upscale`` times (nearest neighbour; the
original size then goes to ``grid-small.png``). ``resume = "latest"`` continues the newest
checkpoint exactly.
Imports no torch until it runs.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v

from diffcore.config.spec import Spec, component
from diffcore.jobs import JobContext, JobSettings


@attrs.define
class FinalGrid:
    """The class grid sampled with the EMA weights when training ends (previews use its layout too)."""

    samples_per_class: int = attrs.field(default=8, validator=v.gt(0))
    cfg_scale: float = attrs.field(default=3.0, validator=v.ge(0))
    steps: int = attrs.field(default=50, validator=v.gt(0))
    upscale: int = attrs.field(default=1, validator=[v.ge(1), v.le(32)])   # grid.png enlarged, nearest neighbour


@attrs.define
class TrainSettings(JobSettings):
    """``batch_size`` is the global batch of one forward (split across processes); one optimizer
    step sees ``batch_size * grad_accum`` samples."""

    steps: int = attrs.field(default=1000, validator=v.gt(0))
    batch_size: int = attrs.field(default=64, validator=v.gt(0))
    grad_accum: int = attrs.field(default=1, validator=v.gt(0))
    lr: float = attrs.field(default=1e-4, validator=v.gt(0))
    weight_decay: float = attrs.field(default=0.0, validator=v.ge(0))
    optimizer: Literal["adamw", "muon"] = "adamw"
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float = attrs.field(default=1.0, validator=v.ge(0))   # 0: no clipping
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float = attrs.field(default=0.9999, validator=[v.ge(0), v.lt(1)])
    ema_warmup: bool = True
    sample_every: int = attrs.field(default=0, validator=v.ge(0))        # 0: no previews
    sample_steps: int = attrs.field(default=28, validator=v.gt(0))
    sample_cfg: float = attrs.field(default=3.0, validator=v.ge(0))
    checkpoint_every: int = attrs.field(default=500, validator=v.ge(0))  # 0: only at the end
    keep_last: int = attrs.field(default=3, validator=v.gt(0))
    resume: str | None = None                                            # None | "latest" | a checkpoint folder
    log_every: int = attrs.field(default=10, validator=v.gt(0))
    num_workers: int = attrs.field(default=0, validator=v.ge(0))
    final_grid: FinalGrid = attrs.Factory(FinalGrid)


@attrs.define(kw_only=True)
class TrainJob:
    job: TrainSettings = attrs.Factory(TrainSettings)
    model: Spec = component("models")
    dataset: Spec = component("datasets")
    trainer: Spec = component("trainers", default={"name": "full"})
    sampler: Spec = component("samplers", default={"name": "euler"})
    schedule: Spec = component("schedules", default={"name": "flow"})


def run_train(config: TrainJob, ctx: JobContext) -> Any:
    """Build the pieces, train, then sample the final class grid with the EMA weights."""
    import torch
    from accelerate import PartialState

    from diffcore.io.images import enlarge, make_grid, save_png
    from diffcore.training.loop import train

    s = config.job
    state = PartialState(cpu=s.device == "cpu" or not torch.cuda.is_available())
    torch.manual_seed(s.seed)  # the same initial weights on every process
    bundle = config.model.build(device=state.device)
    trainer = config.trainer.build(bundle=bundle)
    dataset = config.dataset.build()
    sampler = config.sampler.build()
    schedule = config.schedule.build()

    def write_grid(path: Any, steps: int, cfg_scale: float, upscale: int = 1, **extra: Any) -> None:
        images = sample_class_grid(bundle, sampler, schedule, samples_per_class=s.final_grid.samples_per_class,
                                   steps=steps, cfg_scale=cfg_scale, seed=s.seed)
        params = {"model": config.model.name, "sampler": config.sampler.name, "schedule": config.schedule.name,
                  "steps": steps, "cfg_scale": cfg_scale, "seed": s.seed, "weights": "ema", **extra}
        grid = make_grid(images, nrow=s.final_grid.samples_per_class)
        if upscale > 1:   # the enlarged grid to look at, the original size beside it
            save_png(path.with_name(f"{path.stem}-small.png"), grid, params)
            grid, params = enlarge(grid, upscale), params | {"upscale": upscale}
        save_png(path, grid, params)

    def preview(bundle: Any, step: int) -> None:
        write_grid(ctx.output_dir / "samples" / f"step-{step:06d}.png", s.sample_steps, s.sample_cfg, step=step)

    result = train(s, bundle=bundle, trainer=trainer, dataset=dataset, output_dir=ctx.output_dir,
                   config=ctx.resolved, preview=preview)
    if state.is_main_process:
        network = bundle.network
        network.eval()
        with result.ema.applied(network), torch.no_grad():
            write_grid(ctx.output_dir / "grid.png", s.final_grid.steps, s.final_grid.cfg_scale,
                       upscale=s.final_grid.upscale, step=result.step)
    state.wait_for_everyone()
    return result


def sample_class_grid(bundle: Any, sampler: Any, schedule: Any, *, samples_per_class: int, steps: int,
                      cfg_scale: float, seed: int) -> Any:
    """``samples_per_class`` images of every class (class-major), from noise fixed by ``seed``;
    ``samples_per_class`` unconditional images for a model without classes."""
    import math

    import torch

    from diffcore.models import GenerationRequest
    from diffcore.sampling.cfg import CFG
    from diffcore.sampling.engine import sample

    device = next(bundle.network.parameters()).device
    num_classes = getattr(bundle, "num_classes", None)
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class) if num_classes else None
    n = len(labels) if labels is not None else samples_per_class
    request = GenerationRequest(batch=n, labels=None if labels is None else labels.to(device))
    shape = bundle.latent_shape(request)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *shape), generator=generator).to(device)
    seq_len = math.prod(shape[1:]) if len(shape) == 3 else None
    sigmas = schedule.sigmas(steps, seq_len=seq_len).to(device)
    guidance = [CFG(scale=cfg_scale)] if cfg_scale != 1.0 and labels is not None else []
    latents = sample(bundle, noise, bundle.conditions(request), sigmas, sampler, guidance=guidance,
                     generator=generator, disable=True)
    return bundle.decode(latents).float().clamp(-1, 1).cpu()
