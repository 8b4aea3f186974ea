"""Learned guidance on the digits DiT: does a guidance model trained from a classifier's reward
make the samples more recognisable, judged on held-out seeds and by a second, independent classifier?

1. The generator: the demo DiT (examples/digits/train.toml), trained into ``--run-dir`` unless a
   checkpoint is there. By default its checkpoint after 500 of the 2500 steps: fully trained, the
   demo's samples at CFG 1 are already 95-99% recognisable, which leaves no room to show a gain.
2. The reward: a small CNN trained here on the real digits training split (never the generator's
   weights), exported with ``torch.export`` for the plugin's ``classifier`` reward,
   ``log p(label | x0)``; smooth activations and noise / shift augmentation keep its gradient
   informative on generated images.
3. A ``train-guidance`` job (objective ``reward``): trajectories of the generator's own sampling at
   ``--cfg`` with ``--steps`` Euler steps, a conv guidance model trained on them.
4. Held-out seeds (other noise than the trajectories, ``--per-class`` samples of every digit),
   sampled at the same CFG scale and steps without and with the learned guidance: the reward,
   the CNN's accuracy, the accuracy of a scikit-learn SVC fitted on the real training split (as
   benchmarks/digits_quality.py; it never saw the reward), and a Frechet distance to the held-out
   real digits on PCA features (does the guidance keep the digits real-looking?). Strong CFG is
   listed for reference.

    python benchmarks/learned_guidance.py [--run-dir runs/digits] [--generator-step 500] [--steps 10] [--cfg 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 25   # the job logs the training batch's mean reward every this many steps


def real_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 8, 8) in [-1, 1], labels (N,)) of scikit-learn's digits, the core's split."""
    from diffcore.data.catalog import DigitsConfig
    from diffcore.plugins import registry

    data = registry("datasets").get("digits").build(DigitsConfig(split=split))
    return torch.stack([item["image"] for item in data]), torch.stack([item["label"] for item in data])


class DigitClassifier(nn.Module):
    """Two 3x3 convolutions, a 2x2 average pool and an MLP head: logits over the 10 digits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.SiLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random shift of up to one pixel each way (the border filled with -1, the background) and Gaussian noise."""
    n = images.shape[0]
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, n), generator=generator)
    rows = (torch.arange(8)[None] + dy[:, None])[:, :, None]
    cols = (torch.arange(8)[None] + dx[:, None])[:, None, :]
    shifted = padded[torch.arange(n)[:, None, None], 0, rows, cols][:, None]
    return shifted + 0.15 * torch.randn(shifted.shape, generator=generator)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(labels) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=generator).split(64):
            loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def export_classifier(model: DigitClassifier, path: Path) -> Path:
    """The ``classifier`` reward's file format: ``torch.export`` with a dynamic batch."""
    program = torch.export.export(model, (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def ensure_generator(run_dir: Path) -> float | None:
    """Train the demo into ``run_dir`` unless it has a checkpoint, keeping every checkpoint (one
    each 500 steps) so an early one can be the generator; the training wall time, or None."""
    if list(run_dir.glob("checkpoints/step-*")):
        return None
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffcore", "run", str(ROOT / "examples/digits/train.toml"),
                    "--set", f"job.output_dir={run_dir}", "--set", "job.keep_last=5"], check=True)
    return time.perf_counter() - start


def generator_checkpoint(run_dir: Path, step: int) -> Path:
    """The run's checkpoint after ``step`` training steps (0: the run folder, i.e. its newest)."""
    if step == 0:
        return run_dir
    folder = run_dir / "checkpoints" / f"step-{step:06d}"
    if not folder.is_dir():
        have = ", ".join(sorted(p.name for p in run_dir.glob("checkpoints/step-*"))) or "none"
        raise SystemExit(f"{folder} is missing (the run has: {have}); the demo keeps its last two checkpoints: "
                         f"retrain with --set job.keep_last=5 into an empty --run-dir, or pick --generator-step")
    return folder


