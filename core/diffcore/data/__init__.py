"""Datasets (digits, image-folder, cifar10) and the resumable, rank-aware batching of their indices.

Every dataset yields ``{"image": (C, H, W) float in [-1, 1], "label": int64 scalar}``.
``catalog`` registers them without importing torch; ``datasets`` and ``batching`` hold the code.
"""
