"""diffcore-sd3: Stable Diffusion 3 / 3.5 (Stability AI) in the reference's checkpoint layout.

- ``params``: the variant table (no torch); ``model`` / ``layers``: the MMDiT (MMDiT-X for
  SD3.5-medium);
- ``convert``: original <-> diffusers keys, the single-file prefix, layout, variant and
  foreign-file detection; ``load``: files to modules through the core loader;
  ``convert_job``: the ``sd3-convert`` job;
- ``vae``: the 16-channel autoencoder on the core's LDM autoencoder; ``text``: CLIP-L + CLIP-G
  + T5 conditioning; ``guidance``: skip-layer guidance;
- ``bundle`` / ``plugin``: the ``sd3`` model family registered with diffcore.
"""

__version__ = "0.3.0"
