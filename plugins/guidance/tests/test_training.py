"""Training learned guidance: the trainer, checkpoints, trajectories, and the train-guidance job."""

import json

import pytest
import torch
from guidance_helpers import TINY, randomize, tiny_dit

from diffcore.api import CheckpointError, ConfigError, GenerationRequest, registry
from diffcore_guidance.models import create_conv_guidance_model, create_mlp_guidance_model, load_guidance_model
from diffcore_guidance.rewards import classifier, mean_target
from diffcore_guidance.training import GuidanceModelTrainer
from diffcore_guidance.trajectories import collect_trajectories


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    img, pred = torch.randn(n, 1, 8, 8, generator=g), torch.randn(n, 1, 8, 8, generator=g)
    return img, pred, None, torch.randint(0, 5, (n,), generator=g), torch.rand(n, generator=g)


def test_train_step_fits_target_corrections_with_clipped_gradients():
    torch.manual_seed(0)
    model = create_mlp_guidance_model(1, num_classes=5, hidden_dim=32, num_layers=2)
    trainer = GuidanceModelTrainer(model, lr=3e-3, max_grad_norm=0.5)
    img, pred, txt, vec, t = batch()
    target = 0.5 * (img - pred)                             # a correction the model can express
    losses = [trainer.train_step(img, pred, txt, vec, t, 0, target_correction=target)["loss"] for _ in range(60)]
    assert losses[-1] < 0.3 * losses[0]
    assert trainer.step == 60


