"""diffcore-flux2: the FLUX.2 family (Black Forest Labs) in BFL's own checkpoint layout.

Modules: ``params`` (the variant table, torch-free), ``model`` / ``layers`` (the transformer),
``vae`` (the 32-channel autoencoder with its BatchNorm latent statistics), ``convert`` (BFL <->
diffusers <-> ComfyUI keys, layout and variant detection, loading), ``sampling`` (BFL's
empirical-mu schedule, position ids, Euler loops, inpainting's kept region), ``images``
(reference and inpainting inputs: pixel caps, crops, token masks), ``bundle`` (what the core
gets), ``plugin`` (registration, torch-free).
"""

__version__ = "0.3.0"
