"""``compile = true`` in a ``[model]`` table: the denoiser's forward through ``torch.compile``.

Why in place and not ``torch.compile(network)``: the ``OptimizedModule`` that returns prefixes
every state-dict key with ``_orig_mod.``, and checkpoints, LoRA files, peft injection and the
attention-layer names guidance reads (PAG, NAG) all use the plain names. Here the network
stays the same module with the same keys; only its ``forward`` is swapped for one that calls
the compiled forward.

Why a patched forward runs eagerly: attention-level guidance (``patch_attention``) installs
new Python callables on attention layers for some branches of a step. Traced, each new patch
would be a guard failure and a recompile (or, after ``torch._dynamo.config.cache_size_limit``
of them, a silent fall back to eager); so while any attention layer of the network carries a
patch, the forward runs as written, and the compiled graph stays the unpatched one.

Order: apply this last, after LoRA merging, peft injection and anything else that changes the
network's modules (the jobs do). Compiling is lazy: the first forward traces, one graph per
forward (the families' networks have no graph breaks: ``tests/nn/test_compile.py``). With
``dynamic=None`` a second input size recompiles once with dynamic sizes, which then cover every
further size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffcore.nn.attention import Attention

_EAGER = "_diffcore_eager_forward"


def compile_network(network: nn.Module, *, mode: str = "default", dynamic: bool | None = None,
                    fullgraph: bool = False, backend: str = "inductor") -> nn.Module:
    """``network`` with its forward compiled, in place (state-dict keys unchanged); compiling
    twice is a no-op. ``mode``, ``dynamic`` and ``backend`` are ``torch.compile``'s;
    ``fullgraph=True`` makes a graph break an error (what the tests ask; ``backend="eager"``
    traces without code generation, to count graphs cheaply)."""
    if is_compiled(network):
        return network
    eager = network.forward
    compiled = torch.compile(eager, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=fullgraph,
                             backend=backend)
    layers = [m for m in network.modules() if isinstance(m, Attention)]

    def forward(*args: Any, **kwargs: Any) -> Any:
        if any(layer.routes for layer in layers):   # guidance patches some layers: run them as written
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    network.forward = forward
    setattr(network, _EAGER, eager)
    return network


def is_compiled(network: nn.Module) -> bool:
    """Whether ``compile_network`` has compiled ``network``."""
    return _EAGER in network.__dict__


def uncompiled(network: nn.Module) -> nn.Module:
    """``network`` back to its eager forward (a compiled one is restored in place)."""
    if is_compiled(network):
        del network.forward
        delattr(network, _EAGER)
    return network


def compile_bundle_network(bundle: Any, options: Any) -> Any:
    """Compile ``bundle.network`` as a ``[model]`` table's ``ModelOptions`` ask (None or
    ``compile = false``: nothing); returns the bundle."""
    if options is not None and options.compile:
        compile_network(bundle.network, mode=options.compile_mode, dynamic=options.compile_dynamic)
    return bundle