def test_gradients_are_clipped_to_max_grad_norm():
    """With plain SGD at lr 1 the update is the (clipped) gradient itself."""
    model = create_mlp_guidance_model(1, hidden_dim=16, num_layers=2)
    for clip in (0.5, 0.0):
        trainer = GuidanceModelTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), max_grad_norm=clip)
        img, pred, _, _, t = batch()
        before = [p.detach().clone() for p in model.parameters()]
        metrics = trainer.train_step(img, pred, None, None, t, 0, target_correction=100 * img)
        moved = torch.linalg.vector_norm(torch.stack([(p - b).norm() for p, b in zip(model.parameters(), before)]))
        assert metrics["grad_norm"] > 1.0                                  # the norm before clipping
        torch.testing.assert_close(moved, torch.tensor(clip or metrics["grad_norm"]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("inner_steps", [0, 3])
def test_train_from_reward_raises_the_reward_of_the_predicted_clean_sample(inner_steps):
    torch.manual_seed(0)
    model = create_conv_guidance_model(1, num_classes=5, hidden_channels=8, num_blocks=1)
    trainer = GuidanceModelTrainer(model, lr=1e-2, guidance_scale=1.0)
    img, pred, txt, vec, t = batch()
    sigma = t.reshape(-1, 1, 1, 1)
    to_denoised = lambda raw: img - sigma * raw             # flow: x0 = x - sigma * v
    reward = mean_target(0.8)
    first = trainer.train_from_reward(img, pred, txt, vec, t, 0, reward, to_denoised=to_denoised,
                                      num_guidance_steps=inner_steps, guidance_lr=5.0)
    for _ in range(40):
        last = trainer.train_from_reward(img, pred, txt, vec, t, 0, reward, to_denoised=to_denoised,
                                         num_guidance_steps=inner_steps, guidance_lr=5.0)
    assert last["avg_reward"] > first["avg_reward"] + 0.05


def test_checkpoints_resume_weights_optimizer_and_step(tmp_path):
    torch.manual_seed(0)
    model = create_mlp_guidance_model(1, hidden_dim=16, num_layers=2)
    trainer = GuidanceModelTrainer(model, lr=1e-2)
    img, pred, _, _, t = batch()
    for _ in range(3):
        trainer.train_step(img, pred, None, None, t, 0, target_correction=img)
    path = trainer.save_checkpoint(tmp_path / "step-000003")
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.pt", "state.json"]
    resumed = GuidanceModelTrainer(create_mlp_guidance_model(1, hidden_dim=16, num_layers=2), lr=1e-2)
    resumed.load_checkpoint(path)
    assert resumed.step == 3
    a = trainer.train_step(img, pred, None, None, t, 0, target_correction=img)
    b = resumed.train_step(img, pred, None, None, t, 0, target_correction=img)
    assert a["loss"] == b["loss"]
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(CheckpointError, match="not a guidance trainer checkpoint"):
        resumed.load_checkpoint(tmp_path)


def test_trajectories_record_every_step_with_an_exact_x0_map():
    bundle = tiny_dit()
    comp = registry("guidance").get("cfg")
    sampler = registry("samplers").get("euler").build()
    requests = [GenerationRequest(batch=3, labels=torch.tensor([0, 1, 2]))]
    data = collect_trajectories(bundle, requests, sampler, torch.linspace(1, 0, 5),
                                guidance=[comp.factory(comp.config(scale=2.0))])
    assert len(data) == 3 * 4
    assert data.data["step_idx"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert torch.equal(data.vec, torch.tensor([0, 1, 2] * 4))
    b = data.batch(torch.arange(len(data)))
    sigma = b["timestep"].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(data.to_denoised(b)(b["pred"]), b["img"] - sigma * b["pred"])
    assert not torch.allclose(b["pred"], b["cond_pred"])          # pred is after CFG, cond_pred before


def test_rewards_are_a_component_kind_other_plugins_extend(diffcore_plugins):
    from diffcore.api import hookimpl

    class Brightness:
        @hookimpl
        def register_rewards(self, register):
            import attrs

            @attrs.frozen
            class Config:
                level: float = 0.0

            register("brightness", lambda cfg: (lambda x0, cond=None: x0.flatten(1).mean(1) - cfg.level),
                     config=Config, description="mean value")

    diffcore_plugins.register_module(Brightness(), name="brightness-plugin")
    rewards = diffcore_plugins.registry("rewards")
    assert {"in-range", "total-variation", "mean-target", "classifier", "brightness"} <= {c.name for c in rewards}
    assert rewards.get("brightness").plugin == "brightness-plugin"
    x = torch.full((2, 1, 4, 4), 2.0)
    assert rewards.get("brightness").build()(x).tolist() == [2.0, 2.0]
    assert rewards.get("in-range").build()(x).tolist() == [-1.0, -1.0]
    tv = rewards.get("total-variation").build()
    assert tv(x).tolist() == [0.0, 0.0] and tv(torch.arange(16.0).reshape(1, 1, 4, 4)).item() == 5.0


def test_classifier_reward_is_the_label_log_probability(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    x = torch.randn(3, 1, 8, 8)
    labels = torch.tensor([0, 4, 5])                              # 5: the null class scores 0
    want = torch.log_softmax(net(x), -1)[torch.arange(2), labels[:2]]
    got = classifier(net, "y")(x, {"y": labels})
    torch.testing.assert_close(got[:2], want)
    assert got[2] == 0
    program = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "clf.pt2"))
    comp = registry("rewards").get("classifier")
    torch.testing.assert_close(comp.build(comp.config(path=str(tmp_path / "clf.pt2")))(x, {"y": labels}), got)
    with pytest.raises(CheckpointError, match="cannot load an exported classifier"):
        comp.build(comp.config(path=str(tmp_path / "missing.pt2")))


def write_job(tmp_path, objective, extra=""):
    from safetensors.torch import save_file

    weights = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in randomize(tiny_dit().network, 0).state_dict().items()}, str(weights))
    model = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    job = tmp_path / "job.toml"
    job.write_text(f"""
[job]
kind = "train-guidance"
output_dir = "{tmp_path / 'out'}"
objective = "{objective}"
num_samples = 10
batch_size = 5
sampling_steps = 4
train_steps = 40
train_batch = 32
lr = 3e-3
eval_samples = 10
checkpoint_every = 20
{extra}

[model]
family = "dit"
checkpoint = "{weights}"
{model}

[guidance_model]
type = "conv"
hidden = 16
layers = 2
""")
    return job


def test_train_guidance_job_with_a_reward(tmp_path):
    from diffcore.testing import run_job_file as run

    job = write_job(tmp_path, "reward")
    job.write_text(job.read_text() + '\n[reward]\nname = "mean-target"\ntarget = 0.5\n')
    summary = run(job)
    out = tmp_path / "out"
    assert summary["records"] == 10 * 4
    assert summary["eval"]["learned_reward"] > summary["eval"]["base_reward"] + 0.1
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000020", "step-000040"]
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "summary.json").read_text())["eval"] == summary["eval"]
    model = load_guidance_model(out / "guidance_model.safetensors")
    assert model.config()["num_classes"] == TINY["num_classes"]


def test_train_guidance_job_distilling_cfg(tmp_path):
    from diffcore.testing import run_job_file as run

    summary = run(write_job(tmp_path, "cfg-distill", "teacher_cfg_scale = 3.0"))
    assert summary["eval"]["learned_mse_to_teacher"] < 0.7 * summary["eval"]["base_mse_to_teacher"]


def test_a_reward_objective_without_a_reward_is_a_config_error(tmp_path):
    from diffcore.testing import run_job_file as run

    with pytest.raises(ConfigError, match="needs a \\[reward\\] table"):
        run(write_job(tmp_path, "reward"))
