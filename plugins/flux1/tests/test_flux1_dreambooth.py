"""DreamBooth on a tiny FLUX.1: class images drawn once by the base model and reused, the loss is
the instance loss + weight x the prior loss (recomputed by hand), and after training the instance
prompt reproduces the instance images better than the class prompt does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcore.api import registry, structure
from diffcore.testing import plugins_for_test
from diffcore_flux1.plugin import Flux1Config, build_flux1

pytest.importorskip("peft")

SEQ = 16
INSTANCE, CLASS = "a photo of sks dog", "a photo of dog"


def instance_folder(root, n=4):
    """``n`` photos of one 'subject': the same two-colour field, slightly shifted each time."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    base = F.interpolate(torch.tensor([[[[0.9, 0.1], [0.2, 0.8]], [[0.1, 0.7], [0.9, 0.3]], [[0.5, 0.5], [0.1, 0.9]]]]),
                         size=(24, 24), mode="bilinear")[0]
    for i in range(n):
        field = base[:, i % 3:i % 3 + 16, (2 * i) % 6:(2 * i) % 6 + 16]
        Image.fromarray((field * 255).round().byte().permute(1, 2, 0).numpy()).save(root / f"{i}.png")
    return root


def dreambooth_job(folder, data, out, job=(), **trainer):
    import tomli_w

    from diffcore.testing import run_job_file

    table = {"job": {"kind": "train", "output_dir": str(out), "device": "cpu", "seed": 0, "steps": 4,
                     "batch_size": 1, "lr": 1e-2, "ema_decay": 0.0, "log_every": 1, "checkpoint_every": 0, **dict(job)},
             "model": {"family": "flux1", "path": str(folder), "dtype": "float32", "max_sequence_length": SEQ},
             "dataset": {"name": "captioned", "path": str(data), "resolution": 16, "bucketing": False},
             "trainer": {"name": "dreambooth", "method": "lora", "rank": 8, "target_modules": "all-linear",
                         "instance_prompt": INSTANCE, "class_prompt": CLASS, "num_class_images": 3,
                         "class_size": [16, 16], "class_sampling_steps": 2, "prior_preservation_weight": 0.5,
                         **trainer}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        return run_job_file(out / "job.toml")


def test_class_images_are_drawn_once_and_reused(tiny_pipeline, tmp_path, capfd):
    data = instance_folder(tmp_path / "dog")
    dreambooth_job(tiny_pipeline[0], data, tmp_path / "run")
    drawn = sorted((tmp_path / "run" / "class_images").iterdir())
    assert [p.name for p in drawn] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert "drew 3 class images of 'a photo of dog'" in capfd.readouterr().err
    stamps = [p.stat().st_mtime_ns for p in drawn]
    dreambooth_job(tiny_pipeline[0], data, tmp_path / "run", num_class_images=3)   # a second run: none drawn
    assert "drew" not in capfd.readouterr().err
    assert [p.stat().st_mtime_ns for p in drawn] == stamps
    dreambooth_job(tiny_pipeline[0], data, tmp_path / "run", num_class_images=4)   # one more wanted: only it
    assert "drew 1 class images" in capfd.readouterr().err


def test_the_loss_is_instance_plus_weighted_prior(tiny_pipeline):
    bundle = build_flux1(Flux1Config(path=str(tiny_pipeline[0]), dtype="float32", max_sequence_length=SEQ))
    with plugins_for_test():
        component = registry("trainers").get("dreambooth")
        config = structure({"rank": 4, "instance_prompt": INSTANCE, "class_prompt": CLASS, "num_class_images": 5,
                            "prior_preservation_weight": 0.7}, component.config)
        trainer = component.factory(config, bundle)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in bundle.network.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trainer.class_latents = torch.randn(5, 64, 4, 4, generator=g)       # what prepare() would have encoded
    trainer.class_text = bundle.encode_captions([CLASS])
    trainer.instance_text = bundle.encode_captions([INSTANCE])
    batch = {"latents": torch.randn(2, 64, 4, 4, generator=g), "caption": ["ignored", "ignored"]}
    with torch.no_grad():
        loss = trainer.loss(bundle, batch, torch.Generator().manual_seed(9))

        def flow_loss(x0, text, gen):   # the flow objective written out: noise, sigma, velocity target
            noise, u = torch.randn(x0.shape, generator=gen), torch.rand(x0.shape[0], generator=gen)
            s = u.view(-1, 1, 1, 1)
            cond = {k: v.expand(x0.shape[0], *v.shape[1:]) for k, v in text.items()}
            pred = bundle.forward((1 - s) * x0 + s * noise, u, **cond, guidance=torch.full((x0.shape[0],), 3.5))
            return F.mse_loss(pred, noise - x0)

        gen = torch.Generator().manual_seed(9)
        instance = flow_loss(batch["latents"], bundle.encode_captions([INSTANCE]), gen)
        pick = torch.randint(5, (2,), generator=gen)
        prior = flow_loss(trainer.class_latents[pick], bundle.encode_captions([CLASS]), gen)
    assert abs(loss.item() - (instance + 0.7 * prior).item()) <= 1e-6 and prior.item() > 0


def x0_error(bundle, images, prompt, sigmas=(0.4, 0.7)) -> float:
    with torch.no_grad():
        cond = bundle.training_inputs({"caption": [prompt]})
        errors = []
        for i, image in enumerate(images):
            x0 = bundle.encode(image[None])
            for s in sigmas:
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + i))
                x = (1 - s) * x0 + s * noise
                errors.append(F.mse_loss(x - s * bundle.forward(x, torch.tensor([s]), **cond), x0).item())
    return sum(errors) / len(errors)


