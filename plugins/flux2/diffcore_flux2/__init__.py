"""diffcore-flux2: the FLUX.2 family (Black Forest Labs) in BFL's own checkpoint layout.

Modules: ``params`` (the variant table, torch-free), ``model`` (the transformer, built from the
core's blocks), ``references`` (klein-9b-kv's reference cache), ``vae`` (the core's LDM
autoencoder with 32 channels and BatchNorm latent statistics), ``convert`` (BFL <->
diffusers <-> ComfyUI keys, layout and variant detection, loading), ``sampling`` (BFL's
empirical-mu schedule, position ids, Euler loops, inpainting's kept region), ``images``
(reference and inpainting inputs: pixel caps, crops, token masks), ``bundle`` (what the core
gets), ``plugin`` (registration, torch-free).
"""

__version__ = "0.3.0"
