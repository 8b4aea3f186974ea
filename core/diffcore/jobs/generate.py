"""The ``generate`` job: sample images from any registered model family.

Class-conditional families take ``class_label`` / ``class_grid``; text families take
``prompt`` (a string, a list, or ``prompt_file`` with one prompt per line). ``init_image`` +
``strength`` is image-to-image (the schedule starts ``strength`` of the way from the end, as in
diffusers); ``reference_image``, ``image`` and ``mask`` become the request's reference images,
image to repaint and mask (``image`` without a ``mask``: its control image), for Kontext / FLUX.2
editing, Fill, Canny. Each ``[[control]]`` table is a ControlNet to follow (``path``, ``image``,
``scale``, ``start`` / ``end`` of the schedule, ``mode``). ``cfg_scale`` left unset is the bundle's ``default_cfg_scale``. Each image
is a PNG with its parameters in a text chunk; a grid PNG sums them up. ``generate_images`` turns
the settings into requests for the generation pipeline (``diffcore.sampling.pipeline``), for this
job and the ``serve`` job alike.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs
from attrs import validators as v

from diffcore.config.spec import Spec, component, component_list
from diffcore.config.validators import local_path
from diffcore.errors import ConfigError
from diffcore.jobs import JobContext, JobSettings, is_main_process

# pixels per side: twice the largest size any supported family was trained at (FLUX.2, 4 MP);
# a larger request is a typo that would only run out of memory (docs/reliability.md)
MAX_SIDE = 8192
_SIDE = v.optional([v.gt(0), v.le(MAX_SIDE)])


@attrs.define
class GenerateSettings(JobSettings):
    num_samples: int = attrs.field(default=16, validator=v.gt(0))
    batch_size: int = attrs.field(default=16, validator=v.gt(0))
    class_label: int | None = attrs.field(default=None, validator=v.optional(v.ge(0)))
    class_grid: bool = False
    samples_per_class: int = attrs.field(default=8, validator=v.gt(0))
    prompt: str | list[str] | None = None
    prompt_file: str | None = None
    negative_prompt: str | None = None
    seeds: list[int] | None = attrs.field(   # several seeds: every prompt / label once per seed
        default=None, validator=v.optional(v.deep_iterable(v.ge(0))))
    init_image: str | None = None
    strength: float = attrs.field(default=1.0, validator=[v.gt(0), v.le(1)])
    reference_image: str | list[str] | None = None
    image: str | None = None
    mask: str | None = None
    height: int | None = attrs.field(default=None, validator=_SIDE)
    width: int | None = attrs.field(default=None, validator=_SIDE)
    sampling_steps: int | None = attrs.field(default=None, validator=v.optional(v.gt(0)))   # None: the model's
    cfg_scale: float | None = attrs.field(default=None, validator=v.optional(v.ge(0)))  # None: the model's default
    grid: bool = True
    progress: bool = True


@attrs.define
class ControlSettings:
    """One ``[[control]]`` table: a ControlNet (``path``: its file or diffusers folder, loaded by the
    model's family), its conditioning image, the scale of its residuals and the fractions of the
    schedule it acts on (diffusers' ``control_guidance_start`` / ``_end``); ``mode`` picks the
    control type of a Union ControlNet; ``canny = [low, high]`` turns a photo into the edge map a
    Canny ControlNet expects (``diffcore.nn.control.canny``, OpenCV's algorithm)."""

    path: str = attrs.field(validator=local_path)
    image: str = attrs.field(validator=local_path)
    scale: float = attrs.field(default=1.0, validator=v.ge(0))
    start: float = attrs.field(default=0.0, validator=[v.ge(0), v.le(1)])
    end: float = attrs.field(default=1.0, validator=[v.ge(0), v.le(1)])
    mode: int | None = attrs.field(default=None, validator=v.optional(v.ge(0)))
    canny: list[float] | None = attrs.field(default=None, validator=lambda _, a, x: _thresholds(a, x))

    def __attrs_post_init__(self) -> None:
        if self.start >= self.end:
            raise ConfigError(f"start ({self.start}) must be before end ({self.end}): the fractions of the "
                              f"schedule the ControlNet acts on", path="start")


@attrs.define
class LoraSettings:
    """One ``[[lora]]`` table: a LoRA file (``.safetensors`` in any format ``diffcore lora inspect``
    reads), its ``scale``, and ``merge``: add it into the weights (no cost per step) or keep it
    beside them as a hook (the base weights untouched)."""

    path: str = attrs.field(validator=local_path)
    scale: float = 1.0
    merge: bool = True


def _thresholds(attribute: attrs.Attribute, value: list[float] | None) -> None:
    """``canny = [low, high]``: the edge map's hysteresis thresholds (OpenCV's, 0..1020 for 8-bit)."""
    if value is not None and (len(value) != 2 or min(value) < 0):
        raise ConfigError(f"expected [low, high] hysteresis thresholds (each >= 0), got {value}", path=attribute.name)


@attrs.define(kw_only=True)
class GenerateJob:
    job: GenerateSettings = attrs.Factory(GenerateSettings)
    model: Spec = component("models")
    sampler: Spec = component("samplers", default={"name": "euler"})
    schedule: Spec | None = component("schedules", optional=True)
    guidance: list[Spec] = component_list("guidance")
    control: list[ControlSettings] = attrs.Factory(list)
    lora: list[LoraSettings] = attrs.Factory(list)

    renamed: ClassVar[dict[str, str]] = {"job.num_steps": "job.sampling_steps"}

    def __attrs_post_init__(self) -> None:
        check_image_size(self.model, self.job.height, self.job.width)


def check_image_size(model: Spec, height: int | None, width: int | None) -> None:
    """A family whose config knows the sizes it makes (``check_image_side(side, pixels)``,
    raising ``ValueError``) refuses a wrong one while the job file is checked, before any
    weights load."""
    check = getattr(model.config, "check_image_side", None)
    for side, pixels in (("height", height), ("width", width)):
        if check is not None and pixels is not None:
            try:
                check(side, pixels)
            except ValueError as exc:
                raise ConfigError(str(exc), path=f"job.{side}") from None


def run_generate(config: GenerateJob, ctx: JobContext) -> list[Any]:
    from diffcore.io.images import make_grid, save_png
    from diffcore.sampling.pipeline import Pipeline

    s = config.job
    pipeline = Pipeline.build(config.model, config.sampler, config.schedule, config.guidance, device=s.device,
                              loras=config.lora)
    names = {"model": config.model.name, "sampler": config.sampler.name}
    if config.lora:
        names["lora"] = [attrs.asdict(t) for t in config.lora]
    images, params = generate_images(pipeline, s, names=names, controls=config.control)
    if is_main_process():
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        for i, (img, p) in enumerate(zip(images, params)):
            save_png(ctx.output_dir / f"sample-{i:04d}.png", img, p)
        if s.grid:
            nrow = s.samples_per_class if s.class_grid else math.ceil(math.sqrt(len(images)))
            grid = make_grid(images, nrow=nrow)
            save_png(ctx.output_dir / "grid.png", grid, {"model": config.model.name, "images": len(images)})
    return images


def generate_images(pipeline: Any, s: GenerateSettings, *, names: dict[str, str],
                    controls: list[ControlSettings] = ()) -> tuple[Any, list[dict[str, Any]]]:
    """What ``s`` asks for, through ``pipeline``: (N, C, H, W) images in [-1, 1] on the CPU and each
    image's parameters (``names``, the model and sampler, first). The ``generate`` job and the
    ``serve`` job's requests both come through here: it turns the settings into requests (labels
    or prompts in batches, once per seed), the pipeline does the rest."""
    import torch

    from diffcore.models import GenerationRequest

    labels, prompts, per_seed = sample_plan(s, pipeline.bundle)
    images_in = _image_inputs(s, pipeline.bundle)
    if controls:
        images_in["controls"] = control_inputs(controls, s)
    images, params = [], []
    for seed in s.seeds or [s.seed]:
        generator = torch.Generator("cpu").manual_seed(seed)
        for start in range(0, per_seed, s.batch_size):
            n = min(s.batch_size, per_seed - start)
            request = GenerationRequest(
                batch=n, labels=labels[start:start + n].to(pipeline.device) if labels is not None else None,
                prompts=prompts[start:start + n] if prompts else None,
                negative_prompts=[s.negative_prompt or ""] * n if prompts else None, height=s.height,
                width=s.width, sampling_steps=s.sampling_steps, cfg_scale=s.cfg_scale, strength=s.strength, **images_in)
            images.append(pipeline(request, generator=generator, progress=s.progress))
            steps, cfg_scale = pipeline.sampling_steps(request), pipeline.cfg_scale(request)
            for i in range(n):
                params.append({**names, "sampling_steps": steps, "cfg_scale": cfg_scale, "seed": seed,
                               "index": start + i, **({"strength": s.strength} if s.init_image else {}),
                               **({"class_label": int(labels[start + i])} if labels is not None else {}),
                               **({"control": [attrs.asdict(c, filter=lambda _, v: v is not None)
                                               for c in controls]} if controls else {}),
                               **({"prompt": prompts[start + i]} if prompts else {})})
    return torch.cat(images), params


def sample_plan(s: GenerateSettings, bundle: Any) -> tuple[Any, list[str] | None, int]:
    """The class labels (or None), the prompts (or None) and how many images one seed makes."""
    labels = class_labels(s, bundle.num_classes)
    prompts = _prompts(s)
    per_seed = len(labels) if labels is not None else (len(prompts) if prompts else s.num_samples)
    return labels, prompts, per_seed


def class_labels(s: GenerateSettings, num_classes: int | None):
    import torch

    if num_classes is None:
        if s.class_grid or s.class_label is not None:
            from diffcore.errors import ConfigError

            raise ConfigError("class_label / class_grid need a class-conditional model", path="job.class_grid")
        return None
    if s.class_label is not None and s.class_label >= num_classes:
        from diffcore.errors import ConfigError

        raise ConfigError(f"class_label {s.class_label} is out of range: this model has {num_classes} classes "
                          f"(0..{num_classes - 1})", path="job.class_label")
    if s.class_grid:
        return grid_labels(num_classes, s.samples_per_class)
    if s.class_label is not None:
        return torch.full((s.num_samples,), s.class_label, dtype=torch.long)
    return torch.arange(s.num_samples) % num_classes


def grid_labels(num_classes: int, samples_per_class: int) -> Any:
    """Every class ``samples_per_class`` times in a row: one class per grid row."""
    import torch

    return torch.arange(num_classes).repeat_interleave(samples_per_class)


def _prompts(s: GenerateSettings) -> list[str] | None:
    from diffcore.errors import ConfigError

    if s.prompt is not None and s.prompt_file is not None:
        raise ConfigError("give either prompt or prompt_file, not both", path="job.prompt_file")
    if s.prompt_file is not None:
        try:
            lines = open(s.prompt_file, encoding="utf-8").read().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read prompt_file: {exc}", path="job.prompt_file") from None
        prompts = [line.strip() for line in lines if line.strip()]
    elif s.prompt is not None:
        prompts = [s.prompt] if isinstance(s.prompt, str) else list(s.prompt)
    else:
        return None
    return [p for p in prompts for _ in range(s.num_samples)]


def _image_inputs(s: GenerateSettings, bundle: Any) -> dict[str, Any]:
    """The job's image files as the request's tensors in [-1, 1]. ``image`` with a ``mask`` is
    the image to repaint, without one a control image. ``init_image`` loads at the size the
    request makes (which the other images may decide, as FLUX's do)."""
    from diffcore.io.images import load_image
    from diffcore.models import GenerationRequest

    size = (s.height, s.width) if s.height and s.width else None
    images: dict[str, Any] = {}
    if s.reference_image is not None:
        refs = [s.reference_image] if isinstance(s.reference_image, str) else s.reference_image
        images["reference_images"] = [load_image(r) for r in refs]
    if s.image is not None:
        images["image" if s.mask is not None else "control_image"] = load_image(s.image, size=size)
    if s.mask is not None:
        mask = load_image(s.mask, size=size, channels=1)
        images["mask"] = (mask + 1) / 2  # white (1) = repaint
    if s.init_image is not None:
        channels, height, width = bundle.image_shape(GenerationRequest(batch=1, height=s.height, width=s.width,
                                                                       **images))
        images["init_image"] = load_image(s.init_image, size=(height, width), channels=channels)
    return images


def control_inputs(tables: list[ControlSettings], s: GenerateSettings) -> list[Any]:
    """The ``[[control]]`` tables as the request's ``Control``s, each image read as RGB in [-1, 1]
    and, when ``height`` and ``width`` are set, checked for their aspect ratio and resized to them
    (Lanczos, as diffusers' control pipelines do). ``canny`` replaces the image by its edge map at
    that size."""
    from diffcore.io.images import load_image
    from diffcore.models import Control
    from diffcore.nn.control import canny

    size = (s.height, s.width) if s.height and s.width else None
    out = []
    for i, t in enumerate(tables):
        try:
            control = Control(path=t.path, image=load_image(t.image), scale=t.scale, start=t.start, end=t.end,
                              mode=t.mode)
            if size is not None:
                control.check_image(*size, where=f"control[{i}]")
                if tuple(control.image.shape[-2:]) != size:
                    control = attrs.evolve(control, image=load_image(t.image, size=size))
            if t.canny is not None:   # white edges on black, as ControlNet canny models were trained on
                edges = canny(control.image, *t.canny).float() * 2 - 1
                control = attrs.evolve(control, image=edges.expand(3, -1, -1).contiguous())
        except ConfigError as exc:
            raise ConfigError(exc.detail, path=exc.path or f"control[{i}].image") from None
        out.append(control)
    return out