def test_after_training_the_instance_prompt_reproduces_the_subject_better(tiny_pipeline, tmp_path):
    """The one-step x0 error on the instance images is lower with the instance prompt than with the
    class prompt, and on the class images the other way round: the model tells the prompts apart."""
    from diffcore.api import load_image

    data = instance_folder(tmp_path / "dog")
    result = dreambooth_job(tiny_pipeline[0], data, tmp_path / "run", job={"steps": 600, "batch_size": 2,
                                                                          "log_every": 100},
                            prior_preservation_weight=1.0)
    bundle = result.bundle
    bundle.network.eval()
    instances = [load_image(p) for p in sorted(data.glob("*.png"))]
    classes = [load_image(p) for p in sorted((tmp_path / "run" / "class_images").glob("*.png"))]
    on_instances = x0_error(bundle, instances, INSTANCE), x0_error(bundle, instances, CLASS)
    on_classes = x0_error(bundle, classes, INSTANCE), x0_error(bundle, classes, CLASS)
    # measured: instance images 0.1375 (instance prompt) vs 0.1480 (class prompt); class images 0.1618 vs 0.1486
    assert on_instances[0] < 0.97 * on_instances[1], on_instances
    assert on_classes[1] < 0.97 * on_classes[0], on_classes


def test_full_fine_tune_dreambooth_trains_every_weight(tiny_pipeline, tmp_path):
    """``method = "full"``: the same prior preservation, every network weight trained and checkpointed."""
    from safetensors.torch import load_file

    data = instance_folder(tmp_path / "dog")
    result = dreambooth_job(tiny_pipeline[0], data, tmp_path / "run", job={"steps": 2, "checkpoint_every": 2},
                            method="full")
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors")
    network = result.bundle.network
    assert set(saved) == set(network.state_dict()) and not any(".lora_" in k for k in saved)
    base = build_flux1(Flux1Config(path=str(tiny_pipeline[0]), dtype="float32", max_sequence_length=SEQ)).network
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, saved[k])]
    assert len(changed) > 0.5 * len(saved)
    assert len(list((tmp_path / "run" / "class_images").iterdir())) == 3


def test_dreambooth_lora_trains_the_text_encoder_too(tiny_pipeline, tmp_path):
    """``train_text_encoder`` with prior preservation: the instance and class prompts are encoded
    through the training CLIP each step, so its adapters move; lora.safetensors holds them."""
    from safetensors.torch import load_file

    result = dreambooth_job(tiny_pipeline[0], instance_folder(tmp_path / "dog"), tmp_path / "run",
                            train_text_encoder=True, target_modules="attention")
    ups = [v for k, v in result.bundle.text.clip.state_dict().items() if "lora_B" in k]
    assert len(ups) == 4 and all(v.abs().max() > 0 for v in ups)
    assert sum(k.startswith("text_encoder.") for k in load_file(tmp_path / "run" / "lora.safetensors")) == 3 * 4
