"""The config validators families share: messages that name the key, and no torch on import."""

import subprocess
import sys

import attrs
import pytest

from diffcore.api import DTYPES, ConfigError, local_path, one_of, renamed_field, resolve_dtype, variant_of


@attrs.frozen
class Config:
    variant: str = attrs.field(default="auto", validator=variant_of("FLUX.1", ("dev", "schnell")))
    path: str = attrs.field(default="", validator=local_path)
    dtype: str = attrs.field(default="auto", validator=one_of(DTYPES))
    encoders: str | None = None
    encoder: str | None = None  # the old name

    def __attrs_post_init__(self):
        renamed_field(self, "encoder", "encoders")


def test_messages_name_the_key_and_suggest(tmp_path):
    with pytest.raises(ConfigError, match=r"at variant: unknown FLUX.1 variant 'shnell' \(did you mean \"schnell\""
                                          r"\?\); known: auto, dev, schnell"):
        Config(variant="shnell")
    with pytest.raises(ConfigError, match="at dtype: dtype must be one of auto, bfloat16, float16, float32, "
                                          "got 'float65' \\(did you mean \"float16\"\\?\\)"):
        Config(dtype="float65")
    with pytest.raises(ConfigError, match=r"at path: 'org/model' looks like a Hugging Face hub id; diffcore never "
                                          r"downloads.*huggingface-cli download org/model --local-dir ./model"):
        Config(path="org/model")
    with pytest.raises(ConfigError, match="at path: no such file or folder: ./org/model"):
        Config(path="./org/model")
    assert Config(path=str(tmp_path)).path == str(tmp_path)
    with pytest.raises(ConfigError, match="unknown DiT variant 'auto'"):
        variant_of("DiT", ("digits",), auto=False)(None, attrs.fields(Config).variant, "auto")


def test_renamed_field_moves_the_value_with_a_warning():
    with pytest.warns(FutureWarning, match="'encoder' is deprecated, call it 'encoders'"):
        config = Config(encoder="x")
    assert config.encoders == "x" and config.encoder is None
    with pytest.raises(ConfigError, match="encoder is the old name of encoders; set only encoders"):
        Config(encoder="x", encoders="y")


def test_dtype_resolution():
    import torch

    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_dtype("int8")


def test_validators_import_no_torch():
    code = ("import sys; from diffcore.api import variant_of, local_path, one_of, DTYPES, AutoEncoderParams; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_paths_unchecked_skips_only_the_existence_check():
    from diffcore.config.validators import paths_unchecked

    with paths_unchecked():
        assert Config(path="./models/flux1-dev").path == "./models/flux1-dev"
        with pytest.raises(ConfigError, match="looks like a Hugging Face hub id"):
            Config(path="org/model")
        with pytest.raises(ConfigError, match="unknown FLUX.1 variant"):
            Config(variant="shnell")
    with pytest.raises(ConfigError, match="no such file or folder: ./models/flux1-dev"):
        Config(path="./models/flux1-dev")
