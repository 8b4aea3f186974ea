"""diffcore-flux1: the FLUX.1 family (Black Forest Labs) in BFL's own checkpoint layout.

- ``params``: the variant tables and sampling defaults (no torch); ``model``: the transformer,
  built from the core's blocks (``diffcore.nn``); ``vae``: the 16-channel autoencoder (the
  core's LDM autoencoder with FLUX.1's numbers) and 2x2 packing;
- ``convert``: BFL <-> diffusers <-> ComfyUI keys, layout, variant and foreign-file detection;
  ``load``: files to modules through ``diffcore.io.checkpoint.load_model``, with the checks
  that name a wrong or damaged file; ``convert_job``: the ``flux1-convert`` job;
- ``sampling``: BFL's schedule, position ids and Euler loop; ``text``: T5 + CLIP conditioning;
  ``images``: Kontext, Fill and control-image conditioning;
- ``offload``: where components live between uses (the core's ``Offload``);
- ``bundle`` / ``plugin``: the ``flux1`` model family registered with diffcore.
"""

__version__ = "0.3.0"
