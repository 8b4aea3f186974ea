"""One SD3 MMDiT forward: diffcore's ``MMDiT`` against diffusers' ``SD3Transformer2DModel``.

Same small SD3.5-medium-shaped configuration and the same weights in both (hidden 512 = 8 heads
x 64, 4 joint blocks with RMS qk-norm, MMDiT-X dual attention in the first 2, a 32 x 32 latent =
256 image tokens + 77 text tokens, batch 1, fp32, CPU). The two run interleaved in one process,
alternating which goes first, so drifting clocks and a busy machine hit both alike; the median
of the per-iteration time ratios is the figure (target: diffcore <= 0.9x diffusers).

    python benchmarks/sd3_step.py --threads 2 --iters 60
"""

from __future__ import annotations

import copy

import torch
from compare import accuracy_line, interleaved, report, step_arguments

HEADS, HEAD_DIM = 8, 64
CONFIG = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
              attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=512,
              caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=256, pos_embed_max_size=32,
              qk_norm="rms_norm", dual_attention_layers=(0, 1))
LATENT, TEXT_TOKENS = (32, 32), 77


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffcore, diffusers) with identical random weights (norm scales around 1, so nothing is a no-op)."""
    from diffusers import SD3Transformer2DModel

    from diffcore_sd3.convert import diffusers_to_original
    from diffcore_sd3.model import MMDiT, params_from_diffusers_config

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if unit else 0.0))
    ours = MMDiT(params_from_diffusers_config(CONFIG)).eval()
    ours.load_state_dict(diffusers_to_original({k: v.clone() for k, v in ref.state_dict().items()}), strict=True)
    return ours, ref


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 16, *LATENT, generator=g), timesteps=torch.tensor([0.7]),
                context=torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"], generator=g),
                y=torch.randn(1, CONFIG["pooled_projection_dim"], generator=g))


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])

    ours, ref = models()
    x = inputs()

    def run_ours() -> torch.Tensor:
        return ours(**x)

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=x["x"], encoder_hidden_states=x["context"], pooled_projections=x["y"],
                   timestep=1000 * x["timesteps"]).sample

    ref64, x64 = copy.deepcopy(ref).double(), {k: v.double() for k, v in x.items()}

    def run_exact() -> torch.Tensor:
        return ref64(hidden_states=x64["x"], encoder_hidden_states=x64["context"], pooled_projections=x64["y"],
                     timestep=1000 * x64["timesteps"]).sample

    with torch.inference_mode():
        accuracy = accuracy_line(run_ours, run_ref, run_exact)
        times = interleaved(run_ours, run_ref, iters=args.iters, warmup=args.warmup)

    tokens = LATENT[0] * LATENT[1] // 4
    print(f"SD3 MMDiT forward, hidden {HEADS * HEAD_DIM} ({HEADS} heads x {HEAD_DIM}), {CONFIG['num_layers']} joint "
          f"blocks (qk-norm, dual attention in {len(CONFIG['dual_attention_layers'])}), {tokens} image + {TEXT_TOKENS} "
          f"text tokens, fp32, {args.threads} thread(s), {args.iters} interleaved iterations; torch {torch.__version__}")
    print(accuracy)
    report(times, "diffusers", target=0.9)


if __name__ == "__main__":
    main()
