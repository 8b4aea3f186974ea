"""``diffcore.io.text_files``: text encoders from single files as ComfyUI and kohya's scripts keep
them (transformers' keys, one safetensors file, full precision, fp8 or scaled fp8). The config read
off the shapes is the encoder's own; the loaded model equals the one saved, and fp8 files load as
their values, rounded while read under ``text_weight_dtype``."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffcore.errors import CheckpointError
from diffcore.io.checkpoint import tensor_shapes
from diffcore.io.text_files import clip_config_fields, load_text_file, t5_config_fields
from diffcore.nn.fp8 import Float8Linear, store_fp8
from diffcore.nn.fp8_options import Rounding, text_rounding_on_load

transformers = pytest.importorskip("transformers")

T5 = dict(vocab_size=300, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8,
          relative_attention_num_buckets=16, feed_forward_proj="gated-gelu")
CLIP = dict(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def t5():
    return transformers.T5EncoderModel(transformers.T5Config(**T5)).eval()


def clip(projection: bool = False):
    config = transformers.CLIPTextConfig(**CLIP, projection_dim=128)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def write(model, file, extra=None, cast=None):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state.pop("encoder.embed_tokens.weight", None)   # a tied tensor is saved once
    if cast is not None:
        state = {k: cast(k, v) for k, v in state.items()}
    save_file({**state, **(extra or {})}, str(file))
    return file


def output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.last_hidden_state


def test_configs_read_off_the_shapes_are_the_encoders_own(tmp_path):
    torch.manual_seed(0)
    t5_fields = t5_config_fields(tensor_shapes(write(t5(), tmp_path / "t5.safetensors")))
    assert {k: t5_fields[k] for k in T5} == T5
    clip_fields = clip_config_fields(tensor_shapes(write(clip(True), tmp_path / "clip.safetensors")),
                                     hidden_act="quick_gelu")
    assert clip_fields == {**CLIP, "projection_dim": 128}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", ["t5", "clip", "clip_projected"])
def test_a_single_file_loads_as_the_model_it_came_from(tmp_path, build, dtype):
    torch.manual_seed(0)
    model = {"t5": t5, "clip": clip, "clip_projected": lambda: clip(True)}[build]()
    extra = {"logit_scale": torch.tensor(4.6)} if build != "t5" else {}
    file = write(model, tmp_path / "encoder.safetensors", extra)
    got = load_text_file(type(model), file, model.config, dtype=dtype)
    assert not got.training and {p.dtype for p in got.parameters()} == {dtype}
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(output(got, ids), output(model.to(dtype), ids), rtol=0, atol=0)
    if build == "t5":
        assert got.shared.weight is got.encoder.embed_tokens.weight


def test_a_clip_l_file_with_its_projection_loads_into_a_model_without_one(tmp_path):
    """ComfyUI's clip_l.safetensors carries SD3's text projection; FLUX.1 takes the pooled output."""
    torch.manual_seed(0)
    projected = clip(True)
    file = write(projected, tmp_path / "clip_l.safetensors")
    plain = load_text_file(transformers.CLIPTextModel, file, projected.config, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want = projected.text_model(input_ids=ids).pooler_output
        torch.testing.assert_close(plain(input_ids=ids).pooler_output, want, rtol=0, atol=0)


def fp8(key, tensor):
    return tensor.to(torch.float8_e4m3fn) if tensor.ndim == 2 and min(tensor.shape) >= 256 else tensor


def test_fp8_and_scaled_fp8_files_load_as_their_values(tmp_path):
    """``t5xxl_fp8_e4m3fn`` (weights cast to fp8) and ``t5xxl_fp8_e4m3fn_scaled`` (fp8 times a
    per-tensor ``scale_weight``, ``scaled_fp8`` marking the file)."""
    torch.manual_seed(0)
    model = t5()
    plain = load_text_file(type(model), write(model, tmp_path / "fp8.safetensors", cast=fp8), model.config,
                           dtype=torch.float32)
    scales, scaled = {}, {}
    for key, tensor in model.state_dict().items():
        if key != "encoder.embed_tokens.weight" and fp8(key, tensor) is not tensor:
            scales[key.removesuffix("weight") + "scale_weight"] = torch.tensor(0.5)
            scaled[key] = (tensor * 2).to(torch.float8_e4m3fn)
    base = write(model, tmp_path / "scaled.safetensors", {**scales, "scaled_fp8": torch.zeros(0)},
                 cast=lambda k, v: scaled.get(k, v))
    from_scaled = load_text_file(type(model), base, model.config, dtype=torch.float32)
    for key, tensor in model.state_dict().items():
        want = fp8(key, tensor).float()
        assert torch.equal(plain.state_dict()[key], want), key
        if key in scaled:
            assert torch.equal(from_scaled.state_dict()[key], scaled[key].float() * 0.5), key


def test_under_text_weight_dtype_it_is_rounded_while_read(tmp_path):
    torch.manual_seed(0)
    model = t5()
    file = write(model, tmp_path / "t5.safetensors")
    with text_rounding_on_load(Rounding()):
        got = load_text_file(type(model), file, model.config, dtype=torch.bfloat16)
    want = load_text_file(type(model), file, model.config, dtype=torch.bfloat16)
    store_fp8(want, "float8_e4m3fn")
    assert any(isinstance(m, Float8Linear) for m in got.modules())
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters()):
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                           b.view(torch.uint8) if b.dtype.itemsize == 1 else b), name


def test_a_file_of_another_encoder_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    file = write(clip(), tmp_path / "clip_l.safetensors")
    with pytest.raises(CheckpointError, match=r"clip_l\.safetensors: not a T5EncoderModel file .*shared\.weight"):
        load_text_file(transformers.T5EncoderModel, file, t5().config, dtype=torch.float32)


def test_in_float16_the_modules_transformers_keeps_in_float32_stay(tmp_path):
    """T5's ``wo`` overflows in fp16: ``from_pretrained`` keeps it in float32, and so does this."""
    torch.manual_seed(0)
    model = t5()
    folder = tmp_path / "t5"
    model.save_pretrained(folder)
    got = load_text_file(type(model), write(model, tmp_path / "t5.safetensors"), model.config, dtype=torch.float16)
    want = type(model).from_pretrained(folder, dtype=torch.float16)
    assert {n: p.dtype for n, p in got.named_parameters()} == {n: p.dtype for n, p in want.named_parameters()}
    assert got.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
