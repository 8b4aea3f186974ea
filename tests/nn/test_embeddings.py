"""The toolbox's embeddings and adaLN pieces against diffusers' and against their formulas."""

import math

import pytest
import torch

from diffcore.nn.embeddings import EmbedND, MLPEmbedder, apply_rope, rope, timestep_embedding
from diffcore.nn.mmdit import FusedModulationOut, LastLayer, Modulation, ModulationOut, SelfAttention, modulate
from diffcore.nn.norms import QKNorm, RMSNorm, layer_norm


@pytest.mark.parametrize("freq_shift", [0.0, 1.0])
def test_timestep_embedding_is_diffusers_cos_first(freq_shift):
    from diffusers.models.embeddings import get_timestep_embedding

    sigma = torch.tensor([0.0, 0.013, 0.5, 0.999])
    ours = timestep_embedding(sigma, 256, freq_shift=freq_shift)
    theirs = get_timestep_embedding(sigma * 1000, 256, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)
    assert ours.shape == (4, 256)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_timestep_embedding_integer_steps_odd_width_and_dtype():
    steps = torch.tensor([1, 999])
    emb = timestep_embedding(steps, 7, time_factor=1.0)
    assert emb.shape == (2, 7) and emb.dtype == torch.float32 and torch.all(emb[:, -1] == 0)  # zero-padded
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(999 * freqs))
    assert timestep_embedding(torch.tensor([0.5], dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rope_rotates_channel_pairs_by_their_axis_angle():
    ids = torch.tensor([[[1.0, 2.5]]])  # one token at position (1, 2.5); axes of 4 and 2 channels
    pe = rope(ids, (4, 2), theta=100.0)
    assert pe.shape == (1, 1, 3) and pe.dtype == torch.complex64
    angles = torch.tensor([1.0, 1.0 / 10.0, 2.5])  # pos / theta^(2k / dim) per pair
    torch.testing.assert_close(torch.angle(pe[0, 0]), angles)
    x = torch.randn(1, 1, 6)
    out = apply_rope(x, pe)
    for k, a in enumerate(angles.tolist()):
        x0, x1 = x[..., 2 * k], x[..., 2 * k + 1]
        torch.testing.assert_close(out[..., 2 * k], x0 * math.cos(a) - x1 * math.sin(a))
        torch.testing.assert_close(out[..., 2 * k + 1], x1 * math.cos(a) + x0 * math.sin(a))
    with pytest.raises(ValueError, match=r"position ids have 2 axes, the RoPE has 3 \(axes_dim=\(4, 2, 2\)\)"):
        rope(ids, (4, 2, 2), theta=100.0)


def test_rope_matches_diffusers_flux_pos_embed():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    grid = torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij")
    ids = torch.cat([torch.zeros(5, 3), torch.stack(grid, -1).reshape(-1, 3)])  # 5 text tokens, a 3 x 4 image
    q = torch.randn(2, 4, 17, 32)  # (batch, heads, tokens, head_dim)
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[8, 12, 12])(ids)
    expected = apply_rotary_emb(q, (cos, sin))
    pe = EmbedND((8, 12, 12), 10000)(ids[None])
    assert pe.shape == (1, 1, 17, 16)
    torch.testing.assert_close(apply_rope(q, pe), expected, rtol=0, atol=1e-6)
    assert apply_rope(q.bfloat16(), pe).dtype == torch.bfloat16


def test_norms():
    x = torch.randn(3, 5, 16)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.scale.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.scale
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    qk = QKNorm(16)
    q, k = qk(x, 2 * x)
    torch.testing.assert_close(q, k)  # RMS norm is scale-free; both scales start at one
    assert list(dict(qk.named_parameters())) == ["query_norm.scale", "key_norm.scale"]
    ln = layer_norm(16)
    assert not ln.elementwise_affine and ln.eps == 1e-6


def test_rms_norm_of_bf16_off_the_cpu_goes_to_the_fused_op_uncast(monkeypatch):
    """On a GPU the fused kernel accumulates in float32 itself: no float32 copy of q and k is made
    (meta stands in for the device). On the CPU the input is cast first, as BFL does."""
    import diffcore.nn.norms as norms

    seen = []
    real = norms.F.rms_norm
    monkeypatch.setattr(norms.F, "rms_norm", lambda x, *a: seen.append((x.device.type, x.dtype)) or real(x, *a))
    for device in ("meta", "cpu"):
        norm = RMSNorm(16).to(device, torch.bfloat16)
        assert norm(torch.zeros(3, 5, 16, device=device, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert seen == [("meta", torch.bfloat16), ("cpu", torch.float32)]


def test_modulation_sets_and_the_two_arithmetics():
    torch.manual_seed(0)
    vec = torch.randn(2, 8)
    mod = Modulation(8, double=True)
    first, second = mod(vec)
    assert isinstance(first, ModulationOut) and first.shift.shape == (2, 1, 8)
    lin = mod.lin(torch.nn.functional.silu(vec))[:, None]
    torch.testing.assert_close(second.gate, lin[..., 40:48])
    (single,) = Modulation(8, double=False, bias=False)(vec)
    assert single.gate.shape == (2, 1, 8)
    x, update = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    torch.testing.assert_close(first.modulate(x), (1 + first.scale) * x + first.shift, rtol=0, atol=0)
    fused = FusedModulationOut(*first)
    torch.testing.assert_close(fused.modulate(x), first.modulate(x))  # the same value, up to rounding
    torch.testing.assert_close(fused.residual(x, update), first.residual(x, update))
    assert type(fused._replace(gate=fused.gate * 2)) is FusedModulationOut
    assert torch.equal(modulate(x, first.shift, first.scale, fused=True), fused.modulate(x))


def test_attention_projections_last_layer_and_embedder():
    attn = SelfAttention(16, 4, qkv_bias=False, proj_bias=False)
    q, k, v = attn.heads(torch.randn(2, 5, 16))
    assert q.shape == k.shape == v.shape == (2, 4, 5, 4)
    assert set(dict(attn.named_parameters())) == {"qkv.weight", "norm.query_norm.scale", "norm.key_norm.scale",
                                                  "proj.weight"}
    with pytest.raises(ValueError, match="16 is not divisible by 3 heads"):
        SelfAttention(16, 3)
    last = LastLayer(16, 6)
    x, vec = torch.randn(2, 5, 16), torch.randn(2, 16)
    shift, scale = last.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # BFL's (shift, scale) order
    torch.testing.assert_close(last(x, vec), last.linear((1 + scale) * last.norm_final(x) + shift))
    embedder = MLPEmbedder(256, 16, bias=False)
    assert embedder(torch.randn(3, 256)).shape == (3, 16) and embedder.in_layer.bias is None
