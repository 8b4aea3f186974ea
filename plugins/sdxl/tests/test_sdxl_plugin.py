"""The sdxl family through the plugin: conformance, generate jobs (text, image-to-image, base +
refiner), prediction type from the folder."""

import json

import torch

from diffcore.api import GenerationRequest
from diffcore.testing.conformance import check_model_family
from diffcore_sdxl.plugin import SDXLConfig, build_sdxl

REQUEST = GenerationRequest(batch=2, prompts=["a red cat", "a dog"], negative_prompts=["blurry", ""],
                            height=16, width=16)


def test_conformance(tiny_pipelines):
    bundle = build_sdxl(SDXLConfig(path=str(tiny_pipelines["base"][0]), dtype="float32"))
    assert (bundle.default_sampling_steps, bundle.default_cfg_scale, bundle.default_size) == (50, 5.0, 1024)
    assert bundle.default_schedule == {"name": "ddpm", "spacing": "leading", "steps_offset": 1}
    check_model_family(bundle, REQUEST)
    cond = bundle.conditions(REQUEST)["cond"]
    assert bundle.sequence_condition(cond).shape == (2, 77, 48) and bundle.pooled_condition(cond).shape == (2, 32)


def test_generate_text_and_image_to_image(tiny_pipelines, run_job, tmp_path):
    from PIL import Image

    base = str(tiny_pipelines["base"][0])
    images, params = run_job("t2i", {"path": base}, negative_prompt="blurry")
    assert images.shape == (1, 3, 16, 16) and params["prompt"] == "a red cat" and params["cfg_scale"] == 5.0
    Image.fromarray((images[0].permute(1, 2, 0).add(1).mul(127.5)).clamp(0, 255).byte().numpy()).save(
        tmp_path / "init.png")
    edited, params = run_job("i2i", {"path": base}, init_image=str(tmp_path / "init.png"), strength=0.5)
    assert edited.shape == (1, 3, 16, 16) and params["strength"] == 0.5
    assert (edited - images).abs().max() > 1e-3


def test_base_and_refiner_in_one_job(tiny_pipelines, run_job):
    """``refiner = {path, switch_at}``: the base runs the timesteps above (1 - switch_at) * 1000,
    the refiner (its own bigG-only text encoder, aesthetic-score conditioning) the rest."""
    base, refiner = (str(tiny_pipelines[k][0]) for k in ("base", "refiner"))
    bundle = build_sdxl(SDXLConfig(path=base, dtype="float32", refiner={"path": refiner, "switch_at": 0.5}))
    assert bundle.refiner.switch_t == 500
    calls = {"base": [], "refiner": []}
    bundle.network.register_forward_pre_hook(lambda m, a: calls["base"].append(float(a[1][0])))
    bundle.refiner.network.register_forward_pre_hook(lambda m, a: calls["refiner"].append(float(a[1][0])))
    from diffcore.api import Pipeline, build_schedule, euler

    pipeline = Pipeline(bundle=bundle, sampler=euler, schedule=build_schedule(bundle), device=torch.device("cpu"))
    pipeline(GenerationRequest(batch=1, prompts=["a cat"], height=16, width=16,
                               sampling_steps=4, cfg_scale=5.0), generator=torch.Generator().manual_seed(0))
    assert calls == {"base": [751.0, 501.0], "refiner": [251.0, 1.0]}
    alone, _ = run_job("base", {"path": base})
    both, _ = run_job("both", {"path": base, "refiner": {"path": refiner, "switch_at": 0.5}})
    assert (alone - both).abs().max() > 1e-3


def test_prediction_type_from_the_folder(tiny_pipelines, tmp_path):
    import shutil

    folder = tmp_path / "vpred"
    shutil.copytree(tiny_pipelines["base"][0], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction",
                                  "timestep_spacing": "trailing"}))
    bundle = build_sdxl(SDXLConfig(path=str(folder), dtype="float32"))
    assert bundle.prediction_type == "v" and bundle.default_schedule["spacing"] == "trailing"
    assert build_sdxl(SDXLConfig(path=str(folder), prediction_type="epsilon")).prediction_type == "epsilon"
