"""One FLUX.2 transformer forward: diffcore's ``Flux2`` against diffusers' ``Flux2Transformer2DModel``.

A small dev-shaped configuration with the same weights in both: hidden 512 (8 heads x 64, RoPE
axes 4 x 16), 2 double and 4 single blocks, SwiGLU ratio 3, guidance embedding, a 15360-wide text
input (dev's three stacked Mistral states), 256 image + 64 text tokens, batch 1, fp32, CPU. The
two models run interleaved in one process, alternating which goes first, so a busy machine slows
both alike; the figure is the median of the per-iteration time ratios (target: <= 0.9). One
thread by default: on a shared two-core machine a second thread mostly measures the scheduler.

    python benchmarks/flux2_step.py --threads 1 --iters 60
"""

from __future__ import annotations

import copy

import torch
from compare import accuracy_line, interleaved, report, step_arguments

HIDDEN, HEADS, DOUBLE, SINGLE = 512, 8, 2, 4
CONTEXT, IMAGE_GRID, TEXT_TOKENS = 15360, (16, 16), 64


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffcore, diffusers) with identical random weights (norm scales near 1, nothing a no-op)."""
    from diffusers import Flux2Transformer2DModel

    from diffcore_flux2.convert import diffusers_to_bfl
    from diffcore_flux2.model import Flux2
    from diffcore_flux2.params import Flux2Params

    head_dim = HIDDEN // HEADS
    params = Flux2Params(hidden_size=HIDDEN, num_heads=HEADS, depth=DOUBLE, depth_single_blocks=SINGLE,
                         context_in_dim=CONTEXT, guidance_embed=True, axes_dim=(head_dim // 4,) * 4)
    torch.manual_seed(0)
    reference = Flux2Transformer2DModel(
        in_channels=params.in_channels, num_layers=DOUBLE, num_single_layers=SINGLE, attention_head_dim=head_dim,
        num_attention_heads=HEADS, joint_attention_dim=CONTEXT, axes_dims_rope=params.axes_dim,
        rope_theta=params.theta, mlp_ratio=params.mlp_ratio, guidance_embeds=True).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.ndim == 1 else 0.0))
    ours = Flux2(params).eval()
    ours.load_state_dict(diffusers_to_bfl({k: v.clone() for k, v in reference.state_dict().items()}))
    return ours, reference


def inputs() -> dict[str, torch.Tensor]:
    from diffcore_flux2.sampling import image_ids, text_ids

    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, IMAGE_GRID[0] * IMAGE_GRID[1], 128, generator=g),
                ctx=torch.randn(1, TEXT_TOKENS, CONTEXT, generator=g), x_ids=image_ids(*IMAGE_GRID),
                ctx_ids=text_ids(TEXT_TOKENS), t=torch.tensor([0.7]), guidance=torch.tensor([4.0]))


def runners(ours: torch.nn.Module, reference: torch.nn.Module, a: dict[str, torch.Tensor]):
    def run_ours() -> torch.Tensor:
        return ours(a["x"], a["x_ids"], a["t"], a["ctx"], a["ctx_ids"], guidance=a["guidance"])

    def run_diffusers() -> torch.Tensor:
        return reference(hidden_states=a["x"], encoder_hidden_states=a["ctx"], timestep=a["t"], img_ids=a["x_ids"],
                         txt_ids=a["ctx_ids"], guidance=a["guidance"], return_dict=False)[0]

    return run_ours, run_diffusers


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])

    ours, reference = models()
    a = inputs()
    run_ours, run_diffusers = runners(ours, reference, a)
    _, run_exact = runners(ours, copy.deepcopy(reference).double(),
                           {k: v.double() if v.is_floating_point() else v for k, v in a.items()})
    with torch.inference_mode():
        accuracy = accuracy_line(run_ours, run_diffusers, run_exact)
        times = interleaved(run_ours, run_diffusers, iters=args.iters, warmup=args.warmup)
    print(f"FLUX.2 step, hidden {HIDDEN} ({HEADS} heads), {DOUBLE} + {SINGLE} blocks, "
          f"{IMAGE_GRID[0] * IMAGE_GRID[1]} + {TEXT_TOKENS} tokens, context {CONTEXT}, fp32, "
          f"{args.threads} threads, {args.iters} interleaved iterations")
    print(accuracy)
    report(times, "diffusers", target=0.9)


if __name__ == "__main__":
    main()
