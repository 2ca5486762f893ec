"""LoRA (Hu et al. 2021) on the language model's linear layers, applied from outside the model.

`apply_lora` swaps chosen nn.Linear modules for `LoRALinear`, which keeps the frozen original as `.base` and adds
a low-rank update B·A scaled by alpha / r. After training the update is either merged into the weights (a plain
checkpoint) or saved alone as an adapter in PEFT's file format, which `llava_next.load` merges on loading (with
`llava_next.adapter`, the inference side, which never imports training).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    r: int = 0  # 0: no LoRA, the language model trains in full (when it trains)
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    merge: bool = True  # merge into the weights on save; False saves an adapter beside nothing else

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)  # starts as the identity update

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale


def apply_lora(module: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap every nn.Linear under `module` whose name ends in one of cfg.targets; returns their names."""
    wrapped = []
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Linear) and attr in cfg.targets:
                setattr(child, attr, LoRALinear(sub, cfg.r, cfg.alpha, cfg.dropout))
                wrapped.append(f"{name}.{attr}" if name else attr)
    if not wrapped:
        raise ValueError(f"LoRA found no linear layer named any of {cfg.targets}")
    return wrapped


def split_lora_state(state: dict[str, torch.Tensor], scale: float) -> tuple[dict, dict]:
    """A state dict of a LoRA-wrapped model -> (the merged plain state dict, the adapter's A and B matrices)."""
    merged, adapter = {}, {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            adapter[key] = value
        elif ".base." in key:
            merged[key.replace(".base.", ".")] = value
        else:
            merged[key] = value
    for key in [k for k in adapter if ".lora_A." in k]:
        prefix = key.split(".lora_A.")[0]
        a, b = adapter[key].float(), adapter[f"{prefix}.lora_B.weight"].float()
        weight = merged[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (weight.float() + scale * (b @ a)).to(weight.dtype)
    return merged, adapter


def peft_key(name: str) -> str:
    """Our `language_model.layers.0.self_attn.q_proj.lora_A.weight` -> PEFT's key for transformers' module tree."""
    return PEFT_PREFIX + "model." + name


def save_adapter(adapter: dict[str, torch.Tensor], cfg: LoraConfig, directory: Path, base_model: str) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({peft_key(k): v.detach().contiguous().cpu() for k, v in adapter.items()}, str(directory / ADAPTER_WEIGHTS))
    (directory / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base_model, "r": cfg.r, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": cfg.targets, "bias": "none",
    }, indent=2))

