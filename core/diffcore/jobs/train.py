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

from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v

from diffcore.config.spec import Spec, component
from diffcore.jobs import JobContext, JobSettings


@attrs.define
class FinalGrid:
    """The class grid sampled with the EMA weights when training ends (previews use its layout too)."""

    samples_per_class: int = attrs.field(default=8, validator=v.gt(0))
    cfg_scale: float = attrs.field(default=3.0, validator=v.ge(0))
    sampling_steps: int = attrs.field(default=50, validator=v.gt(0))
    upscale: int = attrs.field(default=1, validator=[v.ge(1), v.le(32)])   # grid.png enlarged, nearest neighbour


@attrs.define
class TrainSettings(JobSettings):
    """``steps`` are optimizer steps; ``sampling_steps`` the previews' sampling steps.
    ``batch_size`` is the global batch of one forward (split across processes); one optimizer
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
    sampling_steps: int = attrs.field(default=28, validator=v.gt(0))
    sample_cfg: float = attrs.field(default=3.0, validator=v.ge(0))
    checkpoint_every: int = attrs.field(default=500, validator=v.ge(0))  # 0: only at the end
    keep_last: int = attrs.field(default=3, validator=v.gt(0))
    resume: str | None = None                                            # None | "latest" | a checkpoint folder
    log_every: int = attrs.field(default=10, validator=v.gt(0))
    num_workers: int = attrs.field(default=0, validator=v.ge(0))
    cache_latents: bool = False                                          # encode images once into cache_dir
    cache_text_embeddings: bool = False                                  # encode captions once into cache_dir
    cache_dir: str | None = None                                         # None: <output_dir>/cache
    final_grid: FinalGrid = attrs.Factory(FinalGrid)


@attrs.define(kw_only=True)
class TrainJob:
    job: TrainSettings = attrs.Factory(TrainSettings)
    model: Spec = component("models")
    dataset: Spec = component("datasets")
    trainer: Spec = component("trainers", default={"name": "full"})
    sampler: Spec = component("samplers", default={"name": "euler"})
    schedule: Spec = component("schedules", default={"name": "flow"})

    renamed: ClassVar[dict[str, str]] = {"job.sample_steps": "job.sampling_steps",
                                         "job.final_grid.steps": "job.final_grid.sampling_steps"}

    def __attrs_post_init__(self) -> None:
        if self.job.cache_latents or self.job.cache_text_embeddings:   # refused before any model loads
            from diffcore.data.catalog import cache_refusal

            refusal = cache_refusal(self.dataset.config, latents=self.job.cache_latents,
                                    text=self.job.cache_text_embeddings)
            if refusal is not None:
                raise refusal


def run_train(config: TrainJob, ctx: JobContext) -> Any:
    """Build the pieces, train, then sample the final class grid with the EMA weights."""
    import torch
    from accelerate import PartialState

    from diffcore.io.images import enlarge, make_grid, save_png
    from diffcore.sampling.pipeline import Pipeline
    from diffcore.training.loop import train

    s = config.job
    state = PartialState(cpu=s.device == "cpu" or not torch.cuda.is_available())
    torch.manual_seed(s.seed)  # the same initial weights on every process
    bundle = config.model.build(device=state.device)
    trainer = config.trainer.build(bundle=bundle)
    dataset = config.dataset.build()
    if s.cache_latents or s.cache_text_embeddings:   # encode once (data/cache.py), then train from disk
        from diffcore.data.cache import cache_for_job

        dataset = cache_for_job(dataset, bundle, s, output_dir=ctx.output_dir, state=state)
    pipeline = Pipeline(bundle=bundle, sampler=config.sampler.build(), schedule=config.schedule.build(),
                        device=state.device)

    def write_grid(path: Any, steps: int, cfg_scale: float, upscale: int = 1, **extra: Any) -> None:
        images = class_grid(pipeline, samples_per_class=s.final_grid.samples_per_class, steps=steps,
                            cfg_scale=cfg_scale, seed=s.seed)
        params = {"model": config.model.name, "sampler": config.sampler.name, "schedule": config.schedule.name,
                  "sampling_steps": steps, "cfg_scale": cfg_scale, "seed": s.seed, "weights": "ema", **extra}
        grid = make_grid(images, nrow=s.final_grid.samples_per_class)
        if upscale > 1:   # the enlarged grid to look at, the original size beside it
            save_png(path.with_name(f"{path.stem}-small.png"), grid, params)
            grid, params = enlarge(grid, upscale), params | {"upscale": upscale}
        save_png(path, grid, params)

    def preview(bundle: Any, step: int) -> None:
        write_grid(ctx.output_dir / "samples" / f"step-{step:06d}.png", s.sampling_steps, s.sample_cfg, step=step)

    result = train(s, bundle=bundle, trainer=trainer, dataset=dataset, output_dir=ctx.output_dir,
                   config=ctx.resolved, preview=preview)
    if state.is_main_process:
        network = bundle.network
        network.eval()
        with result.ema.applied(network):
            grid = s.final_grid
            write_grid(ctx.output_dir / "grid.png", grid.sampling_steps, grid.cfg_scale, upscale=grid.upscale,
                       step=result.step)
    state.wait_for_everyone()
    return result


def class_grid(pipeline: Any, *, samples_per_class: int, steps: int, cfg_scale: float, seed: int) -> Any:
    """``samples_per_class`` images of every class (class-major) from noise fixed by ``seed``, as
    the generate job's ``class_grid`` makes them; ``samples_per_class`` unconditional images (no
    CFG) for a model without classes."""
    import torch

    from diffcore.jobs.generate import grid_labels
    from diffcore.models import GenerationRequest

    num_classes = pipeline.bundle.num_classes
    labels = grid_labels(num_classes, samples_per_class).to(pipeline.device) if num_classes else None
    request = GenerationRequest(batch=len(labels) if labels is not None else samples_per_class, labels=labels,
                                sampling_steps=steps, cfg_scale=cfg_scale if labels is not None else 1.0)
    return pipeline(request, generator=torch.Generator().manual_seed(seed))