def train_guidance(args: argparse.Namespace, checkpoint: Path, classifier_path: Path, out: Path) -> dict[str, Any]:
    """Run the plugin's ``train-guidance`` job from a job file written into ``out``."""
    import tomli_w

    from diffcore.jobs.runner import run

    job = {
        "job": {"kind": "train-guidance", "output_dir": str(out), "seed": 0, "device": "cpu", "objective": "reward",
                "num_samples": args.trajectories, "batch_size": 100, "sampling_steps": args.steps, "cfg_scale": args.cfg,
                "train_steps": args.train_steps, "train_batch": 128, "lr": args.lr, "guidance_scale": 1.0,
                "reg_weight": args.reg_weight, "log_every": LOG_EVERY},
        "model": {"family": "dit", "variant": "digits", "checkpoint": str(checkpoint)},
        "sampler": {"name": "euler"},
        "guidance_model": {"type": "conv", "hidden": 64, "layers": 3},
        "reward": {"name": "classifier", "path": str(classifier_path)},
    }
    if out.exists():
        shutil.rmtree(out)   # the job appends to its log: start this run's from empty
    out.mkdir(parents=True)
    (out / "job.toml").write_text(tomli_w.dumps(job))
    return run(out / "job.toml")


def sample_digits(checkpoint: Path, guidance: list[Any], per_class: int, steps: int, seed: int) -> torch.Tensor:
    """``per_class`` samples of every digit from fixed noise, clamped to the pixel range [-1, 1]."""
    from diffcore.api import GenerationRequest, registry, sample
    from diffcore.config.structure import structure

    models = registry("models").get("dit")
    bundle = models.build(structure({"variant": "digits", "checkpoint": str(checkpoint)}, models.config))
    bundle.network.eval()
    labels = torch.arange(10).repeat(per_class)
    noise = torch.randn((len(labels), *bundle.latent_shape(None)), generator=torch.Generator().manual_seed(seed))
    sigmas = registry("schedules").get("flow").build().sigmas(steps)
    request = GenerationRequest(batch=len(labels), labels=labels)
    with torch.no_grad():
        images = sample(bundle, noise, bundle.conditions(request), sigmas, registry("samplers").get("euler").build(),
                        guidance=guidance, disable=True)
    return images.clamp(-1, 1)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


def save_grid(images: torch.Tensor, path: Path, rows: int = 10, zoom: int = 4) -> None:
    """The first ``rows`` samples of each digit (sample i shows digit i % 10), a column per digit."""
    from PIL import Image

    tiles = F.pad(images[:10 * rows, 0], (1, 1, 1, 1), value=0.0)   # a grey frame around each digit
    grid = tiles.reshape(rows, 10, 10, 10).permute(0, 2, 1, 3).reshape(10 * rows, 100)
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).resize((100 * zoom, 10 * rows * zoom), Image.NEAREST).save(path)


def fit_svc(images: torch.Tensor, labels: torch.Tensor) -> Any:
    """digits_quality.py's judge: an RBF SVM on the raw pixels of the real training split."""
    from sklearn.svm import SVC

    return SVC(gamma="scale").fit(images.flatten(1).numpy(), labels.numpy())


