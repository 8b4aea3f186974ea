"""A small plugin used by the core tests: an ``echo`` job and toy components with validators."""

from __future__ import annotations

import json
from typing import Literal

import attrs
from attrs import validators as v

from diffcore.api import JobSettings, Spec, component, component_list, hookimpl


@attrs.frozen
class ToySamplerConfig:
    eta: float = attrs.field(default=0.0, validator=v.ge(0))


@attrs.frozen
class ToyGuidanceConfig:
    scale: float = attrs.field(default=3.0, validator=[v.ge(0), v.le(10)])
    layers: list[str] = attrs.Factory(list)


@attrs.define
class EchoSettings(JobSettings):
    steps: int = attrs.field(default=10, validator=v.gt(0))
    scale: float = attrs.field(default=1.0, validator=[v.ge(0), v.le(10)])
    mode: Literal["fast", "slow"] = "fast"
    tags: list[str] = attrs.Factory(list)
    note: str | None = None


@attrs.define
class EchoJob:
    job: EchoSettings = attrs.Factory(EchoSettings)
    sampler: Spec = component("samplers", default={"name": "toy"})
    guidance: list[Spec] = component_list("guidance")


def run_echo(config: EchoJob, ctx):
    built = {"sampler": config.sampler.build(), "guidance": [g.build() for g in config.guidance]}
    (ctx.output_dir / "echo.json").write_text(json.dumps(ctx.resolved))
    return config, built


@hookimpl
def register_jobs(register):
    register("echo", run_echo, config=EchoJob, description="Write the resolved config (tests)")


@hookimpl
def register_samplers(register):
    register("toy", lambda cfg: ("toy-sampler", cfg.eta), config=ToySamplerConfig, description="toy sampler")


@hookimpl
def register_guidance(register):
    register("toy-scale", lambda cfg: ("toy-guidance", cfg.scale), config=ToyGuidanceConfig,
             description="toy guidance")
