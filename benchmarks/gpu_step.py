"""Full-size transformer / UNet forwards on a GPU: diffcore against diffusers, eager and compiled.

For each family (FLUX.1-dev, FLUX.2 klein-4b and klein-9b, SDXL base, SD3.5 large) both models are
built on the GPU at full size with random weights (the reference's, converted into diffcore's
layout, so both hold the same numbers), in bf16, at 1024 x 1024 (4096 image tokens; FLUX's 512
text tokens, SD3's 333, SDXL's 77), batch 1. They run interleaved, timed with CUDA events; the
table gives median milliseconds, the ratio diffcore / diffusers, the activation memory of one
forward (peak allocated above the weights), and the fraction of the chip's bf16 matmul ceiling
(measured in the same run on an 8192^3 matmul) that the forward's FLOPs reach (matmuls and
attention, counted by torch's FlopCounterMode), and the largest difference of the two outputs.
``--compile`` adds torch.compile (default mode) rows; ``--fp8`` rows of diffcore with fp8 weights
(``diffcore.nn.fp8``: stored in fp8 and multiplied in bf16, then fp8 matmuls; their label gives the
weights' GiB, their difference column is the fp8 error against diffusers' bf16); ``--profile`` a ``torch.profiler`` table of
each forward's kernels, both sides (name, calls, total time; the largest first), to find where one
side spends what the other does not; ``--generate`` a whole 28-step FLUX.1-dev call from embeddings to latents (diffusers'
``FluxPipeline`` with ``output_type="latent"`` against diffcore's ``denoise``). On CUDA, each eager
row comes again with q and k prepared by ATen ops instead of the fused Triton kernel
(``DIFFCORE_FUSED_QK=0``), with the kernel's difference from those ops.

It measures GPUs only: without CUDA it stops with a message. ``--tiny --device cpu`` runs the
same code on small configurations, to check the script itself (the test suite does).

    python benchmarks/gpu_step.py --iters 20 --compile --generate
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffcore.nn import qk_norm_rope

Run = Callable[[], Any]


@dataclass
class Case:
    """Both models and a call of each on the same inputs."""

    ours: torch.nn.Module
    reference: torch.nn.Module
    run_ours: Run
    run_reference: Run


def _same_weights(reference: torch.nn.Module, ours: torch.nn.Module, convert: Callable) -> None:
    """Norm scales near 1 and small random weights in the reference, copied into ours through
    the family's key conversion (strict: every key of both is matched)."""
    with torch.no_grad():
        for name, p in reference.named_parameters():
            unit = p.ndim == 1 and "norm" in name and name.endswith("weight")
            p.normal_(1.0 if unit else 0.0, 0.02)
        ours.load_state_dict(convert({k: v.clone() for k, v in reference.state_dict().items()}), strict=True)


def _randn(*shape: int, g: torch.Generator, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def flux1(tiny: bool, device: str, dtype: torch.dtype) -> Case:
    from diffusers import FluxTransformer2DModel

    from diffcore_flux1.convert import diffusers_to_bfl
    from diffcore_flux1.model import VARIANTS, Flux, diffusers_config, params_from_diffusers_config
    from diffcore_flux1.sampling import prepare_img_ids, prepare_txt_ids

    config = diffusers_config(VARIANTS["tiny" if tiny else "dev"])
    grid, text = ((8, 8), 16) if tiny else ((64, 64), 512)
    with torch.device(device):
        reference = FluxTransformer2DModel(**config).to(dtype).eval()
        ours = Flux(params_from_diffusers_config(config)).to(dtype).eval()
    _same_weights(reference, ours, diffusers_to_bfl)
    g = torch.Generator().manual_seed(1)
    img = _randn(1, grid[0] * grid[1], config["in_channels"], g=g, device=device, dtype=dtype)
    txt = _randn(1, text, config["joint_attention_dim"], g=g, device=device, dtype=dtype)
    vec = _randn(1, config["pooled_projection_dim"], g=g, device=device, dtype=dtype)
    img_ids, txt_ids = prepare_img_ids(*grid)[0].to(device, dtype), prepare_txt_ids(text)[0].to(device, dtype)
    t, guidance = torch.tensor([0.7], device=device, dtype=dtype), torch.tensor([3.5], device=device, dtype=dtype)
    return Case(ours, reference,
                lambda: ours(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, y=vec, timesteps=t,
                             guidance=guidance),
                lambda: reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0])


