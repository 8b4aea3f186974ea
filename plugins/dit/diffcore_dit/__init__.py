"""DiT for diffcore: a class-conditional transformer predicting flow-matching velocity.

Torch-free at import; ``diffcore_dit.model`` and ``diffcore_dit.bundle`` hold the network.
"""

__version__ = "0.3.0"
