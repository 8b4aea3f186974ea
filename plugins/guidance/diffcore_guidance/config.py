"""Config classes and factories of this plugin's components. Torch-free: ``diffcore list`` and job
validation read these without loading torch; each factory imports its module when called.

Defaults are the published ones where a paper or its reference code gives one; the docstrings of
the processors (``prediction.py``, ``attention.py``) cite where each comes from.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
from attrs import validators as v

_unit = [v.ge(0.0), v.le(1.0)]


class _Window:
    """Configs with a ``[start, stop)`` window over the schedule check it is not empty."""

    def __attrs_post_init__(self) -> None:
        if self.start >= self.stop:  # type: ignore[attr-defined]
            raise ValueError(f"start ({self.start}) must be less than stop ({self.stop})")  # type: ignore[attr-defined]


# -- prediction-level ----------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class APGConfig(_Window):
    """Adaptive projected guidance (Sadat et al. 2024). ``scale`` as CFG's; ``eta`` weighs the
    update's component parallel to the conditional prediction (paper: 0); ``norm_threshold`` caps
    the update's L2 norm (0: off); ``momentum`` is the paper's (negative) beta; ``space`` picks
    where the update is taken: the x0 estimates as in the paper, or the raw output as diffusers."""

    scale: float = attrs.field(default=4.0, validator=v.ge(0))
    eta: float = 0.0
    norm_threshold: float = attrs.field(default=15.0, validator=v.ge(0))
    momentum: float = attrs.field(default=-0.5, validator=[v.gt(-1.0), v.lt(1.0)])
    space: Literal["denoised", "raw"] = "denoised"
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


@attrs.frozen(kw_only=True)
class CFGZeroStarConfig(_Window):
    """CFG-Zero* (Fan et al. 2025): CFG with the optimised scale s* on the unconditional branch,
    and zero velocity for the first ``zero_init_steps`` steps (0: off)."""

    scale: float = attrs.field(default=4.0, validator=v.ge(0))
    zero_init_steps: int = attrs.field(default=1, validator=v.ge(0))
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


def apg_factory(config: APGConfig, **_: Any) -> Any:
    from diffcore_guidance.prediction import APG

    return APG(scale=config.scale, eta=config.eta, norm_threshold=config.norm_threshold, momentum=config.momentum,
               space=config.space, start=config.start, stop=config.stop)


def cfg_zero_star_factory(config: CFGZeroStarConfig, **_: Any) -> Any:
    from diffcore_guidance.prediction import CFGZeroStar

    return CFGZeroStar(scale=config.scale, zero_init_steps=config.zero_init_steps, start=config.start,
                       stop=config.stop)


# -- attention-level -----------------------------------------------------------------------------

# diffusers' PAG pipelines for transformers (PixArt-Sigma, SD3, HunyuanDiT) default to "blocks.1";
# every family accepts diffusers' layer names as aliases, so this resolves on DiT and FLUX alike.
PAG_LAYERS = ["transformer_blocks.1.attn"]
# NAG-PAG's layers for FLUX.1 [dev] (19 double blocks); set ``layers`` for smaller models
NAG_PAG_LAYERS = ["transformer_blocks.8.attn", "transformer_blocks.12.attn", "transformer_blocks.16.attn"]


@attrs.frozen(kw_only=True)
class PAGConfig(_Window):
    """Perturbed-attention guidance (Ahn et al. 2024): a second pass of the conditional branch
    with identity self-attention on ``layers``; ``[]`` turns it off."""

    scale: float = attrs.field(default=3.0, validator=v.ge(0))
    layers: list[str] = attrs.field(factory=lambda: list(PAG_LAYERS))
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


@attrs.frozen(kw_only=True)
class NAGConfig(_Window):
    """Normalized attention guidance (Chen et al. 2025): inside ``layers`` of the conditional
    branch, extrapolate away from the attention output under the ``negative`` conditioning."""

    scale: float = attrs.field(default=5.0, validator=v.ge(1))
    tau: float = attrs.field(default=2.5, validator=v.gt(0))
    alpha: float = attrs.field(default=0.25, validator=_unit)
    layers: list[str] = attrs.field(factory=lambda: ["*"])
    negative: str = "uncond"
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


@attrs.frozen(kw_only=True)
class NAGPAGConfig(_Window):
    """NAG-PAG (a diffcore method): NAG's normalised extrapolation with PAG's identity attention as the
    negative, inside the conditional branch: no negative prompt, no extra forward pass."""

    scale: float = attrs.field(default=3.0, validator=[v.ge(0), v.le(10)])
    tau: float = attrs.field(default=2.5, validator=v.gt(0))
    alpha: float = attrs.field(default=0.25, validator=_unit)
    layers: list[str] = attrs.field(factory=lambda: list(NAG_PAG_LAYERS))
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


def pag_factory(config: PAGConfig, **_: Any) -> Any:
    from diffcore_guidance.attention import PAG

    return PAG(scale=config.scale, layers=tuple(config.layers), start=config.start, stop=config.stop)


def nag_factory(config: NAGConfig, **_: Any) -> Any:
    from diffcore_guidance.attention import NAG

    return NAG(scale=config.scale, tau=config.tau, alpha=config.alpha, layers=tuple(config.layers),
               negative=config.negative, start=config.start, stop=config.stop)


def nag_pag_factory(config: NAGPAGConfig, **_: Any) -> Any:
    from diffcore_guidance.attention import NAGPAG

    return NAGPAG(scale=config.scale, tau=config.tau, alpha=config.alpha, layers=tuple(config.layers),
                  start=config.start, stop=config.stop)


# -- learned -------------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class LearnedConfig(_Window):
    """A trained guidance model (``save_guidance_model`` / a ``train-guidance`` job's output):
    ``pred + guidance_scale * model(x, pred, txt, vec, sigma, step)`` each step.

    ``txt_key`` / ``vec_key`` name the conditioning kwargs the model reads; ``"auto"`` asks the
    family: its text tokens, and its pooled text vector (FLUX.1) or class labels (DiT)."""

    checkpoint: str
    guidance_scale: float = 1.0
    requires_grad: bool = False
    txt_key: str = "auto"
    vec_key: str = "auto"
    start: float = attrs.field(default=0.0, validator=_unit)
    stop: float = attrs.field(default=1.0, validator=_unit)


def learned_factory(config: LearnedConfig, **_: Any) -> Any:
    from diffcore_guidance.learned import LearnedGuidance
    from diffcore_guidance.models import load_guidance_model

    return LearnedGuidance(model=load_guidance_model(config.checkpoint), guidance_scale=config.guidance_scale,
                           requires_grad=config.requires_grad, txt_key=config.txt_key, vec_key=config.vec_key,
                           start=config.start, stop=config.stop)


def register_guidance(register: Any) -> None:
    register("apg", apg_factory, config=APGConfig,
             description="adaptive projected guidance (Sadat et al. 2024): CFG with the parallel part down-weighted")
    register("cfg-zero-star", cfg_zero_star_factory, config=CFGZeroStarConfig,
             description="CFG-Zero* (Fan et al. 2025): optimised unconditional scale s*, zero-init first steps")
    register("pag", pag_factory, config=PAGConfig,
             description="perturbed-attention guidance (Ahn et al. 2024): identity self-attention branch")
    register("nag", nag_factory, config=NAGConfig,
             description="normalized attention guidance (Chen et al. 2025): negative conditioning in attention")
    register("nag-pag", nag_pag_factory, config=NAGPAGConfig,
             description="NAG-PAG: NAG-normalised identity-attention guidance inside the cond branch, no extra pass")
    register("learned", learned_factory, config=LearnedConfig,
             description="a trained guidance model adds a correction to the prediction each step")


# -- rewards -------------------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class InRangeConfig:
    """Penalty for values beyond +-``limit`` (oversaturation of pixel-space or [-1, 1] samples)."""

    limit: float = attrs.field(default=1.0, validator=v.gt(0))


@attrs.frozen(kw_only=True)
class TotalVariationConfig:
    """``weight`` times the mean absolute difference of neighbouring pixels: > 0 rewards detail,
    < 0 smoothness."""

    weight: float = 1.0


@attrs.frozen(kw_only=True)
class MeanTargetConfig:
    """Squared distance of each sample's mean value from ``target``, negated."""

    target: float = 0.0


@attrs.frozen(kw_only=True)
class ClassifierConfig:
    """Log-probability of the conditioning label under a classifier saved with ``torch.export``
    (``torch.export.save``, batch dimension dynamic): ``path``, and ``label_key``, the family's
    class-label kwarg (DiT: ``y``)."""

    path: str
    label_key: str = "y"


def _reward(name: str) -> Any:
    def factory(config: Any, **kwargs: Any) -> Any:
        from diffcore_guidance import rewards

        return rewards.build(name, config, **kwargs)

    return factory


def register_rewards(register: Any) -> None:
    register("in-range", _reward("in-range"), config=InRangeConfig,
             description="-mean(relu(|x0| - limit)^2): keeps samples inside their value range")
    register("total-variation", _reward("total-variation"), config=TotalVariationConfig,
             description="weight * mean |neighbour difference| of the predicted sample (detail or smoothness)")
    register("mean-target", _reward("mean-target"), config=MeanTargetConfig,
             description="-(mean(x0) - target)^2 per sample (brightness)")
    register("classifier", _reward("classifier"), config=ClassifierConfig,
             description="log p(label | x0) under an exported (torch.export) classifier")
