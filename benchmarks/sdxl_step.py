"""One SDXL UNet forward: diffcore's ``UNet`` against diffusers' ``UNet2DConditionModel``.

A small base-1.0-shaped configuration and the same weights in both (widths 64 / 128 / 256, two
ResBlocks per level down and three up, SpatialTransformers of depth 0 / 1 / 2 with 64-wide heads,
GEGLU feed-forwards, 77 text tokens of 512 features, the label embedding of a 256-d pooled vector
and 6 micro-conditioning sinusoids; a 32 x 32 latent, batch 1, fp32, CPU). The two run
interleaved in one process, alternating which goes first, so drifting clocks and a busy machine
hit both alike; the median of the per-iteration time ratios is the figure (target: diffcore
<= 0.9x diffusers).

    python benchmarks/sdxl_step.py --threads 2 --iters 40
"""

from __future__ import annotations

import copy

import torch
from compare import accuracy_line, interleaved, report, step_arguments

CONFIG = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=2,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 2, 4), use_linear_projection=True,
              cross_attention_dim=512, addition_embed_type="text_time", addition_time_embed_dim=32,
              projection_class_embeddings_input_dim=256 + 6 * 32, norm_num_groups=32)
LATENT, TEXT_TOKENS, POOLED = (32, 32), 77, 256


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffcore, diffusers) with identical random weights (norm scales around 1, so nothing is a no-op)."""
    from diffusers import UNet2DConditionModel

    from diffcore_sdxl.convert import diffusers_to_stability
    from diffcore_sdxl.model import UNet, params_from_diffusers_config

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**CONFIG).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            unit = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if unit else 0.0))
    ours = UNet(params_from_diffusers_config(CONFIG)).eval()
    ours.load_state_dict(diffusers_to_stability({k: v.clone() for k, v in ref.state_dict().items()}), strict=True)
    return ours, ref


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(1, 4, *LATENT, generator=g), t=torch.tensor([500.0]),
                context=torch.randn(1, TEXT_TOKENS, CONFIG["cross_attention_dim"], generator=g),
                pooled=torch.randn(1, POOLED, generator=g),
                time_ids=torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]))


def main() -> None:
    from diffcore_sdxl.model import label_vector

    args = step_arguments(__doc__.splitlines()[0])
    ours, ref = models()
    x = inputs()
    y = label_vector(x["pooled"], x["time_ids"], CONFIG["addition_time_embed_dim"])

    def run_ours() -> torch.Tensor:
        return ours(x["x"], x["t"], x["context"], y)

    def run_ref() -> torch.Tensor:
        return ref(x["x"], x["t"], encoder_hidden_states=x["context"],
                   added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}).sample

    ref64, x64 = copy.deepcopy(ref).double(), {k: v.double() for k, v in x.items()}

    def run_exact() -> torch.Tensor:
        return ref64(x64["x"], x64["t"], encoder_hidden_states=x64["context"],
                     added_cond_kwargs={"text_embeds": x64["pooled"], "time_ids": x64["time_ids"]}).sample

    with torch.inference_mode():
        accuracy = accuracy_line(run_ours, run_ref, run_exact)
        times = interleaved(run_ours, run_ref, iters=args.iters, warmup=args.warmup)

    print(f"SDXL UNet forward, widths {CONFIG['block_out_channels']}, transformer depths 0 / 1 / 2 (64-wide heads), "
          f"{LATENT[0]} x {LATENT[1]} latent, {TEXT_TOKENS} text tokens, fp32, {args.threads} thread(s), "
          f"{args.iters} interleaved iterations; torch {torch.__version__}")
    print(accuracy)
    report(times, "diffusers", target=0.9)


if __name__ == "__main__":
    main()
