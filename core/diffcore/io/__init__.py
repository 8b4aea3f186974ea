"""Files in and out: checkpoints (``diffcore.io.checkpoint``) and images (``diffcore.io.images``).

Import the submodule you need; this package imports nothing so either can be used alone.
"""
