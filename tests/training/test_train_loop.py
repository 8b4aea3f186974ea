"""The training loop (diffcore.training.loop): exact resume, checkpoints, accumulation, bf16."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffcore.errors import CheckpointError, ConfigError
from diffcore.training import state
from diffcore.training.loop import train
from training_standins import RegressionTrainer, ToyImages, full_trainer, settings, tiny_bundle


def _run(out, trainer_factory=None, stop_after=None, preview=None, **changes):
    bundle = tiny_bundle()
    if trainer_factory is None:
        trainer = full_trainer(bundle, cond_dropout=0.3, timestep_sampling="logit-normal")
    else:
        trainer = trainer_factory(bundle)
    s = settings(out, **changes)
    result = train(s, bundle=bundle, trainer=trainer, dataset=ToyImages(), output_dir=out,
                   config={"job": {"seed": s.seed}}, preview=preview, stop_after=stop_after)
    return bundle, result


def _files(path):
    return (load_file(path / "model.safetensors"), load_file(path / "ema.safetensors"),
            torch.load(path / "optimizer.pt", weights_only=True))


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(("optimizer", "num_workers"), [("adamw", 0), ("muon", 0), ("adamw", 2)])
def test_resume_is_bit_exact(tmp_path, optimizer, num_workers):
    """6 steps straight == 3 steps, stop, resume = "latest", 3 more: weights, EMA, optimizer state and
    losses bit for bit (cosine schedule, warm-up, accumulation, label dropout, clipping all on; with
    loader workers prefetching ahead of what the checkpoint records as consumed)."""
    knobs = dict(steps=6, grad_accum=2, lr_schedule="cosine", warmup_steps=2, optimizer=optimizer,
                 weight_decay=0.01, max_grad_norm=0.5, checkpoint_every=3, num_workers=num_workers)
    _, straight = _run(tmp_path / "a", **knobs)
    _, first = _run(tmp_path / "b", stop_after=3, **knobs)
    assert first.step == 3 and first.checkpoint.name == "step-000003"
    _, second = _run(tmp_path / "b", resume="latest", **knobs)
    assert second.step == 6
    assert straight.losses == first.losses + second.losses
    model_a, ema_a, opt_a = _files(tmp_path / "a" / "checkpoints" / "step-000006")
    model_b, ema_b, opt_b = _files(tmp_path / "b" / "checkpoints" / "step-000006")
    _assert_same_tensors(model_a, model_b)
    _assert_same_tensors(ema_a, ema_b)
    flat = lambda o: {f"{i}.{p}.{k}": v for i, s in enumerate(o["states"])  # noqa: E731
                      for p, st in s["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    _assert_same_tensors(flat(opt_a), flat(opt_b))
    assert not torch.equal(model_a["out.weight"], ema_a["out.weight"])  # EMA is its own set of weights


def test_checkpoint_folder_contents_and_resume_from_a_path(tmp_path):
    bundle, result = _run(tmp_path, steps=4, checkpoint_every=2)
    path = tmp_path / "checkpoints" / "step-000004"
    assert sorted(p.name for p in path.iterdir()) == sorted((*state.FILES, state.MANIFEST))
    manifest = json.loads((path / state.MANIFEST).read_text())
    assert manifest == {"step": 4, "files": {f: (path / f).stat().st_size for f in state.FILES}}
    saved = state.load(path)
    assert saved["state"]["step"] == 4 and saved["state"]["samples"] == 16
    assert saved["state"]["sampler"] == {"epoch": 0, "position": 16, "n": 24, "seed": 3}
    assert saved["state"]["ema"]["num_updates"] == 4 and saved["scheduler"]["last_lr"] == pytest.approx(1e-2)
    assert saved["config"] == {"job": {"seed": 3}} and len(saved["rng"]) == 1
    _assert_same_tensors(saved["model"], bundle.network.state_dict())
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4] and lines[-1]["loss"] == result.losses[-1][1]
    # resume from an explicit folder (the older one) and run to the end again
    _, again = _run(tmp_path, steps=4, checkpoint_every=2, resume=str(tmp_path / "checkpoints" / "step-000002"))
    assert again.losses == result.losses[2:]
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        _run(tmp_path, resume=str(tmp_path / "nowhere"))


def test_stale_tmp_is_ignored_and_keep_last(tmp_path):
    root = tmp_path / "checkpoints"
    stale = root / "step-000009.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half a file")
    incomplete = root / "step-000008"   # no state.json: never finished, never "latest"
    incomplete.mkdir()
    assert state.resolve("latest", root) is None
    _, result = _run(tmp_path, resume="latest", steps=5, checkpoint_every=1, keep_last=2)
    assert result.losses[0][0] == 1                       # started from scratch
    assert not stale.exists()                             # the interrupted save was cleaned up
    assert [p.name for p in state.list_checkpoints(root)] == ["step-000004", "step-000005"]
    assert state.resolve("latest", root).name == "step-000005"


def test_a_folder_that_disagrees_with_its_manifest_is_never_resumed(tmp_path):
    """A step folder whose files are not the sizes its manifest lists (copied or damaged after the
    save) is passed over by ``latest`` with a message, refused by path, and replaced by the next save;
    a log line a kill cut short is dropped on resume."""
    _, straight = _run(tmp_path, steps=4, checkpoint_every=2)
    root, newest = tmp_path / "checkpoints", tmp_path / "checkpoints" / "step-000004"
    size = (newest / "optimizer.pt").stat().st_size
    with open(newest / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    warned = []
    assert state.resolve("latest", root, warn=warned.append).name == "step-000002"
    reason = f"optimizer.pt has 100 bytes, manifest.json says {size}"
    assert warned == [f"ignoring {newest}: not a complete checkpoint ({reason})"]
    with pytest.raises(CheckpointError, match=reason):
        state.resolve(str(newest), root)
    (root / "step-000002" / state.MANIFEST).unlink()   # a folder from before manifests: all files there
    assert state.incomplete(root / "step-000002") is None
    assert state.incomplete(newest.with_name("step-000009")) == "not a folder"

    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    _, resumed = _run(tmp_path, steps=4, checkpoint_every=2, resume="latest")
    assert resumed.losses == straight.losses[2:] and state.incomplete(newest) is None
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in log] == straight.losses


def test_a_save_is_durable_before_it_is_visible(tmp_path, monkeypatch):
    """Each file is fsynced in ``step-N.tmp/``, the manifest last, then the folder; only then the
    rename makes the checkpoint visible, and the parent folder is fsynced to keep the rename."""
    events = []
    fsync, replace = state._fsync, os.replace
    monkeypatch.setattr(state, "_fsync", lambda p: (events.append(("fsync", p.name)), fsync(p)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", Path(a).name, Path(b).name)),
                                                     replace(a, b)))
    _run(tmp_path, steps=2, checkpoint_every=2)
    n = len(state.FILES)
    assert sorted(events[:n]) == sorted(("fsync", f) for f in state.FILES)
    assert events[n:] == [("fsync", state.MANIFEST), ("fsync", "step-000002.tmp"),
                          ("rename", "step-000002.tmp", "step-000002"), ("fsync", "checkpoints")]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    _run(tmp_path, steps=2, checkpoint_every=2)
    root = tmp_path / "checkpoints"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(state, "save_file", crash)  # dies after the .tmp folder exists
    with pytest.raises(OSError, match="disk full"):
        _run(tmp_path, steps=4, checkpoint_every=4, resume="latest")
    assert (root / "step-000004.tmp").is_dir() and not (root / "step-000004").exists()
    assert state.resolve("latest", root).name == "step-000002"


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    """accum 2 x batch 4 == batch 8: the same samples per step, the same averaged gradient."""
    knobs = dict(steps=3, lr=1e-2, max_grad_norm=1.0, checkpoint_every=0)
    a, ra = _run(tmp_path / "a", RegressionTrainer, batch_size=4, grad_accum=2, **knobs)
    b, rb = _run(tmp_path / "b", RegressionTrainer, batch_size=8, grad_accum=1, **knobs)
    for (sa, la), (sb, lb) in zip(ra.losses, rb.losses):
        assert sa == sb and la == pytest.approx(lb, rel=1e-6)
    for (k, pa), pb in zip(a.network.state_dict().items(), b.network.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(a.network.out.weight, tiny_bundle().network.out.weight)  # it did train


def test_bf16_autocast_on_cpu(tmp_path):
    bundle, result = _run(tmp_path, steps=3, mixed_precision="bf16", checkpoint_every=0)
    assert set(bundle.network.seen_dtypes) == {torch.bfloat16}          # the forward ran under autocast
    assert all(p.dtype == torch.float32 for p in bundle.network.parameters())  # fp32 master weights
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    fp32, _ = _run(tmp_path / "fp32", steps=3, checkpoint_every=0)
    assert set(fp32.network.seen_dtypes) == {torch.float32}


def test_gradient_checkpointing_switch(tmp_path):
    plain, _ = _run(tmp_path / "a", RegressionTrainer, steps=2, checkpoint_every=0)
    ckpt, _ = _run(tmp_path / "b", RegressionTrainer, steps=2, checkpoint_every=0, gradient_checkpointing=True)
    assert ckpt.network.gradient_checkpointing and not plain.network.gradient_checkpointing
    for pa, pb in zip(plain.network.parameters(), ckpt.network.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-7)   # recomputation changes nothing

    def no_switch(bundle):
        del bundle.network.gradient_checkpointing
        return RegressionTrainer(bundle)

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        _run(tmp_path / "c", no_switch, steps=1, gradient_checkpointing=True)


def test_preview_sees_ema_weights_in_eval_mode(tmp_path):
    seen = []

    def preview(bundle, step):
        net = bundle.network
        seen.append((step, net.training, torch.is_grad_enabled(), net.out.weight.detach().clone()))

    bundle, result = _run(tmp_path, preview=preview, steps=4, validate_every=2, checkpoint_every=0)
    assert [(s, t, g) for s, t, g, _ in seen] == [(2, False, False), (4, False, False)]
    assert torch.equal(seen[-1][3], result.ema.shadow["out.weight"])      # EMA weights inside
    assert not torch.equal(bundle.network.out.weight, seen[-1][3])        # trained weights back after
    assert bundle.network.training


def test_unknown_optimizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown optimizer 'sgd'"):
        _run(tmp_path, optimizer="sgd")


def test_resume_after_a_crash_redoes_the_lost_steps(tmp_path):
    """A crash after step 3 (checkpoint at 2): resuming redoes step 3 with the same result and
    the log keeps one line per step."""
    _, straight = _run(tmp_path / "straight", steps=4, checkpoint_every=2)

    def crash(bundle, step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "crash", preview=crash, steps=4, checkpoint_every=2, validate_every=1)
    _, resumed = _run(tmp_path / "crash", steps=4, checkpoint_every=2, resume="latest")
    assert resumed.losses == straight.losses[2:]
    log = [json.loads(x) for x in (tmp_path / "crash" / "log.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"]) for x in log] == straight.losses


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_bit_exact_on_bucketed_captioned_data(tmp_path, num_workers):
    """The captioned dataset's BucketBatches through the loop: 6 steps straight == 3 + resume + 3 bit
    for bit, with flips, random crops and tag shuffles drawn per visit and caption dropout on."""
    from PIL import Image

    from caption_standins import caption_bundle
    from diffcore.data.captions import CaptionedDataset

    data = tmp_path / "data"
    data.mkdir()
    for i, (w, h) in enumerate([(40, 40), (36, 36), (60, 30), (64, 34), (58, 28), (30, 60), (32, 64)]):
        pixels = torch.rand(h, w, 3, generator=torch.Generator().manual_seed(i)) * 255
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"photo {i}, red, blue cat, on the mat")

    def run(out, stop_after=None, **changes):
        bundle = caption_bundle()
        trainer = full_trainer(bundle, cond_dropout=0.3, timestep_sampling="logit-normal")
        dataset = CaptionedDataset(data, resolution=32, bucket_resolution_steps=8, min_bucket_resolution=16,
                                   max_bucket_resolution=64, flip=True, center_crop=False, shuffle_tags=True)
        s = settings(out, batch_size=2, grad_accum=2, num_workers=num_workers, **changes)
        return train(s, bundle=bundle, trainer=trainer, dataset=dataset, output_dir=out, config={},
                     stop_after=stop_after)

    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_after=3)
    second = run(tmp_path / "b", resume="latest")
    assert straight.losses == first.losses + second.losses and len(straight.losses) == 6
    saved = state.load(tmp_path / "b" / "checkpoints" / "step-000003")["state"]["sampler"]
    assert saved["epoch"] * saved["batches_per_epoch"] + saved["position"] == 3 * 2   # global batches consumed
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same_tensors(load_file(tmp_path / "a" / "checkpoints" / "step-000006" / name),
                             load_file(tmp_path / "b" / "checkpoints" / "step-000006" / name))


def test_muon_keeps_each_learning_rate_ratio_in_its_own_group():
    """A text encoder's own rate (``text_encoder_lr``) reaches its matrices under Muon too."""
    from torch import nn

    from diffcore.training.optim import build_optimizer

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    net = nn.ModuleDict({"unet": nn.Linear(4, 4), "text": nn.Linear(4, 4)})
    slow = {id(p) for p in net["text"].parameters()}
    opt = build_optimizer(net, net.parameters(), "muon", lr=1e-3, weight_decay=0.0,
                          lr_scale=lambda p: 0.1 if id(p) in slow else 1.0)
    muon, adamw = opt.optimizers
    by_scale = {g["lr_scale"]: g["params"] for g in muon.param_groups}
    assert by_scale[0.1] == [net["text"].weight] and by_scale[1.0] == [net["unet"].weight]
    assert {g["lr_scale"] for g in adamw.param_groups} == {0.1, 1.0}   # the biases
