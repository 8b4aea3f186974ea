"""The import surface promised to plugin authors: import from here, nothing else in the core.

    from diffcore.api import hookimpl, ModelBundle, GuidanceProcessor, Branch
"""

from diffcore.config.spec import Spec, component, component_list
from diffcore.errors import CheckpointError, ConfigError, DiffcoreError, PluginError
from diffcore.hookspecs import hookimpl
from diffcore.jobs import JobContext, JobSettings, is_main_process
from diffcore.models import GenerationRequest, ModelBundle
from diffcore.nn.attention import Attention, AttentionContext, attention_layers, patch_attention, resolve_layers
from diffcore.plugins import registry
from diffcore.registry import NoConfig
from diffcore.sampling.engine import sample
from diffcore.sampling.guidance import COND, UNCOND, Branch, BranchPatch, GuidanceProcessor, StepInfo

__all__ = [
    "COND", "UNCOND", "Attention", "AttentionContext", "Branch", "BranchPatch", "CheckpointError", "ConfigError",
    "DiffcoreError", "GenerationRequest", "GuidanceProcessor", "JobContext", "JobSettings", "ModelBundle",
    "NoConfig", "PluginError", "Spec", "StepInfo", "attention_layers", "component", "component_list", "hookimpl",
    "is_main_process", "patch_attention", "registry", "resolve_layers", "sample",
]
