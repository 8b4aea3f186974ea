"""What every family's ``<family>-convert`` job shares: the settings a convert job file has, and
the check that a converted state dict is exactly the family's network before anything is written.

A family's job subclasses ``ConvertSettings`` with its own ``layout`` and ``variant`` fields (the
layouts and variants are the family's) and writes with ``diffcore.api.save_converted``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from diffcore.config.validators import local_path, one_of
from diffcore.errors import CheckpointError, ConfigError
from diffcore.jobs import JobSettings

if TYPE_CHECKING:   # importing this module stays cheap: plugins register convert jobs with it
    import torch
    from torch import nn

CONVERT_DTYPES = ("keep", "bfloat16", "float16", "float32")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@attrs.define
class ConvertSettings(JobSettings):
    """``input``: the file or folder to convert; ``dtype``: what floating tensors are stored as
    (``keep``: as they are); ``filename``: the single file's name where a layout writes one."""

    input: str = attrs.field(default="", validator=local_path)
    dtype: str = attrs.field(default="keep", validator=one_of(CONVERT_DTYPES))
    filename: str | None = None

    def source(self, what: str) -> Path:
        """``input`` as a path; unset is an error saying what it should name."""
        if not self.input:
            raise ConfigError(f"set input to {what}", path="job.input")
        return Path(self.input).expanduser()


def check_converted(state: Mapping[str, "torch.Tensor"], network: Callable[[], "nn.Module"], weights: Path,
                    what: str) -> None:
    """An error naming ``weights`` unless ``state`` has exactly the keys and shapes of
    ``network()`` (built on the meta device: no memory): a convert job never writes a file its
    own family could not load."""
    import torch

    with torch.device("meta"):
        expected = {k: v.shape for k, v in network().state_dict().items()}
    wrong = sorted(set(expected) ^ set(state)) + [k for k in expected if k in state and state[k].shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{weights}: does not match {what}: {len(wrong)} key(s) missing, unexpected or "
                              f"mis-shaped: {', '.join(wrong[:5])}")
