"""The component kind this plugin adds to diffcore: rewards.

Declared through the core's ``register_hookspecs`` hook, so any plugin can contribute rewards::

    @hookimpl
    def register_rewards(register):
        register("my-reward", factory, config=MyRewardConfig, description="one line")

``factory(config)`` returns ``reward(x0, cond) -> (batch,) tensor``: a differentiable score of the
predicted clean sample (latents as the model samples them) given the ``cond`` branch's
conditioning kwargs. Collect them with ``diffcore.plugins.get_plugins().registry("rewards")``.
"""

import pluggy

hookspec = pluggy.HookspecMarker("diffcore")


@hookspec
def register_rewards(register):
    """Register reward functions for training learned guidance (``train-guidance`` jobs)."""
