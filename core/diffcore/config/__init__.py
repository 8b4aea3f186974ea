"""Job files: TOML loading with ``extends`` and ``--set``, then structuring into attrs classes."""

from diffcore.config.loader import Document, apply_override, load_document
from diffcore.config.spec import Spec, component, component_list
from diffcore.config.structure import structure, unstructure

__all__ = ["Document", "Spec", "apply_override", "component", "component_list", "load_document",
           "structure", "unstructure"]
