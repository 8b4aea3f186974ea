"""diffcore-sd3: Stable Diffusion 3 / 3.5 (Stability AI) in the reference's checkpoint layout.

- ``params``: the variant table (no torch); ``model`` / ``layers``: the MMDiT (MMDiT-X for
  SD3.5-medium);
- ``convert``: original <-> diffusers keys, the single-file prefix, layout, variant and
  foreign-file detection.
"""

__version__ = "0.3.0"
