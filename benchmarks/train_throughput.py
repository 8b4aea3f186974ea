"""Framework overhead of the training loop: images/s of diffcore's ``train()`` on the demo DiT
next to the same step written the plain way (a bare PyTorch loop: same model, batch, loss,
AdamW, clipping and EMA), in one process, runs interleaved, median of each.

    python benchmarks/train_throughput.py [--steps 200] [--repeats 3] [--batch 128] [--threads 2]

Target: overhead under 5%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from diffcore.config.structure import structure
from diffcore.jobs.train import TrainSettings
from diffcore.plugins import registry


def build(seed: int):
    torch.manual_seed(seed)
    models = registry("models").get("dit")
    return models.build(structure({"variant": "digits"}, models.config))


def dataset():
    comp = registry("datasets").get("digits")
    return comp.build(structure({"split": "train"}, comp.config))


def run_diffcore(steps: int, batch: int) -> float:
    from diffcore.training.loop import train

    bundle = build(0)
    trainers = registry("trainers").get("full")
    trainer = trainers.build(structure({"timestep_sampling": "logit-normal"}, trainers.config), bundle=bundle)
    s = TrainSettings(steps=steps, batch_size=batch, lr=1e-3, ema_decay=0.999, checkpoint_every=0,
                      log_every=steps, device="cpu")
    data = dataset()
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        train(s, bundle=bundle, trainer=trainer, dataset=data, output_dir=out)
        return steps * batch / (time.perf_counter() - t)


def run_plain(steps: int, batch: int) -> float:
    bundle = build(0)
    net = bundle.network.train()
    data = dataset()
    images = torch.stack([d["image"] for d in data])
    labels = torch.stack([d["label"] for d in data])
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    null = bundle.num_classes
    t = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(batch, generator=g) < 0.1, torch.full_like(y, null), y)
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(torch.randn(batch, generator=g))
        s = sigma.view(-1, 1, 1, 1)
        loss = F.mse_loss(net((1 - s) * x0 + s * noise, sigma, y), noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.999, (1 + step) / (10 + step)))
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_plain(10, args.batch), run_diffcore(10, args.batch)  # warm-up
    ours, plain = [], []
    for _ in range(args.repeats):
        plain.append(run_plain(args.steps, args.batch))
        ours.append(run_diffcore(args.steps, args.batch))
    o, p = statistics.median(ours), statistics.median(plain)
    print(f"plain PyTorch loop: {p:8.1f} images/s  (runs: {', '.join(f'{x:.0f}' for x in plain)})")
    print(f"diffcore train():   {o:8.1f} images/s  (runs: {', '.join(f'{x:.0f}' for x in ours)})")
    print(f"overhead: {(p / o - 1) * 100:+.1f}%  (target < 5%)")


if __name__ == "__main__":
    main()
