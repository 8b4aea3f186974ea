"""diffcore-sdxl: Stable Diffusion XL (Stability AI 2023), base 1.0 and refiner 1.0, in the
layout of Stability's own checkpoints (``generative-models``, ``sgm.modules.diffusionmodules``).

- ``params``: the variant tables and sampling defaults (no torch);
- ``model`` / ``layers``: the UNet (time and label embedding, ResBlocks, SpatialTransformers);
- ``convert``: Stability <-> diffusers keys, layout and variant detection; ``load``: files to
  modules with the checks that name a wrong or damaged file;
- ``text``: CLIP-L + OpenCLIP bigG conditioning, micro-conditioning; ``vae``: the 4-channel VAE;
- ``bundle`` / ``plugin``: the ``sdxl`` model family (base + refiner) registered with diffcore.
"""

__version__ = "0.3.0"
