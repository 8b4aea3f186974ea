"""The ``lora`` trainer: low-rank adapters (Hu et al. 2021, arXiv:2106.09685) through peft.

peft wraps each target ``nn.Linear`` of the network so that ``y = W x + (alpha / r) B A x`` with
``A`` (r, in) random and ``B`` (out, r) zero at the start: training begins at the base model.
Only ``A`` and ``B`` require gradients, so the optimizer, the EMA and every checkpoint hold the
adapters alone (megabytes for a model of gigabytes), and a resumed run continues bit for bit.
Targets are the family's presets or patterns in either naming (``ModelBundle.lora_targets``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcore.errors import ConfigError
from diffcore.training.trainers import FullTrainer

ADAPTER = "default"   # peft's adapter name; one adapter per training run


class LoraTrainer(FullTrainer):
    """Adapters on ``bundle.lora_targets(config.target_modules)``; the base network frozen."""

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
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha if config.alpha is not None else config.rank,
                                 lora_dropout=config.dropout, target_modules=self.targets,
                                 init_lora_weights=config.init)
        inject_adapter_in_model(peft_config, self.network, adapter_name=ADAPTER)
        self.timesteps = self.timestep_sampler(config)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.network.named_parameters() if ".lora_" in name]

    def state_dict(self, network: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the network: the adapters only."""
        return {k: v for k, v in network.state_dict().items() if ".lora_" in k}

    def load_state_dict(self, network: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict(network))
        if set(saved) != expected:
            missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise RuntimeError(f"the checkpoint's adapters differ from this run's: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]} (another rank or target_modules?)")
        network.load_state_dict(saved, strict=False)

    def adapters(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
        """Per target module: ``down`` (A), ``up`` (B) and ``alpha``, from the network or from
        ``tensors`` in the network's state-dict names (an EMA's shadows)."""
        tensors = self.state_dict(self.network) if tensors is None else tensors
        alpha = float(self.config.alpha if self.config.alpha is not None else self.config.rank)
        return {name: {"down": tensors[f"{name}.lora_A.{ADAPTER}.weight"].detach().float().cpu(),
                       "up": tensors[f"{name}.lora_B.{ADAPTER}.weight"].detach().float().cpu(), "alpha": alpha}
                for name in self.targets}

    def export(self, output_dir: Path, *, ema: Any = None, bundle: Any = None) -> list[Path]:
        """``lora.safetensors`` (and ``lora-ema.safetensors`` from the EMA's shadows) in the run folder."""
        written = [write_adapters(output_dir / "lora.safetensors", self.adapters(), bundle=bundle,
                                  format=self.config.save_format)]
        if ema is not None:
            shadows = {**self.state_dict(self.network), **ema.state_dict()}
            written.append(write_adapters(output_dir / "lora-ema.safetensors", self.adapters(shadows), bundle=bundle,
                                          format=self.config.save_format))
        return written


def write_adapters(path: Path, adapters: dict[str, dict[str, Any]], *, bundle: Any = None,
                   format: str = "diffcore") -> Path:
    """The trained adapters as a LoRA file in ``format`` (``diffcore.lora.save_lora``: diffusers,
    kohya, comfyui, diffcore / bfl, xlabs), written atomically with the format, ranks and targets
    in its metadata."""
    from diffcore.lora import LoraLayer, save_lora

    layers = {name: LoraLayer(down=a["down"], up=a["up"], alpha=float(a["alpha"])) for name, a in adapters.items()}
    return save_lora(path, layers, bundle, format=format)
