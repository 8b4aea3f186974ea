"""diffcore: a plugin framework for diffusion and flow-matching image models."""

__version__ = "0.3.0"
