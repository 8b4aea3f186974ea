"""SD3's autoencoder: the LDM autoencoder with 16 latent channels, no quant convs and the latent
normalisation ``(z - 0.0609) * 1.5305``. It is built on the core's shared autoencoder, which
has not landed in this tree yet: until then loading it is a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffcore.api import ConfigError


def load_vae(path: str | Path, *, dtype: Any = None, device: Any = "cpu") -> Any:
    raise ConfigError(f"{path}: SD3's autoencoder is not available in this build yet (it waits for the core's "
                      f"shared LDM autoencoder); the MMDiT, text encoders and sampling are", path="model.vae")
