"""diffcore-guidance: APG, CFG-Zero*, PAG, NAG, NAG-PAG and learned guidance models.

Importing the package is cheap; the names below load their (torch) modules on first use::

    from diffcore_guidance import NAGPAG, create_conv_guidance_model, GuidanceModelTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

_LAZY = {
    "APG": "prediction", "CFGZeroStar": "prediction",
    "PAG": "attention", "NAG": "attention", "NAGPAG": "attention", "identity_attention": "attention",
    "nag_combine": "attention",
    "BaseGuidanceModel": "models", "MLPGuidanceModel": "models", "AttentionGuidanceModel": "models",
    "ConvGuidanceModel": "models", "StepSpecificGuidanceWrapper": "models", "MultiObjectiveGuidance": "models",
    "create_mlp_guidance_model": "models", "create_attention_guidance_model": "models",
    "create_conv_guidance_model": "models", "build_guidance_model": "models", "save_guidance_model": "models",
    "load_guidance_model": "models",
    "LearnedGuidance": "learned", "GuidanceModelTrainer": "training", "euler_with_grad": "training",
    "Trajectories": "trajectories", "collect_trajectories": "trajectories",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffcore_guidance' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffcore_guidance.{_LAZY[name]}"), name)
