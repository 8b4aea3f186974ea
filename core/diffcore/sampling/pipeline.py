"""The generation pipeline: a model bundle, a sampler, a schedule and a guidance chain, turned into
images for a ``GenerationRequest``.

Every job that makes images (generate, serve, train's previews, train-guidance) comes through
here, so each choice is made in one place:

- device: ``"auto"`` is CUDA when available, else the CPU (``pick_device``);
- schedule: the job's ``[schedule]``, else the bundle's ``default_schedule`` (``build_schedule``);
- sampling steps and CFG scale: the request's, else the bundle's defaults; CFG (when its scale
  is not 1) runs first in the chain, then the job's ``[[guidance]]`` processors;
- the schedule's token count: ``bundle.seq_len(request)``;
- img2img: the encoded ``init_image`` noised to the first kept sigma, after skipping the first
  ``int(steps - steps * strength)`` steps (diffusers' rule; at least one step runs);
- noise: drawn on the CPU from the caller's generator, batch by batch in call order, so a seed
  gives the same images on every device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import attrs
import torch

from diffcore.errors import ConfigError
from diffcore.models import GenerationRequest, ModelBundle
from diffcore.nn.compile import compile_bundle_network
from diffcore.nn.fp8_options import rounding_for, rounding_on_load, store_bundle_fp8, store_text_fp8
from diffcore.sampling.cfg import CFG
from diffcore.sampling.denoisers import make_denoiser
from diffcore.sampling.engine import sample
from diffcore.sampling.guidance import GuidanceProcessor

Callback = Callable[[dict[str, Any]], None]


class Schedule(Protocol):
    def sigmas(self, steps: int, *, seq_len: int | None = None) -> torch.Tensor: ...


def pick_device(name: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; anything else as named."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_schedule(bundle: ModelBundle, spec: Any = None) -> Schedule:
    """The job's schedule component (a ``Spec``), else the one the bundle's ``default_schedule`` names."""
    if spec is not None:
        return spec.build()
    from diffcore.config.structure import structure
    from diffcore.plugins import registry

    table = dict(bundle.default_schedule)
    component = registry("schedules").get(table.pop("name"))
    return component.factory(structure(table, component.config))


@attrs.define(eq=False)
class Pipeline:
    """``pipeline(request, generator=...) -> images``; ``guidance`` is the chain after CFG."""

    bundle: ModelBundle
    sampler: Callable[..., torch.Tensor]
    schedule: Schedule
    device: torch.device
    guidance: Sequence[GuidanceProcessor] = ()

    @classmethod
    def build(cls, model: Any, sampler: Any, schedule: Any = None, guidance: Sequence[Any] = (), *,
              device: str | torch.device = "auto", loras: Sequence[Any] = ()) -> Pipeline:
        """The pipeline of a job's component tables (``Spec``s): ``[model]``, ``[sampler]``,
        ``[schedule]`` (None: the bundle's default) and ``[[guidance]]``; ``loras``: ``[[lora]]``
        tables (``path``, ``scale``, ``merge``). The ``[model]`` table's ``weight_dtype``, ``fp8_matmul``
        and ``text_weight_dtype`` (``diffcore.nn.fp8``) come first, then each LoRA is loaded and
        applied in order to the network and, for a file with text-encoder keys, the text encoders;
        ``compile`` (``diffcore.nn.compile``) last."""
        device = pick_device(device)
        options = getattr(model, "options", None)
        with rounding_on_load(rounding_for(options, device)):   # the denoiser rounded to fp8 as it is read
            bundle = model.build(device=device)
        if options is not None and options.fp8:   # the rest (a family not loading through load_model), before
            store_bundle_fp8(bundle, options, device)   # the LoRAs, which merge into or hook onto fp8 layers
        if options is not None and options.text_weight_dtype != "auto":
            store_text_fp8(bundle, options.text_weight_dtype)
        if loras:
            from diffcore.lora.apply import apply_lora_to_bundle
            from diffcore.lora.files import load_lora

            for i, table in enumerate(loras):
                try:
                    weights = load_lora(table.path, bundle)
                except ConfigError as exc:
                    raise ConfigError(exc.detail, path=exc.path or f"lora[{i}].path") from None
                apply_lora_to_bundle(bundle, weights, table.scale, merge=table.merge)
        compile_bundle_network(bundle, options)   # last: it sees the LoRAs
        return cls(bundle=bundle, sampler=sampler.build(), schedule=build_schedule(bundle, schedule), device=device,
                   guidance=[spec.build() for spec in guidance])

    def sampling_steps(self, request: GenerationRequest) -> int:
        return request.sampling_steps or self.bundle.default_sampling_steps

    def cfg_scale(self, request: GenerationRequest) -> float:
        return self.bundle.default_cfg_scale if request.cfg_scale is None else request.cfg_scale

    def chain(self, request: GenerationRequest) -> list[GuidanceProcessor]:
        """The processors of one run: CFG at the request's scale (none at 1), then ``guidance``."""
        scale = self.cfg_scale(request)
        return ([CFG(scale=scale)] if scale != 1.0 else []) + list(self.guidance)

    def sigmas(self, request: GenerationRequest) -> torch.Tensor:
        """The whole schedule for the request's steps and size (img2img then skips its start)."""
        return self.schedule.sigmas(self.sampling_steps(request), seq_len=self.bundle.seq_len(request))

    def latents(self, request: GenerationRequest, *, generator: torch.Generator | None = None,
                callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
        """The sampler's final latents (not decoded) for ``request``."""
        bundle = self.bundle
        if request.controls and not bundle.takes_controls:
            raise ConfigError(f"this model ({type(bundle).__name__}) runs no ControlNets: remove the [[control]] "
                              f"tables (FLUX.1 and SDXL take them)", path="control")
        noise = torch.randn((request.batch, *bundle.latent_shape(request)), generator=generator).to(self.device)
        sigmas = self.sigmas(request).to(self.device)
        with torch.no_grad():
            x0 = None
            if request.init_image is not None:
                x0, sigmas = self.img2img_start(request, sigmas)
            times = make_denoiser(bundle).time(sigmas[:-1])   # what forward sees at each step
            conditions = bundle.schedule_conditions(bundle.conditions(request), times)
            return sample(bundle, noise, conditions, sigmas, self.sampler, guidance=self.chain(request),
                          callback=callback, generator=generator, disable=not progress, x0=x0)

    def __call__(self, request: GenerationRequest, *, generator: torch.Generator | None = None,
                 callback: Callback | None = None, progress: bool = False) -> torch.Tensor:
        """Images (batch, C, H, W) in [-1, 1], float32, on the CPU. ``callback`` gets the sampler's
        per-step dict (``x``, ``i``, ``sigma``, ``sigma_next``, ``denoised``); ``progress`` shows a
        tqdm bar per batch."""
        latents = self.latents(request, generator=generator, callback=callback, progress=progress)
        with torch.no_grad():
            return self.bundle.decode(latents).float().clamp(-1, 1).cpu()

    def img2img_start(self, request: GenerationRequest, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoded ``init_image`` (one per sample) and the schedule from the first step kept."""
        image = request.init_image
        expected = tuple(self.bundle.image_shape(request))
        if tuple(image.shape) != expected:
            raise ConfigError(f"the init image is {tuple(image.shape)} (channels, height, width); this request makes "
                              f"{expected} images", path="job.init_image")
        x0 = self.bundle.encode(image[None].to(self.device))
        steps = len(sigmas) - 1
        skip = min(int(max(steps - steps * request.strength, 0)), steps - 1)
        return x0.expand(request.batch, *x0.shape[1:]), sigmas[skip:]
