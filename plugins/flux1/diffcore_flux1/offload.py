"""FLUX.1's component placement is the core's ``diffcore.nn.offload.Offload`` (none / model /
sequential); this name stays for the bundle's import."""

from diffcore.api import Offload

__all__ = ["Offload"]
