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

It writes ``log.jsonl``, previews every ``validate_every`` steps (EMA weights) to
``samples/``, checkpoints under ``checkpoints/step-*/`` and, at the end, ``grid.png``. For a
class-conditional family the previews and the grid are ``final_grid.samples_per_class`` samples of
every class, one class per row, enlarged ``final_grid.upscale`` times (nearest neighbour; the
original size then goes to ``grid-small.png``); for a text family they are the
``validation_prompts`` (one row each) at the ``validation_seeds`` (one column each), also saved
one by one. A trainer that exports its result (``lora``: ``lora.safetensors``) writes it at the
end. ``resume = "latest"`` continues the newest checkpoint exactly.
Imports no torch until it runs.
"""

from __future__ import annotations

import sys
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


def _pair(attribute: attrs.Attribute, value: list[int]) -> None:
    from diffcore.errors import ConfigError

    if len(value) != 2:
        raise ConfigError(f"expected [height, width] in pixels, got {value}", path=attribute.name)


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
    optimizer: Literal["adamw", "adamw8bit", "muon"] = "adamw"
    warmup_steps: int = attrs.field(default=0, validator=v.ge(0))
    lr_schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float = attrs.field(default=1.0, validator=v.ge(0))   # 0: no clipping
    mixed_precision: Literal["no", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float = attrs.field(default=0.9999, validator=[v.ge(0), v.lt(1)])
    ema_warmup: bool = True
    validate_every: int = attrs.field(default=0, validator=v.ge(0))      # 0: no previews
    sampling_steps: int = attrs.field(default=28, validator=v.gt(0))
    sample_cfg: float = attrs.field(default=3.0, validator=v.ge(0))      # class previews' CFG
    validation_prompts: list[str] = attrs.Factory(list)                  # text families' previews
    validation_seeds: list[int] | None = attrs.field(default=None, validator=v.optional(v.deep_iterable(v.ge(0))))
    validation_size: list[int] | None = attrs.field(default=None, validator=v.optional(
        [v.deep_iterable(v.gt(0)), lambda _, a, x: _pair(a, x)]))       # [height, width]; None: the model's
    validation_cfg: float | None = attrs.field(default=None, validator=v.optional(v.ge(0)))  # None: the model's
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
    schedule: Spec | None = component("schedules", optional=True)   # None: the model's default

    renamed: ClassVar[dict[str, str]] = {"job.sample_steps": "job.sampling_steps",
                                         "job.final_grid.steps": "job.final_grid.sampling_steps",
                                         "job.sample_every": "job.validate_every"}

    def __attrs_post_init__(self) -> None:
        if self.model.options is not None and self.model.options.compile:
            from diffcore.errors import ConfigError

            raise ConfigError("compile = true is for generate and serve jobs: training a compiled network (its "
                              "backward, gradient checkpointing, peft adapters) is not supported yet; remove it "
                              "from the train job's [model] table", path="model.compile")
        if self.model.options is not None and self.model.options.fp8_matmul:
            from diffcore.errors import ConfigError

            raise ConfigError("fp8_matmul = true multiplies in fp8 for generate and serve jobs; its backward pass is "
                              "not built: train on fp8 base weights with weight_dtype = \"float8_e4m3fn\" alone "
                              "(kohya's --fp8_base), which multiplies in the model's dtype", path="model.fp8_matmul")
        if self.model.options is not None and self.model.options.fp8 and self.trainer.name == "full":
            from diffcore.errors import ConfigError

            raise ConfigError("weight_dtype keeps the base weights frozen in fp8, and the full trainer trains them: "
                              "train adapters (trainer name = \"lora\", \"dreambooth\", \"controlnet\") on the fp8 "
                              "base, or remove weight_dtype", path="model.weight_dtype")
        if (self.model.options is not None and self.model.options.text_weight_dtype != "auto"
                and getattr(self.trainer.config, "train_text_encoder", False)):
            from diffcore.errors import ConfigError

            raise ConfigError("text_weight_dtype keeps the text encoders frozen in fp8, and trainer.train_text_encoder "
                              "= true trains adapters on them, which is not built over fp8 encoders: turn one of them "
                              "off", path="model.text_weight_dtype")
        if self.job.cache_text_embeddings and getattr(self.trainer.config, "train_text_encoder", False):
            from diffcore.errors import ConfigError

            raise ConfigError("job.cache_text_embeddings = true stores the captions' embeddings once, but "
                              "trainer.train_text_encoder = true trains the text encoders, whose embeddings change "
                              "every step: turn one of them off", path="job.cache_text_embeddings")
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
    from diffcore.sampling.pipeline import Pipeline, build_schedule
    from diffcore.training.loop import train

    s = config.job
    state = PartialState(cpu=s.device == "cpu" or not torch.cuda.is_available())
    torch.manual_seed(s.seed)  # the same initial weights on every process
    bundle = config.model.build(device=state.device)
    trainer = config.trainer.build(bundle=bundle)
    options = config.model.options
    if options is not None and options.fp8:   # the frozen base, under the adapters
        from diffcore.nn.fp8_options import store_bundle_fp8

        store_bundle_fp8(bundle, options, state.device, training=True)
    if options is not None and options.text_weight_dtype != "auto":   # frozen encoders, for captions
        from diffcore.nn.fp8_options import store_text_fp8

        store_text_fp8(bundle, options.text_weight_dtype)
    dataset = config.dataset.build()
    if s.cache_latents or s.cache_text_embeddings:   # encode once (data/cache.py), then train from disk
        from diffcore.data.cache import cache_for_job

        dataset = cache_for_job(dataset, bundle, s, output_dir=ctx.output_dir, state=state)
    pipeline = Pipeline(bundle=bundle, sampler=config.sampler.build(), schedule=build_schedule(bundle, config.schedule),
                        device=state.device)
    texts = bundle.num_classes is None and bool(s.validation_prompts)
    schedule = config.schedule.name if config.schedule is not None else bundle.default_schedule["name"]

    def write_grid(path: Any, steps: int, cfg_scale: float, upscale: int = 1, **extra: Any) -> None:
        params = {"model": config.model.name, "sampler": config.sampler.name, "schedule": schedule,
                  "sampling_steps": steps, "seed": s.seed, "weights": "ema", **extra}
        if texts:
            images, nrow = prompt_grid(pipeline, s, steps=steps, folder=path.with_suffix(""), params=params)
            params |= {"prompts": s.validation_prompts, "seeds": s.validation_seeds or [s.seed]}
        else:
            images = class_grid(pipeline, samples_per_class=s.final_grid.samples_per_class, steps=steps,
                                cfg_scale=cfg_scale, seed=s.seed)
            nrow, params = s.final_grid.samples_per_class, params | {"cfg_scale": cfg_scale}
        grid = make_grid(images, nrow=nrow)
        if upscale > 1:   # the enlarged grid to look at, the original size beside it
            save_png(path.with_name(f"{path.stem}-small.png"), grid, params)
            grid, params = enlarge(grid, upscale), params | {"upscale": upscale}
        save_png(path, grid, params)

    def preview(bundle: Any, step: int) -> None:
        write_grid(ctx.output_dir / "samples" / f"step-{step:06d}.png", s.sampling_steps, s.sample_cfg, step=step)

    if hasattr(trainer, "prepare"):   # e.g. DreamBooth's class images, drawn by the base model before training
        with state.main_process_first():
            trainer.prepare(pipeline, ctx.output_dir, draw=state.is_main_process)
    can_sample = bundle.num_classes is not None or texts or not _takes_text(bundle)
    result = train(s, bundle=bundle, trainer=trainer, dataset=dataset, output_dir=ctx.output_dir,
                   config=ctx.resolved, preview=preview if can_sample else None)
    if state.is_main_process:
        network = bundle.network
        network.eval()
        if hasattr(trainer, "export"):
            for path in trainer.export(ctx.output_dir, ema=result.ema, bundle=bundle):
                print(f"wrote {path}", file=sys.stderr)
        if can_sample:
            with result.ema.applied(result.model or network), torch.no_grad():
                grid = s.final_grid
                write_grid(ctx.output_dir / "grid.png", grid.sampling_steps, grid.cfg_scale, upscale=grid.upscale,
                           step=result.step)
        else:
            print("no grid.png: set job.validation_prompts to sample a text-to-image model", file=sys.stderr)
    state.wait_for_everyone()
    result.bundle = bundle
    return result


def _takes_text(bundle: Any) -> bool:
    """Whether the family is conditioned on text (it encodes captions): it then needs prompts to sample."""
    from diffcore.models import ModelBundle

    return type(bundle).encode_captions is not ModelBundle.encode_captions


def prompt_grid(pipeline: Any, s: Any, *, steps: int, folder: Any, params: dict[str, Any]) -> tuple[Any, int]:
    """Each validation prompt at each validation seed (prompt-major), also written one by one to
    ``folder/prompt-P-seed-S.png``; returns the images and the grid's row length (the seeds)."""
    import torch

    from diffcore.io.images import save_png
    from diffcore.models import GenerationRequest

    seeds = s.validation_seeds or [s.seed]
    height, width = s.validation_size or (None, None)
    images = []
    for p, prompt in enumerate(s.validation_prompts):
        for seed in seeds:
            request = GenerationRequest(batch=1, prompts=[prompt], sampling_steps=steps, cfg_scale=s.validation_cfg,
                                        height=height, width=width)
            image = pipeline(request, generator=torch.Generator().manual_seed(seed))
            save_png(folder / f"prompt-{p}-seed-{seed}.png", image[0], params | {"prompt": prompt, "seed": seed})
            images.append(image)
    return torch.cat(images), len(seeds)


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
