"""LoRA files on FLUX.1: every format written and read back exactly, a peft LoRA in diffusers'
format gives diffusers' output, q/k/v parts fused onto our qkv exactly, misspelled keys refused,
``[[lora]]`` tables in a generate job, and a trainer's lora.safetensors read back."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcore.api import ConfigError, LoraLayer, apply_lora, load_lora, remove_lora, save_lora
from diffcore_flux1.plugin import Flux1Config, build_flux1

pytest.importorskip("peft")

SEQ = 16


def bundle_of(folder):
    return build_flux1(Flux1Config(path=str(folder), dtype="float32", max_sequence_length=SEQ))


def random_lora(bundle, names, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    modules = dict(bundle.network.named_modules())
    return {n: LoraLayer(down=torch.randn(rank, modules[n].in_features, generator=g) * 0.3,
                         up=torch.randn(modules[n].out_features, rank, generator=g) * 0.3, alpha=2.0 * rank)
            for n in names}


def inputs(seed=0, batch=1, h=2, w=2):
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    g = torch.Generator().manual_seed(seed)
    return dict(img=torch.randn(batch, h * w, 64, generator=g), img_ids=prepare_img_ids(h, w)[0],
                txt=torch.randn(batch, 5, 48, generator=g), txt_ids=prepare_txt_ids(5)[0],
                y=torch.randn(batch, 32, generator=g), timesteps=torch.rand(batch, generator=g),
                guidance=torch.full((batch,), 3.5))


ALL = "all-linear"
XLABS_TARGETS = [f"double_blocks.{i}.{m}" for i in (0, 1) for m in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj",
                                                                    "txt_attn.proj")]


@pytest.mark.parametrize("format", ["diffusers", "kohya", "comfyui", "diffcore", "bfl", "xlabs"])
@torch.no_grad()
def test_every_format_round_trips_exactly(tiny_pipeline, tmp_path, format):
    bundle = bundle_of(tiny_pipeline[0])
    names = XLABS_TARGETS if format == "xlabs" else bundle.lora_targets(ALL)
    lora = random_lora(bundle, names)
    path = save_lora(tmp_path / "lora.safetensors", lora, bundle, format=format)
    back = load_lora(path, bundle)
    assert back.format == {"bfl": "diffcore"}.get(format, format) and set(back) == set(lora)
    for n in lora:
        torch.testing.assert_close(back[n].delta(), lora[n].delta(), rtol=0, atol=1e-6)
    x = inputs()
    base = bundle.network(**x)
    outputs = []
    for weights in (lora, back):
        for merge in (False, True):
            network = copy.deepcopy(bundle.network)
            apply_lora(network, weights, 0.8, merge=merge)
            outputs.append(network(**x))
    assert (outputs[0] - base).abs().max() > 1e-2
    scale = max(outputs[0].abs().max().item(), 1.0)   # fp32 rounding grows with the output's size
    print(f"{format}: output scale {scale:.3g}, errors",
          [f"{(out - outputs[0]).abs().max().item():.2g}" for out in outputs[1:]])
    torch.testing.assert_close(outputs[2], outputs[0], rtol=0, atol=1e-6 * scale)   # unmerged: file vs memory
    torch.testing.assert_close(outputs[3], outputs[1], rtol=0, atol=1e-6 * scale)   # merged: file vs memory
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=2e-6 * scale)   # merged vs not


def test_qkv_fuse_and_split_are_exact(tiny_pipeline, tmp_path):
    """to_q and to_v only (no to_k) at different ranks fuse into one qkv LoRA of rank r_q + r_v
    whose delta is [dq; 0; dv]; written in diffusers' layout it splits back to the two parts."""
    from safetensors.torch import load_file, save_file

    bundle = bundle_of(tiny_pipeline[0])
    g = torch.Generator().manual_seed(3)
    hidden = 64
    parts = {"to_q": (2, 4.0), "to_v": (5, 3.0)}
    tensors = {}
    for p, (r, alpha) in parts.items():
        key = f"transformer.transformer_blocks.0.attn.{p}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=g)
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, tmp_path / "qv.safetensors")
    fused = load_lora(tmp_path / "qv.safetensors", bundle)["double_blocks.0.img_attn.qkv"]
    assert fused.rank == 7
    delta = fused.delta()
    for p, rows in (("to_q", slice(0, 64)), ("to_v", slice(128, 192))):
        r, alpha = parts[p]
        key = f"transformer.transformer_blocks.0.attn.{p}"
        expected = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * alpha / r
        torch.testing.assert_close(delta[rows], expected, rtol=0, atol=1e-6)
    assert torch.equal(delta[64:128], torch.zeros(64, hidden))
    save_lora(tmp_path / "split.safetensors", {"double_blocks.0.img_attn.qkv": fused}, bundle, format="diffusers")
    split = load_file(tmp_path / "split.safetensors")
    assert sorted(split) == sorted(k for k in tensors if not k.endswith(".alpha"))
    for p, (r, alpha) in parts.items():
        key = f"transformer.transformer_blocks.0.attn.{p}"
        assert split[f"{key}.lora_A.weight"].shape == (r, hidden)   # the original rank, not 7
        torch.testing.assert_close(split[f"{key}.lora_B.weight"] @ split[f"{key}.lora_A.weight"],
                                   tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"] * alpha / r,
                                   rtol=0, atol=1e-6)


