"""The ``dreambooth`` trainer: personalisation with prior preservation (Ruiz et al. 2023,
arXiv:2208.12242), as a LoRA or a full fine-tune.

The dataset holds the instance images (a few photos of one subject); every one trains with
``instance_prompt`` ("a photo of sks dog"). Before training, the base model itself draws
``num_class_images`` images of ``class_prompt`` ("a photo of dog") into ``class_data`` (the run
folder's ``class_images/`` by default), numbered, so a resumed or second run finds them and draws
none. Each step adds the loss of as many class images as instance images, weighted by
``prior_preservation_weight``: the model learns the subject without forgetting what the class
looks like (``loss = instance loss + weight * prior loss``, diffusers' train_dreambooth_lora_*).

Which class images a step uses comes from the step's own generator (the loop seeds it by step,
micro batch and rank), so a resumed run picks the same ones and stays bit-exact.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffcore.errors import ConfigError
from diffcore.training.objectives import diffusion_loss
from diffcore.training.trainers import FullTrainer

CLASS_IMAGE = "class-{:05d}.png"


class DreamBoothTrainer:
    """``method = "lora"``: the ``lora`` trainer's adapters; ``"full"``: every weight."""

    def __init__(self, config: Any, bundle: Any):
        from diffcore.training.lora import LoraTrainer

        self.config = config
        self.inner = LoraTrainer(config, bundle) if config.method == "lora" else FullTrainer(config, bundle)
        self.class_latents: torch.Tensor | None = None
        self.class_text: dict[str, torch.Tensor] | None = None
        self.instance_text: dict[str, torch.Tensor] | None = None

    @property
    def prior(self) -> bool:
        return bool(self.config.class_prompt) and self.config.prior_preservation_weight > 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.inner.trainable_parameters()

    def __getattr__(self, name: str) -> Any:
        """``state_dict`` / ``load_state_dict`` / ``export`` / ``tracked`` / ``own_lr`` are the inner
        trainer's, where it has them."""
        if name in ("state_dict", "load_state_dict", "export", "tracked", "own_lr") and hasattr(self.inner, name):
            return getattr(self.inner, name)
        raise AttributeError(name)

    # -- before training ---------------------------------------------------------------------------
    def prepare(self, pipeline: Any, output_dir: Path, *, draw: bool = True) -> None:
        """Draw the missing class images with the base model (``draw``: the main process, before
        the others get here), then encode the class images and both prompts once, so the steps
        need neither the autoencoder for them nor the text encoders."""
        bundle = pipeline.bundle
        if self.prior:
            folder = self.class_folder(output_dir)
            if draw:
                self.draw_class_images(pipeline, folder)
            self.class_latents = self.encode_class_images(bundle, folder)
            self.class_text = _detached(bundle.encode_captions([self.config.class_prompt]))
        if self.config.instance_prompt:
            self.instance_text = _detached(bundle.encode_captions([self.config.instance_prompt]))

    def class_folder(self, output_dir: Path) -> Path:
        return Path(self.config.class_data).expanduser() if self.config.class_data else output_dir / "class_images"

    def draw_class_images(self, pipeline: Any, folder: Path) -> int:
        """Images ``class-00000.png`` ... of ``class_prompt``, image i from seed ``class_seed + i``;
        those already there are kept. Returns how many were drawn."""
        from diffcore.io.images import save_png
        from diffcore.models import GenerationRequest

        c = self.config
        missing = [i for i in range(c.num_class_images) if not (folder / CLASS_IMAGE.format(i)).is_file()]
        if not missing:
            return 0
        height, width = c.class_size or (None, None)
        network = pipeline.bundle.network
        was_training = network.training
        network.eval()
        with torch.no_grad():
            for i in tqdm(missing, desc="class images", disable=not sys.stderr.isatty()):
                request = GenerationRequest(batch=1, prompts=[c.class_prompt], sampling_steps=c.class_sampling_steps,
                                            cfg_scale=c.class_cfg, height=height, width=width)
                image = pipeline(request, generator=torch.Generator().manual_seed(c.class_seed + i))
                save_png(folder / CLASS_IMAGE.format(i), image[0],
                         {"prompt": c.class_prompt, "seed": c.class_seed + i, "purpose": "dreambooth class image"})
        network.train(was_training)
        print(f"drew {len(missing)} class images of {c.class_prompt!r} into {folder}", file=sys.stderr)
        return len(missing)

    def encode_class_images(self, bundle: Any, folder: Path) -> torch.Tensor:
        from diffcore.io.images import load_image

        files = [folder / CLASS_IMAGE.format(i) for i in range(self.config.num_class_images)]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ConfigError(f"{folder} lacks class images {', '.join(absent[:3])}: they are drawn by the main "
                              "process before training", path="trainer.class_data")
        with torch.no_grad():
            return torch.cat([bundle.encode(load_image(f)[None]).detach() for f in files])

    # -- each step ------------------------------------------------------------------------------------
    def loss(self, bundle: Any, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        batch = dict(batch)
        if self.instance_text is not None:   # every instance image trains with the instance prompt
            b = _batch_size(batch)
            batch.pop("caption", None)
            if getattr(bundle, "train_text", False):   # the text encoders train: encoded each step, with gradients
                batch["caption"] = [self.config.instance_prompt] * b
            else:
                batch["text"] = {k: v.expand(b, *v.shape[1:]) for k, v in self.instance_text.items()}
        loss = self.inner.loss(bundle, batch, generator)
        if not self.prior:
            return loss
        if self.class_latents is None:
            raise ConfigError("prior preservation needs the class images: run the trainer through the train job, "
                              "which calls prepare() first", path="trainer")
        return loss + self.config.prior_preservation_weight * self.prior_loss(bundle, _batch_size(batch), generator)

    def prior_loss(self, bundle: Any, n: int, generator: torch.Generator) -> torch.Tensor:
        """The objective on ``n`` class images drawn by ``generator``, with the class prompt."""
        pick = torch.randint(len(self.class_latents), (n,), generator=generator)
        x0 = self.class_latents[pick]
        if getattr(bundle, "train_text", False):   # the text encoders train: the class prompt encoded with gradients
            inputs = {"caption": [self.config.class_prompt] * n, "latents": x0}
        else:
            inputs = {"text": {k: v.expand(n, *v.shape[1:]) for k, v in self.class_text.items()}, "latents": x0}
        cond = bundle.training_inputs(inputs, dropout=0.0, generator=generator)
        return diffusion_loss(bundle, x0, cond, generator, self.inner.timesteps)


def _batch_size(batch: dict[str, Any]) -> int:
    for key in ("latents", "image"):
        if key in batch:
            return batch[key].shape[0]
    raise ConfigError("a DreamBooth batch has neither images nor cached latents", path="dataset")


def _detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in tensors.items()}
