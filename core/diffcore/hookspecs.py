"""The hooks a diffcore plugin can implement.

Every ``register_<kind>`` hook receives a ``register`` callable:
``register(name, factory, config=ConfigClass, description="one line")``.
Factories are called lazily, so a plugin module should import nothing heavy at the top.
"""

import pluggy

hookspec = pluggy.HookspecMarker("diffcore")
hookimpl = pluggy.HookimplMarker("diffcore")


@hookspec
def register_models(register):
    """Register model families (name = family; the config class carries ``variant``)."""


@hookspec
def register_schedules(register):
    """Register sigma schedules (timers)."""


@hookspec
def register_samplers(register):
    """Register integrators (samplers)."""


@hookspec
def register_guidance(register):
    """Register guidance processors."""


@hookspec
def register_trainers(register):
    """Register training methods (objectives and what they train)."""


@hookspec
def register_conditioning(register):
    """Register conditioning-image makers for ControlNet training (``canny``; ``depth`` from a plugin)."""


@hookspec
def register_datasets(register):
    """Register datasets."""


@hookspec
def register_jobs(register):
    """Register job kinds, dispatched on ``[job] kind`` by ``diffcore run``."""


@hookspec
def register_request_fields(register):
    """Register HTTP request fields of the ``serve`` job that set an option of a guidance
    processor: ``register(field, guidance="name", option="config field")``."""


@hookspec(historic=True)
def register_hookspecs(add):
    """Declare hookspecs of your own: call ``add(module_or_class)`` (e.g. a ``register_rewards`` kind)."""


@hookspec
def register_commands(cli):
    """Add click commands to the ``diffcore`` command group."""
