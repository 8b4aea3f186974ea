"""Golden outputs: fixed-seed fp32 CPU forwards of the FLUX.1, FLUX.2 and DiT models and the
FLUX autoencoders, recorded before a refactor and compared after it.

Why: a refactor that moves layers into the core must not change a single bit of what the
models compute. Parity tests against diffusers allow 1e-5; these allow nothing. The weights
are drawn per tensor from its state-dict key (so the order modules are built in does not
matter, only the checkpoint layout), the inputs from fixed generators, on one thread.

Bits depend on the machine (BLAS kernels, CPU features, the torch build): the recording's
fingerprint (CPU model included) is stored with it, and on another machine the comparison
falls back to 1e-4 of the output's largest value (a real check still, but not the bit-for-bit
one). Re-record only when a change of numbers is intended: ``python tests/golden/test_golden.py --record``.
"""

from __future__ import annotations

import platform
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
FAMILIES = ("flux1", "flux2", "dit")


def fingerprint() -> str:
    import diffcore.nn.linear as linear

    from diffcore.testing.goldens import cpu_model

    return (f"torch {torch.__version__}; {platform.machine()}; {cpu_model()}; "
            f"cpu {torch.backends.cpu.get_cpu_capability()}; onednn linears {linear.ONEDNN}")


@contextmanager
def one_thread() -> Iterator[None]:
    """Reductions split across threads round differently; the goldens are single-threaded."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def seeded(model: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Every floating tensor of the state dict drawn from a generator seeded by its key:
    N(0, std), norm scales around 1, BatchNorm variances in [0.5, 1.5)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                unit = t.ndim == 1 and "norm" in name and "linear" not in name and "running" not in name
                t.copy_(torch.randn(t.shape, generator=g) * std + (1.0 if unit else 0.0))
    return model.eval()


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def grid_ids(height: int, width: int, axes: int, t: float = 0.0) -> torch.Tensor:
    """(height * width, axes) ids [t, row, col(, 0)] for a row-major token grid."""
    ids = torch.zeros(height, width, axes)
    ids[..., 0], ids[..., 1], ids[..., 2] = t, torch.arange(height)[:, None], torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


# -- FLUX.1 ---------------------------------------------------------------------------------------
def flux1_outputs() -> dict[str, torch.Tensor]:
    import attrs

    from diffcore_flux1.model import VARIANTS, Flux
    from diffcore_flux1.vae import AE_VARIANTS, AutoEncoder

    tiny = VARIANTS["tiny"]
    txt, y = randn(1, 2, 7, 48), randn(2, 2, 32)
    img_ids, txt_ids = grid_ids(4, 5, 3), torch.zeros(7, 3)
    t, guidance = torch.tensor([0.7, 0.25]), torch.tensor([3.5, 1.0])
    out = {}
    for name, params, channels in (("dev", tiny, 64), ("schnell", attrs.evolve(tiny, guidance_embed=False), 64),
                                   ("fill", attrs.evolve(tiny, in_channels=384), 384)):
        model = seeded(Flux(params), seed=10, std=0.2)
        img = randn(3, 2, 20, channels)
        out[f"transformer.{name}"] = model(img, img_ids, txt, txt_ids, t, y,
                                           guidance if params.guidance_embed else None)
    dev = seeded(Flux(tiny), seed=10, std=0.2)
    img, ref = randn(3, 2, 20, 64), randn(4, 2, 18, 64)  # Kontext: a 3 x 6 reference at t = 1
    ids = torch.cat([img_ids, grid_ids(3, 6, 3, t=1.0)])
    out["transformer.kontext"] = dev(torch.cat([img, ref], dim=1), ids, txt, txt_ids, t, y, guidance)

    ae = seeded(AutoEncoder(AE_VARIANTS["tiny"]), seed=20, std=0.05)
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out["vae.moments_mean"], out["vae.moments_logvar"] = ae.moments(x)
    out["vae.encode"] = ae.encode(x)
    out["vae.encode_sample"] = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(6))
    z = randn(7, 1, 16, 6, 10)
    out["vae.decode"] = ae.decode(z)
    out["vae.decode_tiled"] = ae.decode_tiled(z, tile=4, overlap=1)
    return out


# -- FLUX.2 ---------------------------------------------------------------------------------------
def flux2_outputs() -> dict[str, torch.Tensor]:
    from diffcore_flux2.model import VARIANTS, Flux2, ReferenceCache
    from diffcore_flux2.vae import AE_VARIANTS, AutoEncoder

    x, ctx = randn(1, 2, 12, 16), randn(2, 2, 5, 48)
    x_ids, ctx_ids = grid_ids(3, 4, 4), torch.zeros(5, 4)
    ctx_ids[:, 3] = torch.arange(5)
    t, guidance = torch.tensor([0.8, 0.3]), torch.tensor([4.0, 2.5])
    ref, ref_ids = randn(3, 6, 16), grid_ids(2, 3, 4, t=10.0)  # one 2 x 3 reference at t = 10
    out = {}
    dev = seeded(Flux2(VARIANTS["tiny"]), seed=30, std=0.1)
    out["transformer.dev"] = dev(x, x_ids, t, ctx, ctx_ids, guidance=guidance)
    out["transformer.dev_refs"] = dev(x, x_ids, t, ctx, ctx_ids, guidance=guidance, ref=ref, ref_ids=ref_ids)
    klein = seeded(Flux2(VARIANTS["tiny-klein"]), seed=31, std=0.1)
    out["transformer.klein"] = klein(x, x_ids, t, ctx, ctx_ids)
    out["transformer.klein_refs"] = klein(x, x_ids, t, ctx, ctx_ids, ref=ref, ref_ids=ref_ids)
    kv = seeded(Flux2(VARIANTS["tiny-klein-kv"]), seed=32, std=0.1)
    cache = ReferenceCache()
    out["transformer.klein_kv_fill"] = kv(x, x_ids, t, ctx, ctx_ids, ref=ref, ref_ids=ref_ids, ref_cache=cache)
    out["transformer.klein_kv_read"] = kv(x, x_ids, t * 0.5, ctx, ctx_ids, ref_cache=cache)

    ae = seeded(AutoEncoder(AE_VARIANTS["tiny"]), seed=40, std=0.05)
    img = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(8)) * 2 - 1
    out["vae.encode"] = ae.encode(img)
    out["vae.encode_sample"] = ae.encode(img, sample=True, generator=torch.Generator().manual_seed(9))
    out["vae.decode"] = ae.decode(randn(10, 1, 16, 3, 5))
    return out


# -- DiT ------------------------------------------------------------------------------------------
def dit_outputs() -> dict[str, torch.Tensor]:
    from diffcore_dit.model import DiT2D
    from diffcore_dit.params import VARIANTS

    model = seeded(DiT2D(VARIANTS["digits"]), seed=50, std=0.1)
    x, sigma = randn(11, 3, 1, 8, 8), torch.tensor([0.9, 0.5, 0.1])
    return {"forward": model(x, sigma, torch.tensor([3, 7, 10])), "forward_null": model(x, sigma)}


OUTPUTS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "flux1": flux1_outputs, "flux2": flux2_outputs, "dit": dit_outputs}


def compute(family: str) -> dict[str, torch.Tensor]:
    with one_thread(), torch.no_grad():
        return {k: v.contiguous() for k, v in OUTPUTS[family]().items()}


def record() -> None:
    for family in FAMILIES:
        tensors = compute(family)
        save_file(tensors, HERE / f"{family}.safetensors", metadata={"fingerprint": fingerprint()})
        print(f"{family}: {len(tensors)} outputs, {sum(t.numel() for t in tensors.values())} values")


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_the_recorded_ones(family):
    from safetensors import safe_open

    path = HERE / f"{family}.safetensors"
    with safe_open(path, "pt") as f:
        recorded_on = (f.metadata() or {}).get("fingerprint")
    expected = load_file(path)
    got = compute(family)
    assert got.keys() == expected.keys()
    exact = recorded_on == fingerprint()
    for key, value in expected.items():
        assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
        assert value.abs().max() > 1e-2, f"{family} {key}: the recorded output is (near) zero"
        if exact:
            assert torch.equal(got[key], value), (
                f"{family} {key}: not bit-identical (max abs diff {(got[key] - value).abs().max().item():.3g})")
        else:  # another machine: its kernels round differently
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-4 * value.abs().max().item())


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/golden/test_golden.py --record")
    record()