def fit_pca(images: torch.Tensor) -> Any:
    """20 principal components of the real training split, the features of the Frechet distance."""
    from sklearn.decomposition import PCA

    return PCA(n_components=20, random_state=0).fit(images.flatten(1).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/digits", help="the demo's run folder (trained if empty)")
    parser.add_argument("--generator-step", type=int, default=500,
                        help="use the run's checkpoint after this many of its 2500 training steps: an under-trained "
                             "generator whose digits leave room for improvement (0: the newest, fully trained)")
    parser.add_argument("--out", default="runs/learned-guidance", help="where the classifier and the job write")
    parser.add_argument("--steps", type=int, default=10, help="Euler sampling steps, for trajectories and evaluation")
    parser.add_argument("--cfg", type=float, default=1.0, help="the weak CFG scale the guidance model works after")
    parser.add_argument("--reference-cfg", type=float, default=3.0, help="a strong CFG scale, listed for reference")
    parser.add_argument("--trajectories", type=int, default=400, help="samples whose sampling is recorded")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--reg-weight", type=float, default=1.0,
                        help="the trainer's reg_weight * mean(correction^2): without it (0) the model over-fits "
                             "the classifier and the digits drift from real ones (the Frechet distance shows it)")
    parser.add_argument("--per-class", type=int, default=50, help="held-out samples of each digit")
    parser.add_argument("--eval-seed", type=int, default=1234, help="noise seed of the held-out samples")
    parser.add_argument("--classifier-epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    walls: dict[str, float] = {}

    train_s = ensure_generator(run_dir)
    if train_s is not None:
        walls["generator training (examples/digits/train.toml)"] = train_s
    checkpoint = generator_checkpoint(run_dir, args.generator_step)

    x_train, y_train = real_digits("train")
    x_test, y_test = real_digits("test")
    start = time.perf_counter()
    classifier = train_classifier(x_train, y_train, args.classifier_epochs)
    walls["reward classifier training (CNN)"] = time.perf_counter() - start
    classifier_path = export_classifier(classifier, out / "digit_classifier.pt2")
    start = time.perf_counter()
    svc = fit_svc(x_train, y_train)
    walls["independent SVC fit"] = time.perf_counter() - start
    pca = fit_pca(x_train)
    with torch.no_grad():
        cnn_real = (classifier(x_test).argmax(1) == y_test).float().mean().item()
    svc_real = float((svc.predict(x_test.flatten(1).numpy()) == y_test.numpy()).mean())

    start = time.perf_counter()
    summary = train_guidance(args, checkpoint, classifier_path, out / "job")
    walls[f"train-guidance job ({summary['records']} records, {args.train_steps} steps)"] = time.perf_counter() - start
    log = [json.loads(line) for line in (out / "job" / "log.jsonl").read_text().splitlines()]

    from diffcore.sampling.cfg import CFG
    from diffcore_guidance.learned import LearnedGuidance
    from diffcore_guidance.models import load_guidance_model

    def cfg(scale: float) -> list[Any]:
        return [CFG(scale=scale)] if scale != 1 else []

    learned = LearnedGuidance(model=load_guidance_model(out / "job" / "guidance_model.safetensors"))
    chains = {f"CFG {args.cfg:g}": cfg(args.cfg), f"CFG {args.cfg:g} + learned conv": [*cfg(args.cfg), learned],
              f"CFG {args.reference_cfg:g} (reference, no learned)": cfg(args.reference_cfg)}
    labels = torch.arange(10).repeat(args.per_class)
    held_out_real = pca.transform(x_test.flatten(1).numpy())
    rows = []
    for name, chain in chains.items():
        start = time.perf_counter()
        images = sample_digits(checkpoint, chain, args.per_class, args.steps, seed=args.eval_seed)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            logits = classifier(images)
        reward = F.log_softmax(logits, -1).gather(1, labels[:, None]).mean().item()
        cnn = (logits.argmax(1) == labels).float().mean().item()
        predicted = svc.predict(images.flatten(1).numpy())
        svc_acc = float((predicted == labels.numpy()).mean())
        worst = min(range(10), key=lambda c: (predicted[labels.numpy() == c] == c).mean())
        worst_acc = float((predicted[labels.numpy() == worst] == worst).mean())
        fd = frechet(pca.transform(images.flatten(1).numpy()), held_out_real)
        rows.append((name, reward, cnn, svc_acc, f"{worst}: {worst_acc:.2f}", fd, seconds))
        save_grid(images, out / f"samples-{len(rows)}.png")
    fd_real = frechet(pca.transform(x_train.flatten(1).numpy()), held_out_real)

    load = os.getloadavg()
    print(f"generator: {checkpoint}; {args.steps} Euler steps, CFG {args.cfg:g}; "
          f"{args.per_class * 10} held-out samples ({args.per_class} per digit, noise seed {args.eval_seed}; "
          f"trajectories used seed 0)")
    print(f"reward classifier (CNN) accuracy on held-out real digits: {cnn_real:.3f}; "
          f"independent SVC: {svc_real:.3f}")
    print(f"guidance training, mean reward of the x0 estimates in the training batch: "
          f"{log[0]['avg_reward']:.3f} at step {log[0]['step']}, "
          f"{statistics.mean(r['avg_reward'] for r in log[-4:]):.3f} over the last {4 * LOG_EVERY} steps")
    print()
    print(f"| {'guidance':<32} | reward log p | CNN acc | SVC acc | SVC worst digit | FD PCA-20 | sampling s |")
    print(f"|{'-' * 34}|--------------|---------|---------|-----------------|-----------|------------|")
    for name, reward, cnn, svc_acc, worst, fd, seconds in rows:
        print(f"| {name:<32} | {reward:12.3f} | {cnn:7.3f} | {svc_acc:7.3f} | {worst:<15} | {fd:9.2f} "
              f"| {seconds:10.2f} |")
    print(f"(FD PCA-20 of real training vs held-out real digits: {fd_real:.2f})")
    print()
    gain = 100 * (rows[1][3] - rows[0][3])
    print(f"SVC accuracy with vs without the learned guidance: {rows[1][3]:.3f} vs {rows[0][3]:.3f} "
          f"({gain:+.1f} points; target >= +10 where the baseline leaves room)")
    print(f"sample grids (a column per digit, in the table's order): {out}/samples-1.png .. -{len(rows)}.png")
    print("wall times: " + "; ".join(f"{k} {v:.1f} s" for k, v in walls.items()))
    print(f"torch threads {torch.get_num_threads()}; load average (1, 5, 15 min) at the end: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