@pytest.mark.usefixtures("reference_matmuls")
@torch.no_grad()
def test_a_peft_lora_in_diffusers_format_matches_diffusers(tiny_pipeline, tmp_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    folder, pipe = tiny_pipeline
    bundle = bundle_of(folder)
    theirs = copy.deepcopy(pipe.transformer).float().eval()
    targets = ["to_q", "to_v", "add_k_proj", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "norm1.linear",
               "x_embedder"]
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=6, target_modules=targets), theirs)
    g = torch.Generator().manual_seed(9)
    for name, p in theirs.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(theirs).items()}
    state |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(6.0) for k in state if k.endswith(".lora_A.weight")}
    save_file(state, tmp_path / "peft.safetensors")
    weights = load_lora(tmp_path / "peft.safetensors", bundle)
    assert weights.format == "diffusers" and "single_blocks.0.linear1" in weights
    x = inputs(batch=2)
    expected = theirs(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                      timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample
    base = bundle.network(**x)
    assert (expected - base).abs().max() > 1e-2
    for merge in (False, True):
        network = copy.deepcopy(bundle.network)
        apply_lora(network, weights, merge=merge)
        torch.testing.assert_close(network(**x), expected, rtol=0, atol=1e-5)
    apply_lora(bundle.network, weights, merge=False)
    apply_lora(bundle.network, weights, merge=False)   # stacks: twice the delta
    assert remove_lora(bundle.network) > 0
    torch.testing.assert_close(bundle.network(**x), base, rtol=0, atol=0)


def test_keys_that_match_nothing_are_an_error_naming_them(tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    bundle = bundle_of(tiny_pipeline[0])
    lora = random_lora(bundle, ["double_blocks.0.img_attn.proj"])
    path = save_lora(tmp_path / "k.safetensors", lora, bundle, format="kohya")
    from safetensors.torch import load_file

    tensors = load_file(path)
    tensors = {k.replace("img_attn_proj", "img_atn_proj"): v for k, v in tensors.items()}
    save_file(tensors, tmp_path / "typo.safetensors")
    with pytest.raises(ConfigError, match=r"typo\.safetensors.*lora_unet_double_blocks_0_img_atn_proj\.lora_down"):
        load_lora(tmp_path / "typo.safetensors", bundle)
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04not read")
    with pytest.raises(ConfigError, match="safetensors only"):
        load_lora(tmp_path / "x.ckpt", bundle)
    # CLIP-L (lora_te1_) takes LoRAs: half of one is an error naming it; T5 (lora_te2_) none: warned, not applied
    half = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32), **load_file(path)}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(ConfigError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.lora_down\.weight \(its up"):
        load_lora(tmp_path / "half.safetensors", bundle)
    text = {"lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": torch.zeros(2, 48), **load_file(path)}
    save_file(text, tmp_path / "te.safetensors")
    with pytest.warns(UserWarning, match="1 text-encoder keys .* trainable text encoders are text_encoder"):
        assert set(load_lora(tmp_path / "te.safetensors", bundle)) == {"double_blocks.0.img_attn.proj"}


def run_job(folder, model, lora=(), **job):
    """A generate job file with ``[[lora]]`` tables, run; (images, the first PNG's parameters)."""
    import json

    import tomli_w
    from PIL import Image

    from diffcore.testing import plugins_for_test, run_job_file

    table = {"job": {"kind": "generate", "output_dir": str(folder / "out"), "prompt": "a red cat", "num_samples": 1,
                     "batch_size": 1, "progress": False, "device": "cpu", "grid": False, "seed": 7, **job},
             "model": {"family": "flux1", "dtype": "float32", "max_sequence_length": SEQ, **model},
             **({"lora": list(lora)} if lora else {})}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        images = run_job_file(folder / "job.toml")
    return images, json.loads(Image.open(folder / "out" / "sample-0000.png").text["parameters"])


def test_a_generate_job_with_two_lora_tables(tiny_pipeline, tmp_path):
    folder = tiny_pipeline[0]
    bundle = bundle_of(folder)
    first = save_lora(tmp_path / "a.safetensors", random_lora(bundle, bundle.lora_targets("attention"), seed=1),
                      bundle, format="kohya")
    second = save_lora(tmp_path / "b.safetensors", random_lora(bundle, bundle.lora_targets(["img_mlp.0"]), seed=2),
                       bundle, format="diffusers")
    job = dict(sampling_steps=2, height=32, width=32)
    base, _ = run_job(tmp_path / "base", {"path": str(folder)}, **job)
    runs = {}
    for merge in (True, False):
        tables = [{"path": str(first), "scale": 0.5, "merge": merge}, {"path": str(second), "scale": 1.0, "merge": merge}]
        runs[merge] = run_job(tmp_path / f"merge-{merge}", {"path": str(folder)}, lora=tables, **job)
    (merged, params), (hooked, _) = runs[True], runs[False]
    assert (merged - base).abs().max() > 1e-2
    torch.testing.assert_close(merged, hooked, rtol=0, atol=1e-4)
    assert [t["path"] for t in params["lora"]] == [str(first), str(second)] and params["lora"][0]["scale"] == 0.5


def test_a_missing_or_broken_lora_table_is_an_error(tiny_pipeline, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match="lora_unet_nothing_here"):
        run_job(tmp_path / "bad", {"path": str(tiny_pipeline[0])}, lora=[{"path": str(tmp_path / "bad.safetensors")}],
                sampling_steps=1, height=32, width=32)


def test_lora_inspect_prints_format_rank_and_unmatched_keys(tiny_pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffcore.api import describe_lora

    bundle = bundle_of(tiny_pipeline[0])
    path = save_lora(tmp_path / "k.safetensors", random_lora(bundle, bundle.lora_targets("attention")), bundle,
                     format="kohya")
    tensors = load_file(path) | {"lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight": torch.zeros(3, 64)}
    save_file(tensors, tmp_path / "extra.safetensors")
    output = "\n".join(describe_lora(tmp_path / "extra.safetensors", bundle))
    print(output)
    assert "format: kohya" in output and "rank: 3 (11 layers)" in output and "alpha: 6 (10 layers)" in output
    assert "double_blocks_N_img_attn_qkv  x3" in output and "on Flux: 10 layers of ours" in output
    assert "unmatched keys: 1: lora_unet_double_blocks_9_img_attn_qkv.lora_down.weight" in output


@pytest.mark.parametrize("save_format", ["diffcore", "kohya"])
def test_a_lora_trainer_run_file_loads_back(tiny_pipeline, tmp_path, save_format):
    import tomli_w
    from safetensors import safe_open

    from diffcore.testing import plugins_for_test, run_job_file

    def captioned_folder(root):
        from PIL import Image

        root.mkdir()
        g = torch.Generator().manual_seed(4)
        for i in range(2):
            Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(root / f"{i}.png")
            (root / f"{i}.txt").write_text(f"image {i}")
        return root

    out = tmp_path / "run"
    out.mkdir()
    table = {"job": {"kind": "train", "output_dir": str(out), "device": "cpu", "seed": 3, "steps": 2, "batch_size": 1,
                     "lr": 1e-2, "checkpoint_every": 0, "log_every": 1},
             "model": {"family": "flux1", "path": str(tiny_pipeline[0]), "dtype": "float32", "max_sequence_length": SEQ},
             "dataset": {"name": "captioned", "path": str(captioned_folder(tmp_path / "data")), "resolution": 16,
                         "bucket_resolution_steps": 8, "min_bucket_resolution": 16, "max_bucket_resolution": 16},
             "trainer": {"name": "lora", "rank": 4, "alpha": 2, "target_modules": "attention",
                         "save_format": save_format, "timestep_sampling": "uniform"}}
    (out / "job.toml").write_text(tomli_w.dumps(table))
    with plugins_for_test():
        result = run_job_file(out / "job.toml")
    trained = {n: m for n, m in result.bundle.network.named_modules() if hasattr(m, "lora_A")}
    weights = load_lora(out / "lora.safetensors", bundle_of(tiny_pipeline[0]))
    assert weights.format == save_format and set(weights) == set(trained) and weights.ranks() == [4]
    for name, module in trained.items():
        expected = module.lora_B.default.weight @ module.lora_A.default.weight * 0.5
        assert expected.abs().max() > 0
        torch.testing.assert_close(weights[name].delta(), expected.detach(), rtol=0, atol=1e-6)
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:
        assert f.metadata()["format"] == save_format and f.metadata()["rank"] == "4"


def test_a_generate_job_applies_a_text_encoder_lora(tiny_pipeline, tmp_path):
    """A ``[[lora]]`` file with CLIP-L keys only (kohya's ``lora_te1_``) changes the images through
    the text encoder, merged and hooked alike; ``lora inspect`` lists the text-encoder targets."""
    from diffcore.api import describe_lora

    folder = tiny_pipeline[0]
    bundle = bundle_of(folder)
    clip = bundle.text_encoders()["text_encoder"]
    g = torch.Generator().manual_seed(3)
    layers = {n: LoraLayer(down=torch.randn(2, m.in_features, generator=g),
                           up=torch.randn(m.out_features, 2, generator=g), alpha=2.0)
              for n, m in clip.named_modules() if n.endswith(("self_attn.v_proj", "self_attn.out_proj"))}
    path = save_lora(tmp_path / "te.safetensors", {}, bundle, format="kohya", text_encoders={"text_encoder": layers})
    output = "\n".join(describe_lora(path))
    assert "text-encoder targets: text_encoder: 2" in output
    assert "text_model_encoder_layers_N_self_attn_v_proj" in output
    job = dict(sampling_steps=2, height=32, width=32)
    base, _ = run_job(tmp_path / "base", {"path": str(folder)}, **job)
    merged, _ = run_job(tmp_path / "merged", {"path": str(folder)}, lora=[{"path": str(path), "scale": 2.0}], **job)
    hooked, _ = run_job(tmp_path / "hooked", {"path": str(folder)},
                        lora=[{"path": str(path), "scale": 2.0, "merge": False}], **job)
    assert (merged[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(merged[0], hooked[0], rtol=0, atol=1e-4)


def test_text_weight_dtype_reaches_the_lazily_loaded_encoders(tiny_pipeline, tmp_path):
    """The core's ``text_weight_dtype`` wraps FLUX.1's text loader: the job runs, and the tiny
    encoders (no layer of 256 features) give the same images as without it."""
    folder = tiny_pipeline[0]
    plain, _ = run_job(tmp_path / "plain", {"path": str(folder)}, sampling_steps=2)
    stored, params = run_job(tmp_path / "fp8", {"path": str(folder), "text_weight_dtype": "float8_e4m3fn"},
                             sampling_steps=2)
    assert torch.equal(plain, stored)
