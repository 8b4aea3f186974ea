"""``diffcore.io.pretrained.load_pretrained``: transformers' text encoders from local folders. Inside
``text_rounding_on_load`` each linear weight is rounded to fp8 as it is read, and the model equals
``from_pretrained`` followed by ``store_fp8`` bit for bit (fp8 bytes, scales, buffers, ties, outputs);
folders it cannot read exactly take that path instead, with the same result."""

from __future__ import annotations

import logging

import pytest
import torch

from diffcore.io.pretrained import load_pretrained
from diffcore.nn.fp8 import Float8Linear, store_fp8
from diffcore.nn.fp8_options import Rounding, text_rounding_on_load

transformers = pytest.importorskip("transformers")

DECLINED = "rounded after"


def t5():
    config = transformers.T5Config(vocab_size=300, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8)
    return transformers.T5EncoderModel(config)


def clip():
    config = transformers.CLIPTextConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77, projection_dim=256)
    return transformers.CLIPTextModelWithProjection(config)


def qwen3():   # FLUX.2 klein's encoder; its lm_head is tied to the embedding
    config = transformers.Qwen3Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      tie_word_embeddings=True)
    return transformers.Qwen3ForCausalLM(config)


def mistral3():   # FLUX.2 dev's: transformers saves its keys under other names than the model's
    text = transformers.MistralConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    vision = transformers.PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=64, patch_size=16)
    return transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(text_config=text,
                                                                                     vision_config=vision))


def saved(tmp_path, build, **kw):
    torch.manual_seed(0)
    model = build()
    model.save_pretrained(tmp_path / build.__name__, **kw)
    return type(model), tmp_path / build.__name__


def everything(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def assert_same(got: torch.nn.Module, want: torch.nn.Module) -> None:
    a, b = everything(got), everything(want)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        bits = (lambda t: t.view(torch.uint8)) if a[key].dtype.itemsize == 1 else (lambda t: t)
        assert torch.equal(bits(a[key]), bits(b[key])), key


def rounded_after(model_class, folder, dtype):
    model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True).eval()
    store_fp8(model, "float8_e4m3fn")
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("build", [t5, clip, qwen3, mistral3])
def test_rounding_while_reading_equals_rounding_after(tmp_path, caplog, build, dtype):
    model_class, folder = saved(tmp_path, build)
    with caplog.at_level(logging.INFO, logger="diffcore.io.pretrained"), text_rounding_on_load(Rounding()):
        got = load_pretrained(model_class, folder, dtype=dtype)
    assert not [r for r in caplog.records if DECLINED in r.getMessage()]   # it did read while rounding
    want = rounded_after(model_class, folder, dtype)
    assert_same(got, want)
    assert any(isinstance(m, Float8Linear) for m in got.modules()) and not got.training
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        out = got(input_ids=ids)
        ref = want(input_ids=ids)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(out[key], ref[key])


def test_tied_weights_stay_one_tensor(tmp_path):
    model_class, folder = saved(tmp_path, t5)
    with text_rounding_on_load(Rounding()):
        got = load_pretrained(model_class, folder, dtype=torch.bfloat16)
    assert got.shared.weight is got.encoder.embed_tokens.weight


def test_sharded_folders_are_read_while_rounding(tmp_path, caplog):
    model_class, folder = saved(tmp_path, t5, max_shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file()
    with caplog.at_level(logging.INFO, logger="diffcore.io.pretrained"), text_rounding_on_load(Rounding()):
        got = load_pretrained(model_class, folder, dtype=torch.bfloat16)
    assert not [r for r in caplog.records if DECLINED in r.getMessage()]
    assert_same(got, rounded_after(model_class, folder, torch.bfloat16))


def test_a_folder_it_cannot_read_exactly_loads_as_before(tmp_path, caplog):
    """Pickled weights: ``from_pretrained`` reads them, the caller rounds after (``store_text_fp8``)."""
    model_class, folder = saved(tmp_path, clip)
    model = model_class.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="diffcore.io.pretrained"), text_rounding_on_load(Rounding()):
        got = load_pretrained(model_class, folder, dtype=torch.bfloat16)
    assert [r for r in caplog.records if "not safetensors" in r.getMessage()]
    store_fp8(got, "float8_e4m3fn")
    assert_same(got, rounded_after(model_class, folder, torch.bfloat16))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_without_rounding_it_is_from_pretrained(tmp_path, dtype):
    model_class, folder = saved(tmp_path, qwen3)
    got = load_pretrained(model_class, folder, dtype=dtype)
    kw = {"dtype": dtype} if dtype is not None else {}
    assert_same(got, model_class.from_pretrained(folder, **kw))
    assert not got.training and not any(isinstance(m, Float8Linear) for m in got.modules())
