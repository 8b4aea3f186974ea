"""diffcore-flux1: the FLUX.1 family (Black Forest Labs) in BFL's own checkpoint layout.

- ``params``: the variant tables (no torch); ``model`` / ``layers``: the transformer;
  ``vae``: the 16-channel autoencoder, latent normalisation and 2x2 packing;
- ``convert``: BFL <-> diffusers <-> ComfyUI keys, layout and variant detection;
  ``load``: files to modules through ``diffcore.io.checkpoint.load_model``;
- ``sampling``: BFL's schedule, position ids and Euler loop; ``text``: T5 + CLIP conditioning;
- ``bundle`` / ``plugin``: the ``flux1`` model family registered with diffcore.
"""

__version__ = "0.3.0"
