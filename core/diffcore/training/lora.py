"""The ``lora`` trainer: low-rank adapters (Hu et al. 2021, arXiv:2106.09685) through peft.

peft wraps each target ``nn.Linear`` of the network so that ``y = W x + (alpha / r) B A x`` with
``A`` (r, in) random and ``B`` (out, r) zero at the start: training begins at the base model.
Only ``A`` and ``B`` require gradients, so the optimizer, the EMA and every checkpoint hold the
adapters alone (megabytes for a model of gigabytes), and a resumed run continues bit for bit.
Targets are the family's presets or patterns in either naming (``ModelBundle.lora_targets``).
The wrapped layers then run as one autograd function each (``diffcore.nn.lora_linear``): peft's
numbers to rounding, with fewer passes over wide tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.nn.lora_linear import fuse_lora_layers
from diffcore.training.trainers import FullTrainer

ADAPTER = "default"   # peft's adapter name; one adapter per training run


class LoraTrainer(FullTrainer):
    """Adapters on ``bundle.lora_targets(config.target_modules)``; the base network frozen. With
    ``train_text_encoder`` also on the bundle's ``text_encoders()``, their base frozen too."""

    def __init__(self, config: Any, bundle: Any):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ConfigError("the lora trainer needs peft: pip install peft (or pip install 'diffcore[lora]')",
                              path="trainer") from None
        self.config = config
        self.network: nn.Module = bundle.network
        self.targets = bundle.lora_targets(config.target_modules)
        self.network.requires_grad_(False)
        peft_config = LoraConfig(r=config.rank, lora_alpha=self.alpha, lora_dropout=config.dropout,
                                 target_modules=self.targets, init_lora_weights=config.init)
        inject_adapter_in_model(peft_config, self.network, adapter_name=ADAPTER)
        fuse_lora_layers(self.network)
        self.text_encoders: dict[str, nn.Module] = {}
        self.text_targets: dict[str, list[str]] = {}
        if getattr(config, "train_text_encoder", False):
            self.add_text_adapters(bundle)
        self.own_lr = self.text_lr if self.text_encoders and config.text_encoder_lr is not None else None
        self.timesteps = self.timestep_sampler(config)

    @property
    def alpha(self) -> float:
        return float(self.config.alpha if self.config.alpha is not None else self.config.rank)

    @property
    def text_rank(self) -> int:
        return self.config.text_encoder_rank or self.config.rank

    @property
    def text_alpha(self) -> float:
        alpha = self.config.text_encoder_alpha
        return float(alpha) if alpha is not None else (self.alpha if self.config.text_encoder_rank is None
                                                       else float(self.text_rank))

    def add_text_adapters(self, bundle: Any) -> None:
        """Adapters on the targets of each trainable text encoder; the bundle then encodes captions
        with gradients. A family without trainable encoders is a ``ConfigError``."""
        from peft import LoraConfig, inject_adapter_in_model

        encoders = bundle.text_encoders()
        if not encoders:
            raise ConfigError(f"{type(bundle).__name__} has no text encoders a LoRA can train (the family does not "
                              "support it, or the model has no text encoders loaded): set "
                              "trainer.train_text_encoder = false", path="trainer.train_text_encoder")
        for prefix, encoder in encoders.items():
            encoder.requires_grad_(False)
            peft_config = LoraConfig(r=self.text_rank, lora_alpha=self.text_alpha, lora_dropout=self.config.dropout,
                                     target_modules=list(self.config.text_encoder_targets),
                                     init_lora_weights=self.config.init)
            try:
                inject_adapter_in_model(peft_config, encoder, adapter_name=ADAPTER)
            except ValueError as exc:
                linears = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]
                raise ConfigError(f"text_encoder_targets {self.config.text_encoder_targets} match no linear layer of "
                                  f"{prefix} ({type(encoder).__name__}: {', '.join(linears[:3])}, ...): {exc}",
                                  path="trainer.text_encoder_targets") from None
            fuse_lora_layers(encoder)
            self.text_targets[prefix] = [n for n, m in encoder.named_modules() if hasattr(m, "lora_A")]
            self.text_encoders[prefix] = encoder
        bundle.train_text = True

    def tracked(self, network: nn.Module) -> nn.Module:
        """What the loop's optimizer, EMA and checkpoints follow: the network, and the text encoders
        when they train."""
        return WithTextEncoders(network, self.text_encoders) if self.text_encoders else network

    def text_lr(self, p: nn.Parameter) -> float | None:
        """A parameter's own learning rate (the loop's ``own_lr``): ``text_encoder_lr`` for a text
        encoder's adapter, None (the job's ``lr``) for the network's."""
        ids = {id(q) for e in self.text_encoders.values() for q in e.parameters()}
        return self.config.text_encoder_lr if id(p) in ids else None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.tracked(self.network).named_parameters() if ".lora_" in name]

    def state_dict(self, network: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the network (and text encoders, ``tracked``): the adapters only."""
        return {k: p.detach() for k, p in network.named_parameters() if ".lora_" in k}

    def load_state_dict(self, network: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict(network)
        if set(saved) != set(expected):
            missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
            raise RuntimeError(f"the checkpoint's adapters differ from this run's: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]} (another rank, target_modules or train_text_encoder?)")
        with torch.no_grad():
            for name, tensor in expected.items():
                tensor.copy_(saved[name])

    def adapters(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
        """Per target module: ``down`` (A), ``up`` (B) and ``alpha``, from the network or from
        ``tensors`` in the network's state-dict names (an EMA's shadows)."""
        tensors = self.state_dict(self.network) if tensors is None else tensors
        return _pairs(tensors, self.targets, "", self.alpha)

    def text_adapters(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``adapters`` of each trained text encoder, by its file prefix (``text_encoder``)."""
        tensors = self.state_dict(self.tracked(self.network)) if tensors is None else tensors
        return {prefix: _pairs(tensors, targets, f"{prefix}.", self.text_alpha)
                for prefix, targets in self.text_targets.items()}

    def export(self, output_dir: Path, *, ema: Any = None, bundle: Any = None) -> list[Path]:
        """``lora.safetensors`` (and ``lora-ema.safetensors`` from the EMA's shadows) in the run folder,
        the text encoders' adapters in it too when they trained."""
        fmt = self.config.save_format
        written = [write_adapters(output_dir / "lora.safetensors", self.adapters(), bundle=bundle, format=fmt,
                                  text=self.text_adapters())]
        if ema is not None:
            shadows = {**self.state_dict(self.tracked(self.network)), **ema.state_dict()}
            written.append(write_adapters(output_dir / "lora-ema.safetensors", self.adapters(shadows), bundle=bundle,
                                          format=fmt, text=self.text_adapters(shadows)))
        return written