def flux2(variant: str) -> Callable[[bool, str, torch.dtype], Case]:
    def build(tiny: bool, device: str, dtype: torch.dtype) -> Case:
        import attrs
        from diffusers import Flux2Transformer2DModel

        from diffcore_flux2.convert import diffusers_to_bfl
        from diffcore_flux2.model import VARIANTS, Flux2
        from diffcore_flux2.sampling import image_ids, text_ids

        p = VARIANTS[variant]
        if tiny:
            p = attrs.evolve(p, hidden_size=128, num_heads=2, depth=1, depth_single_blocks=2, context_in_dim=96,
                             axes_dim=(16, 16, 16, 16))
        grid, text = ((8, 8), 16) if tiny else ((64, 64), 512)
        with torch.device(device):
            reference = Flux2Transformer2DModel(
                in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=p.hidden_size // p.num_heads, num_attention_heads=p.num_heads,
                joint_attention_dim=p.context_in_dim, axes_dims_rope=p.axes_dim, rope_theta=p.theta,
                mlp_ratio=p.mlp_ratio, guidance_embeds=p.guidance_embed).to(dtype).eval()
            ours = Flux2(p).to(dtype).eval()
        _same_weights(reference, ours, diffusers_to_bfl)
        g = torch.Generator().manual_seed(1)
        x = _randn(1, grid[0] * grid[1], p.in_channels, g=g, device=device, dtype=dtype)
        ctx = _randn(1, text, p.context_in_dim, g=g, device=device, dtype=dtype)
        x_ids, ctx_ids = image_ids(*grid).to(device), text_ids(text).to(device)
        t = torch.tensor([0.7], device=device, dtype=dtype)
        guidance = torch.tensor([4.0], device=device, dtype=dtype) if p.guidance_embed else None
        return Case(ours, reference, lambda: ours(x, x_ids, t, ctx, ctx_ids, guidance=guidance),
                    lambda: reference(hidden_states=x, encoder_hidden_states=ctx, timestep=t, img_ids=x_ids,
                                      txt_ids=ctx_ids, guidance=guidance, return_dict=False)[0])

    return build


def sdxl(tiny: bool, device: str, dtype: torch.dtype) -> Case:
    from diffusers import UNet2DConditionModel

    from diffcore_sdxl.convert import diffusers_to_stability
    from diffcore_sdxl.model import VARIANTS, UNet, diffusers_config, label_vector

    params = VARIANTS["tiny" if tiny else "base-1.0"]
    config = diffusers_config(params)
    size = 8 if tiny else 128
    with torch.device(device):
        reference = UNet2DConditionModel(**config).to(dtype).eval()
        ours = UNet(params).to(dtype).eval()
    _same_weights(reference, ours, diffusers_to_stability)
    g = torch.Generator().manual_seed(1)
    x = _randn(1, params.in_channels, size, size, g=g, device=device, dtype=dtype)
    context = _randn(1, 77, params.context_dim, g=g, device=device, dtype=dtype)
    pooled_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    pooled = _randn(1, pooled_dim, g=g, device=device, dtype=dtype)
    time_ids = torch.tensor([[8.0 * size, 8.0 * size, 0.0, 0.0, 8.0 * size, 8.0 * size]], device=device, dtype=dtype)
    y = label_vector(pooled, time_ids, config["addition_time_embed_dim"])
    t = torch.tensor([500.0], device=device, dtype=dtype)
    return Case(ours, reference, lambda: ours(x, t, context, y),
                lambda: reference(x, t, encoder_hidden_states=context,
                                  added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                                  return_dict=False)[0])


