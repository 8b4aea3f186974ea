"""One LoRA training step (forward, backward, AdamW step) of FLUX.1: diffcore's ``lora`` trainer
against a bare diffusers ``FluxTransformer2DModel`` + peft loop.

Same small configuration and base weights (hidden 512 = 8 heads x 64, 2 double and 4 single
blocks, 256 image + 64 text tokens, batch 1, fp32), rank-16 adapters on the attention and MLP
layers of both (diffusers' train_dreambooth_lora_flux list plus the single blocks; diffcore's
``attention-mlp`` preset, whose fused q, k, v take one adapter where diffusers has three). The two
run interleaved in one process; the median per-step time ratio is printed (target <= 0.9), then
the memory of one step: on CUDA the peak allocated, elsewhere the bytes autograd saves for the
backward pass (activations, counted once per storage, the weights' own storages left out: what a
step adds beyond the weights), and diffcore's time and memory with gradient checkpointing.

    python benchmarks/lora_step.py --threads 2 --iters 20
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from compare import interleaved, report, step_arguments
from einops import rearrange

HEADS, HEAD_DIM, RANK = 8, 64, 16
CONFIG = dict(in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=HEAD_DIM,
              num_attention_heads=HEADS, joint_attention_dim=512, pooled_projection_dim=256,
              axes_dims_rope=(8, 28, 28), guidance_embeds=True)
GRID, TEXT_TOKENS = (16, 16), 64
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                     "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                     "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out",
                     "single_transformer_blocks.2.proj_out", "single_transformer_blocks.3.proj_out"]


def setups():
    """(diffcore step, diffusers step, diffcore network) on the same base weights and batch."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from diffcore.api import structure
    from diffcore.plugins import registry
    from diffcore_flux1.bundle import FluxBundle
    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.model import Flux, params_from_diffusers_config

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            unit = p.ndim == 1 and "norm" in name and "linear" not in name
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if unit else 0.0))
    network = Flux(params_from_diffusers_config(CONFIG))
    network.load_state_dict(diffusers_to_bfl({k: v.clone() for k, v in copy.deepcopy(ref).state_dict().items()}))
    bundle = FluxBundle(network=network)
    component = registry("trainers").get("lora")
    lora = component.factory(structure({"rank": RANK, "target_modules": "attention-mlp"}, component.config), bundle)
    ours_opt = torch.optim.AdamW(lora.trainable_parameters(), lr=1e-4)

    ref.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=DIFFUSERS_TARGETS), ref)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4)

    g = torch.Generator().manual_seed(1)
    h, w = GRID
    x0 = torch.randn(1, 64, h, w, generator=g)
    text = {"txt": torch.randn(1, TEXT_TOKENS, 512, generator=g), "vec": torch.randn(1, 256, generator=g)}
    batch = {"latents": x0, "text": text}
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)

    def ours() -> None:
        loss = lora.loss(bundle, batch, torch.Generator().manual_seed(2))
        loss.backward()
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)

    def theirs() -> None:   # what diffusers' train_dreambooth_lora_flux.py does per step
        gen = torch.Generator().manual_seed(2)
        noise, u = torch.randn(x0.shape, generator=gen), torch.rand(1, generator=gen)
        x = (1 - u.view(-1, 1, 1, 1)) * x0 + u.view(-1, 1, 1, 1) * noise
        pred = ref(hidden_states=rearrange(x, "b c h w -> b (h w) c"), encoder_hidden_states=text["txt"],
                   pooled_projections=text["vec"], timestep=u, guidance=torch.full((1,), 3.5), img_ids=img_ids,
                   txt_ids=torch.zeros(TEXT_TOKENS, 3)).sample
        loss = F.mse_loss(rearrange(pred, "b (h w) c -> b c h w", h=h), noise - x0)
        loss.backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    return ours, theirs, network, ref


def step_memory(step, model: torch.nn.Module) -> int:
    """Bytes of one step: CUDA's peak allocated, else the storages the forward pass saves for
    backward, less the model's own weights (a matmul saves its frozen weight, or a transposed view
    of it: that costs no memory the weights did not already take). What the backward pass saves
    for itself (a checkpointed block's recomputation, a recomputed activation) lives for one block
    or one layer and is left out on both sides."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights and torch._C._current_graph_task_id() == -1:  # not in backward
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def main() -> None:
    args = step_arguments(__doc__.splitlines()[0])
    ours, theirs, network, ref = setups()
    times = interleaved(ours, theirs, iters=args.iters, warmup=args.warmup)
    print(f"FLUX.1 LoRA step (rank {RANK}), hidden {HEADS * HEAD_DIM}, {CONFIG['num_layers']} double + "
          f"{CONFIG['num_single_layers']} single blocks, {GRID[0] * GRID[1]} image + {TEXT_TOKENS} text tokens, "
          f"fp32, {args.threads} thread(s), {args.iters} interleaved steps; torch {torch.__version__}")
    report(times, "diffusers + peft", target=0.9)
    mine, reference = step_memory(ours, network), step_memory(theirs, ref)
    what = "peak allocated" if torch.cuda.is_available() else "saved for backward"
    print(f"memory of one step ({what}): diffcore {mine / 2**20:.1f} MiB, "
          f"diffusers + peft {reference / 2**20:.1f} MiB, ratio {mine / reference:.2f} (target <= 0.9)")
    network.gradient_checkpointing = True
    ref.enable_gradient_checkpointing()
    times = interleaved(ours, theirs, iters=args.iters, warmup=args.warmup)
    print("with gradient checkpointing (both):")
    report(times, "diffusers + peft", target=0.9)
    mine, reference = step_memory(ours, network), step_memory(theirs, ref)
    print(f"memory of one step ({what}): diffcore {mine / 2**20:.1f} MiB, diffusers + peft {reference / 2**20:.1f} MiB")
    fp8_base(ours, theirs, network, ref, args)


def fp8_base(ours, theirs, network: torch.nn.Module, ref: torch.nn.Module, args) -> None:
    """diffcore's step again with the frozen base stored in fp8 (``weight_dtype``, kohya's
    ``--fp8_base``): the weights' bytes, and what autograd saves, which must not grow by a
    dequantised copy of each layer."""
    from diffcore.nn.fp8 import store_fp8

    network.gradient_checkpointing = False
    ref.disable_gradient_checkpointing()

    def weights() -> int:
        return sum(t.numel() * t.element_size() for t in [*network.parameters(), *network.buffers()])

    before, saved = weights(), step_memory(ours, network)
    converted = store_fp8(network)
    times = interleaved(ours, theirs, iters=args.iters, warmup=args.warmup)
    print(f"diffcore on an fp8 base ({len(converted)} layers in float8_e4m3fn, float32 compute):")
    report(times, "diffusers + peft (float32 base)", target=None)
    after, saved_fp8 = weights(), step_memory(ours, network)
    print(f"weights {before / 2**20:.1f} -> {after / 2**20:.1f} MiB; saved for backward {saved / 2**20:.1f} -> "
          f"{saved_fp8 / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