class WithTextEncoders(nn.Module):
    """The network and the text encoders whose adapters train, as one module for the loop. The
    network's parameters keep their own names and an encoder's take its file prefix
    (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight``), so the
    network's part of a checkpoint reads as a network-only run's."""

    def __init__(self, network: nn.Module, encoders: dict[str, nn.Module]):
        super().__init__()
        self.network = network
        self.encoders = nn.ModuleDict(encoders)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.network.named_parameters(prefix, recurse, remove_duplicate)
        for name, encoder in self.encoders.items():
            yield from encoder.named_parameters(f"{prefix}.{name}" if prefix else name, recurse, remove_duplicate)


def _pairs(tensors: dict[str, torch.Tensor], targets: list[str], prefix: str, alpha: float) -> dict[str, dict]:
    return {name: {"down": tensors[f"{prefix}{name}.lora_A.{ADAPTER}.weight"].detach().float().cpu(),
                   "up": tensors[f"{prefix}{name}.lora_B.{ADAPTER}.weight"].detach().float().cpu(), "alpha": alpha}
            for name in targets}


def write_adapters(path: Path, adapters: dict[str, dict[str, Any]], *, bundle: Any = None,
                   format: str = "diffcore", text: dict[str, dict[str, dict[str, Any]]] | None = None) -> Path:
    """The trained adapters as a LoRA file in ``format`` (``diffcore.lora.save_lora``: diffusers,
    kohya, comfyui, diffcore / bfl, xlabs), written atomically with the format, ranks and targets
    in its metadata; ``text``: the text encoders' adapters by file prefix."""
    from diffcore.lora import LoraLayer, save_lora

    def layers(items: dict[str, dict[str, Any]]) -> dict[str, LoraLayer]:
        return {name: LoraLayer(down=a["down"], up=a["up"], alpha=float(a["alpha"])) for name, a in items.items()}

    return save_lora(path, layers(adapters), bundle, format=format,
                     text_encoders={prefix: layers(items) for prefix, items in (text or {}).items()})