def sd3(tiny: bool, device: str, dtype: torch.dtype) -> Case:
    from diffusers import SD3Transformer2DModel

    from diffcore_sd3.convert import diffusers_to_original
    from diffcore_sd3.model import VARIANTS, MMDiT, diffusers_config

    params = VARIANTS["tiny" if tiny else "sd3.5-large"]
    config = diffusers_config(params)
    size, text = (16, 16) if tiny else (128, 333)
    with torch.device(device):
        reference = SD3Transformer2DModel(**config).to(dtype).eval()
        ours = MMDiT(params).to(dtype).eval()
    _same_weights(reference, ours, diffusers_to_original)
    g = torch.Generator().manual_seed(1)
    x = _randn(1, config["in_channels"], size, size, g=g, device=device, dtype=dtype)
    context = _randn(1, text, config["joint_attention_dim"], g=g, device=device, dtype=dtype)
    y = _randn(1, config["pooled_projection_dim"], g=g, device=device, dtype=dtype)
    t = torch.tensor([0.7], device=device, dtype=dtype)
    return Case(ours, reference, lambda: ours(x=x, timesteps=t, context=context, y=y),
                lambda: reference(hidden_states=x, encoder_hidden_states=context, pooled_projections=y,
                                  timestep=1000 * t, return_dict=False)[0])


CASES: dict[str, Callable[[bool, str, torch.dtype], Case]] = {
    "flux1-dev": flux1, "flux2-klein-4b": flux2("klein-4b"), "flux2-klein-9b": flux2("klein-9b"),
    "sdxl-base": sdxl, "sd3.5-large": sd3}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Run, device: str) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock elsewhere."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1e3


def interleaved(a: Run, b: Run, *, iters: int, warmup: int, device: str) -> tuple[list[float], list[float]]:
    """Per-call milliseconds of ``a`` and ``b``, alternating which runs first."""
    for _ in range(warmup):
        a(), b()
    synchronize(device)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(iters):
        order = ((0, a), (1, b)) if i % 2 == 0 else ((1, b), (0, a))
        for slot, fn in order:
            times[slot].append(timed(fn, device))
    return times


