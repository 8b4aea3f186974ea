"""One FLUX.1 transformer forward: diffcore's ``Flux`` against diffusers' ``FluxTransformer2DModel``.

Same small configuration and the same weights in both (hidden 512 = 8 heads x 64, 2 double and
4 single blocks, 256 image + 64 text tokens, batch 1, fp32, CPU). The two run interleaved in one
process, alternating which goes first, so drifting clocks and a busy machine hit both alike; the
median of the per-iteration time ratios is the figure (target: diffcore <= 0.9x diffusers).

    python benchmarks/flux_step.py --threads 2 --iters 60
"""

from __future__ import annotations

import copy

import torch
from compare import accuracy_line, interleaved, report, step_arguments

HEADS, HEAD_DIM = 8, 64
CONFIG = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=HEAD_DIM,
              num_attention_heads=HEADS, joint_attention_dim=512, pooled_projection_dim=256,
              axes_dims_rope=(8, 28, 28), guidance_embeds=True)
GRID, TEXT_TOKENS = (16, 16), 64


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffcore, diffusers) with identical random weights (norm scales around 1, so nothing is a no-op)."""
    from diffusers import FluxTransformer2DModel

    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.model import Flux, params_from_diffusers_config

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if unit else 0.0))
    ours = Flux(params_from_diffusers_config(CONFIG)).eval()
    ours.load_state_dict(diffusers_to_bfl({k: v.clone() for k, v in ref.state_dict().items()}), strict=True)
    return ours, ref


def inputs() -> dict[str, torch.Tensor]:
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    g = torch.Generator().manual_seed(1)
    tokens = GRID[0] * GRID[1]
    return dict(img=torch.randn(1, tokens, CONFIG["in_channels"], generator=g),
                img_ids=prepare_img_ids(*GRID)[0], txt=torch.randn(1, TEXT_TOKENS, CONFIG["joint_attention_dim"],
                                                                   generator=g),
                txt_ids=prepare_txt_ids(TEXT_TOKENS)[0], y=torch.randn(1, CONFIG["pooled_projection_dim"], generator=g),
                timesteps=torch.tensor([0.7]), guidance=torch.tensor([3.5]))


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])

    ours, ref = models()
    x = inputs()

    def run_ours() -> torch.Tensor:
        return ours(**x)

    def run_ref() -> torch.Tensor:
        return ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                   timestep=x["timesteps"], img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"]).sample

    ref64, x64 = copy.deepcopy(ref).double(), {k: v.double() for k, v in x.items()}

    def run_exact() -> torch.Tensor:
        return ref64(hidden_states=x64["img"], encoder_hidden_states=x64["txt"], pooled_projections=x64["y"],
                     timestep=x64["timesteps"], img_ids=x64["img_ids"], txt_ids=x64["txt_ids"],
                     guidance=x64["guidance"]).sample

    with torch.inference_mode():
        accuracy = accuracy_line(run_ours, run_ref, run_exact)
        times = interleaved(run_ours, run_ref, iters=args.iters, warmup=args.warmup)

    print(f"FLUX.1 transformer forward, hidden {HEADS * HEAD_DIM} ({HEADS} heads x {HEAD_DIM}), "
          f"{CONFIG['num_layers']} double + {CONFIG['num_single_layers']} single blocks, "
          f"{GRID[0] * GRID[1]} image + {TEXT_TOKENS} text tokens, fp32, {args.threads} thread(s), "
          f"{args.iters} interleaved iterations; torch {torch.__version__}")
    print(accuracy)
    report(times, "diffusers", target=0.9)

if __name__ == "__main__":
    main()
