"""diffcore plugin ``guidance``: guidance processors, the ``rewards`` component kind, the
``train-guidance`` job and the ``layers`` / ``rewards`` commands. Imports no torch: every
factory imports its module when a job builds it.
"""

from __future__ import annotations

from diffcore.api import hookimpl
from diffcore_guidance import config as _config


@hookimpl
def register_hookspecs(add):
    from diffcore_guidance import hookspecs

    add(hookspecs)


@hookimpl
def register_guidance(register):
    _config.register_guidance(register)


@hookimpl
def register_rewards(register):
    _config.register_rewards(register)


@hookimpl
def register_request_fields(register):
    """The serve job's diffusers-style endpoints take NAG-PAG's settings as two flat fields."""
    register("nag_pag_scale", guidance="nag-pag", option="scale")
    register("nag_pag_applied_layers", guidance="nag-pag", option="layers")


@hookimpl
def register_jobs(register):
    from diffcore_guidance.job import TrainGuidanceJob, run_train_guidance

    register("train-guidance", run_train_guidance, config=TrainGuidanceJob,
             description="collect a base model's sampling trajectories and train a learned guidance model on them")


@hookimpl
def register_commands(cli):
    from diffcore_guidance.cli import add_commands

    add_commands(cli)
