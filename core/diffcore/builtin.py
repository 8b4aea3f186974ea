"""The core's own components, registered through the same hooks as any third-party plugin.

Each catalog module imports no torch at import time; factories import what they need.
"""

from diffcore.hookspecs import hookimpl


@hookimpl
def register_schedules(register):
    from diffcore.sampling import catalog

    catalog.register_schedules(register)


@hookimpl
def register_samplers(register):
    from diffcore.sampling import catalog

    catalog.register_samplers(register)


@hookimpl
def register_guidance(register):
    from diffcore.sampling import catalog

    catalog.register_guidance(register)


@hookimpl
def register_datasets(register):
    from diffcore.data import catalog

    catalog.register_datasets(register)


@hookimpl
def register_trainers(register):
    from diffcore.training import catalog

    catalog.register_trainers(register)


@hookimpl
def register_conditioning(register):
    from diffcore.training import catalog

    catalog.register_conditioning(register)


@hookimpl
def register_jobs(register):
    from diffcore.jobs import catalog

    catalog.register_jobs(register)