def activation_memory(fn: Run, device: str) -> int | None:
    """Peak bytes allocated above what was allocated before the call (None off CUDA)."""
    if not device.startswith("cuda"):
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def forward_flops(fn: Run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_ceiling(device: str, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of a large square matmul: what this chip's dense GEMM reaches here."""
    n = n if device.startswith("cuda") else 512
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    ms = statistics.median(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * n ** 3 / (ms / 1e3)


def row(label: str, ours: list[float], ref: list[float], memory: tuple[int | None, int | None], flops: int,
        ceiling: float, difference: float) -> str:
    mine, theirs = statistics.median(ours), statistics.median(ref)
    ratio = statistics.median(a / b for a, b in zip(ours, ref))
    mem = " | n/a" if memory[0] is None else \
        f" | {memory[0] / 2**30:.2f} / {memory[1] / 2**30:.2f} GiB ({memory[0] / max(memory[1], 1):.2f})"
    fraction = flops / (mine / 1e3) / ceiling, flops / (theirs / 1e3) / ceiling
    return (f"| {label} | {mine:.1f} ms | {theirs:.1f} ms | {ratio:.3f} | {fraction[0]:.0%} / {fraction[1]:.0%}"
            f" | {difference:.2e}{mem} |")


def measure(name: str, args: argparse.Namespace, dtype: torch.dtype, ceiling: float) -> list[str]:
    case = CASES[name](args.tiny, args.device, dtype)
    lines = []
    with torch.inference_mode():
        flops = forward_flops(case.run_reference)
        difference = (case.run_ours().float() - case.run_reference().float()).abs().max().item()
        memory = activation_memory(case.run_ours, args.device), activation_memory(case.run_reference, args.device)
        ours, ref = interleaved(case.run_ours, case.run_reference, iters=args.iters, warmup=args.warmup,
                                device=args.device)
        lines.append(row(f"{name} eager ({flops / 1e12:.1f} TFLOP)", ours, ref, memory, flops, ceiling,
                         difference))
        if qk_norm_rope.ENABLED and qk_norm_rope.triton is not None and args.device.startswith("cuda"):
            lines.append(without_qk_kernel(name, case, args, flops, ceiling))
        if args.compile:
            began = time.perf_counter()
            case.ours.compile()
            case.reference.compile()
            for _ in range(2):
                case.run_ours(), case.run_reference()
            synchronize(args.device)
            warm = time.perf_counter() - began
            memory = activation_memory(case.run_ours, args.device), activation_memory(case.run_reference, args.device)
            ours, ref = interleaved(case.run_ours, case.run_reference, iters=args.iters, warmup=1, device=args.device)
            difference = (case.run_ours().float() - case.run_reference().float()).abs().max().item()
            lines.append(row(f"{name} compiled (both compiled in {warm:.0f} s)", ours, ref, memory, flops, ceiling,
                             difference))
        if args.profile:
            lines += profile_rows(name, case, args)
        if args.fp8:
            lines += fp8_rows(name, case, args, flops, ceiling)
    del case
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return lines


def without_qk_kernel(name: str, case: Case, args: argparse.Namespace, flops: int, ceiling: float) -> str:
    """The eager row again with q and k prepared by ATen ops instead of the fused Triton kernel
    (``diffcore.nn.qk_norm_rope``); its difference column is the kernel's against those ops."""
    fused = case.run_ours().float()
    qk_norm_rope.ENABLED = False
    try:
        difference = (case.run_ours().float() - fused).abs().max().item()
        memory = activation_memory(case.run_ours, args.device), activation_memory(case.run_reference, args.device)
        ours, ref = interleaved(case.run_ours, case.run_reference, iters=args.iters, warmup=args.warmup,
                                device=args.device)
    finally:
        qk_norm_rope.ENABLED = True
    return row(f"{name} eager, q/k by ATen ops (difference: against the kernel)", ours, ref, memory, flops,
               ceiling, difference)


def kernel_times(fn: Run, device: str) -> dict[str, tuple[int, float]]:
    """kernel (CUDA) or ATen op (CPU) name -> (calls, total ms) over one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        fn()
        synchronize(device)
    table: dict[str, tuple[int, float]] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            table[event.key] = (event.count, us / 1e3)
    return table


def profile_rows(name: str, case: Case, args: argparse.Namespace, top: int = 25) -> list[str]:
    """Both forwards' kernels side by side, the largest time on either side first."""
    ours, ref = kernel_times(case.run_ours, args.device), kernel_times(case.run_reference, args.device)
    total = sum(ms for _, ms in ours.values()), sum(ms for _, ms in ref.values())
    lines = ["", f"{name}: kernels of one forward, {total[0]:.1f} ms (diffcore) / {total[1]:.1f} ms (diffusers)",
             "| kernel | diffcore calls | diffcore ms | diffusers calls | diffusers ms |", "|---|---|---|---|---|"]
    names = sorted(set(ours) | set(ref), key=lambda k: -max(ours.get(k, (0, 0.0))[1], ref.get(k, (0, 0.0))[1]))
    for key in names[:top]:
        (a, ta), (b, tb) = ours.get(key, (0, 0.0)), ref.get(key, (0, 0.0))
        lines.append(f"| {key[:90]} | {a} | {ta:.2f} | {b} | {tb:.2f} |")
    return lines + [""]


def weight_gib(network: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in (*network.parameters(), *network.buffers())) / 2**30


def fp8_rows(name: str, case: Case, args: argparse.Namespace, flops: int, ceiling: float) -> list[str]:
    """diffcore's network converted in place to fp8 storage, then to fp8 matmuls, each timed
    against the unchanged reference (compiled if ``--compile`` compiled both)."""
    from diffcore.nn.fp8 import MIN_FEATURES, Float8Linear, store_fp8
    from diffcore.nn.fp8_options import fp8_matmul_supported

    lines, compiled = [], " compiled" if args.compile else ""
    bf16 = weight_gib(case.ours)
    store_fp8(case.ours, min_features=1 if args.tiny else MIN_FEATURES)   # tiny layers are all small
    modes = [("fp8 weights, bf16 matmuls", False)]
    if fp8_matmul_supported(args.device):
        modes.append(("fp8 matmuls", True))
    for label, matmul in modes:
        for layer in case.ours.modules():
            if isinstance(layer, Float8Linear):
                layer.matmul = matmul
        difference = (case.run_ours().float() - case.run_reference().float()).abs().max().item()
        memory = activation_memory(case.run_ours, args.device), activation_memory(case.run_reference, args.device)
        ours, ref = interleaved(case.run_ours, case.run_reference, iters=args.iters, warmup=2, device=args.device)
        lines.append(row(f"{name} {label}{compiled} (weights {weight_gib(case.ours):.3g} of {bf16:.3g} GiB)", ours,
                         ref, memory, flops, ceiling, difference))
    return lines


def generate_flux1(args: argparse.Namespace, dtype: torch.dtype) -> str:
    """A whole 28-step FLUX.1-dev sampling call from embeddings to latents, both sides."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from diffcore_flux1.sampling import denoise, get_schedule, prepare_img_ids, prepare_txt_ids

    case = flux1(args.tiny, args.device, dtype)
    steps = 28
    grid, text = ((8, 8), 16) if args.tiny else ((64, 64), 512)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=case.reference)
    pipe.set_progress_bar_config(disable=True)
    p = case.ours.params
    g = torch.Generator().manual_seed(3)
    txt = _randn(1, text, p.context_in_dim, g=g, device=args.device, dtype=dtype)
    vec = _randn(1, p.vec_in_dim, g=g, device=args.device, dtype=dtype)
    noise = _randn(1, grid[0] * grid[1], p.in_channels, g=g, device=args.device, dtype=dtype)
    img_ids, txt_ids = prepare_img_ids(*grid)[0].to(args.device, dtype), prepare_txt_ids(text)[0].to(args.device, dtype)
    size = grid[0] * 16

    def ours() -> Any:
        return denoise(case.ours, noise, img_ids, txt, txt_ids, vec, get_schedule(steps, grid[0] * grid[1]),
                       guidance=3.5)

    def reference() -> Any:
        return pipe(prompt_embeds=txt, pooled_prompt_embeds=vec, latents=noise, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=3.5, output_type="latent").images

    with torch.inference_mode():
        a, b = interleaved(ours, reference, iters=max(3, args.iters // 4), warmup=1, device=args.device)
    ratio = statistics.median(x / y for x, y in zip(a, b))
    return (f"| flux1-dev {steps}-step generate, embeddings to latents | {statistics.median(a):.0f} ms | "
            f"{statistics.median(b):.0f} ms | {ratio:.3f} | | |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd networks")
    parser.add_argument("--profile", action="store_true", help="also list each forward's kernels, both sides")
    parser.add_argument("--fp8", action="store_true", help="also time diffcore with fp8 weights and fp8 matmuls")
    parser.add_argument("--generate", action="store_true", help="also time a 28-step FLUX.1-dev generate call")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small configurations (to check the script on a CPU)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu_step.py measures full-size models on a GPU, and torch sees no CUDA device here. "
              "To check the script itself on this machine: --tiny --device cpu", file=sys.stderr)
        return 1
    if not args.device.startswith("cuda") and not args.tiny:
        print("full-size models run only on CUDA here; add --tiny for a CPU run", file=sys.stderr)
        return 1
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    ceiling = matmul_ceiling(args.device, dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"{where}, {dtype}, torch {torch.__version__}; matmul ceiling {ceiling / 1e12:.3g} TFLOP/s; "
          f"{args.iters} interleaved iterations, medians")
    print("| forward | diffcore | diffusers | ratio | of the ceiling (diffcore / diffusers) | max abs difference "
          "| activations (ratio) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases:
        for line in measure(name, args, dtype, ceiling):
            print(line, flush=True)
    if args.generate:
        print(generate_flux1(args, dtype), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
