"""How good is the demo? Train (or reuse) examples/digits/train.toml, sample 100 digits per class
with CFG (a guidance interval) from the EMA weights, and score them with models fitted on real digits only:

- accuracy of an SVM digit classifier (scikit-learn, trained on the real training split) on the
  generated samples, per class and overall;
- a Fréchet distance between generated and held-out real digits on PCA features (fitted on the
  real training split), next to the real-vs-real distance (training split vs held-out split);
- wall time of training and of sampling.

    python benchmarks/digits_quality.py [--run-dir runs/digits] [--retrain]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from sklearn.decomposition import PCA
from sklearn.svm import SVC

ROOT = Path(__file__).resolve().parents[1]


def real_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from diffcore.data.catalog import DigitsConfig
    from diffcore.plugins import registry

    data = registry("datasets").get("digits").build(DigitsConfig(split=split))
    images = torch.stack([item["image"] for item in data]).reshape(len(data), -1).numpy()
    labels = np.array([int(item["label"]) for item in data])
    return images, labels


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def generate(run_dir: Path, per_class: int, cfg: float, cfg_stop: float, steps: int) -> np.ndarray:
    """``per_class`` samples of each digit with CFG over the first ``cfg_stop`` of the schedule
    (a guidance interval, Kynkaanniemi et al. 2024: strong guidance late in sampling costs
    diversity without helping class fidelity)."""
    from diffcore.config.structure import structure
    from diffcore.models import GenerationRequest
    from diffcore.plugins import registry
    from diffcore.sampling.cfg import CFG
    from diffcore.sampling.engine import sample

    models = registry("models").get("dit")
    bundle = models.build(structure({"variant": "digits", "checkpoint": str(run_dir)}, models.config))
    bundle.network.eval()
    sampler = registry("samplers").get("euler").build()
    sigmas = registry("schedules").get("flow").build().sigmas(steps)
    labels = torch.arange(10).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn((len(labels), *bundle.latent_shape(None)), generator=generator)
    request = GenerationRequest(batch=len(labels), labels=labels)
    with torch.no_grad():
        images = sample(bundle, noise, bundle.conditions(request), sigmas, sampler,
                        guidance=[CFG(scale=cfg, stop=cfg_stop)], disable=True).clamp(-1, 1)
    return images.reshape(len(images), -1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/digits")
    parser.add_argument("--retrain", action="store_true", help="train even if the run folder has checkpoints")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--cfg-stop", type=float, default=0.4, help="CFG over this first fraction of the steps")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    run_dir = Path(args.run_dir)

    train_s = None
    if args.retrain or not list(run_dir.glob("checkpoints/step-*")):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffcore", "run", str(ROOT / "examples/digits/train.toml"),
                        "--set", f"job.output_dir={run_dir}"], check=True)
        train_s = time.perf_counter() - t

    t = time.perf_counter()
    generated = generate(run_dir, args.per_class, args.cfg, args.cfg_stop, args.steps)
    sample_s = time.perf_counter() - t
    labels = np.repeat(np.arange(10), args.per_class)

    x_train, y_train = real_digits("train")
    x_test, y_test = real_digits("test")
    classifier = SVC(gamma="scale").fit(x_train, y_train)
    real_acc = (classifier.predict(x_test) == y_test).mean()
    predicted = classifier.predict(generated)
    per_class = [(predicted[labels == c] == c).mean() for c in range(10)]

    pca = PCA(n_components=20, random_state=0).fit(x_train)
    fd_gen = frechet(pca.transform(generated), pca.transform(x_test))
    fd_real = frechet(pca.transform(x_train), pca.transform(x_test))

    print(f"classifier accuracy on held-out real digits: {real_acc:.3f}")
    print("accuracy on generated digits per class: " + " ".join(f"{c}:{a:.2f}" for c, a in enumerate(per_class)))
    print(f"accuracy on generated digits overall:    {np.mean(per_class):.3f}  (target >= 0.95)")
    print(f"Frechet distance (PCA-20) generated vs held-out: {fd_gen:.2f}")
    print(f"Frechet distance (PCA-20) real train vs held-out: {fd_real:.2f}  ratio {fd_gen / fd_real:.2f} (target <= 2)")
    if train_s is not None:
        print(f"training wall time: {train_s:.0f} s (target < 180 s on 2 cores)")
    print(f"sampling {len(generated)} digits ({args.steps} Euler steps, CFG {args.cfg} over the first "
          f"{args.cfg_stop:.0%} of the steps): {sample_s:.1f} s")


if __name__ == "__main__":
    main()
