"""LoRA adapters in PEFT's file format, merged into a loaded model's weights.

This is the inference side: `load()` uses it for a directory holding adapter_config.json and adapter weights
(as `llava-next train` writes with lora.merge: false, or PEFT's save_pretrained). Training builds and saves adapters
in `llava_next.train.lora`, which imports the file names from here.

A module's update is B·A·scale, added to its weight, with PEFT's rules for the scale: alpha / r, or alpha / sqrt(r)
with use_rslora, where r and alpha come from rank_pattern / alpha_pattern when a pattern matches the module's name
(the first matching key, matched as PEFT matches it: the whole name or a dotted suffix of it, as a regular
expression). fan_in_fan_out changes nothing here: PEFT resets it for nn.Linear targets, the only kind a LLaVA model
has. Anything else that changes how an adapter applies (DoRA and the other LoRA variants, trained biases, whole
modules saved beside the adapter, initialisations that rewrite the base weights) is refused, naming the field.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, map_weight_name, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_LEGACY = "adapter_model.bin"  # older PEFT; read with torch.load(weights_only=True)
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the transformers model, in every saved key

# PEFT config fields whose default is the only value we merge exactly; any other value is refused by name.
# (Fields that only choose *which* modules get an adapter, like target_modules or layers_to_transform, need no
# check: the saved weights say which modules have one.)
MUST_BE_OFF = ("use_dora", "use_qalora", "use_bdlora", "velora_config", "alora_invocation_tokens",
               "monteclora_config", "arrow_config", "kasa_config", "lora_bias", "modules_to_save",
               "trainable_token_indices", "layer_replication", "target_parameters", "megatron_config")
# Initialisations that leave the base weights as they are (the others, PiSSA, OLoRA, LoftQ..., rewrite them, so the
# saved A and B only fit the rewritten base; PEFT can save such an adapter converted to a plain one).
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_adapter(path: Path) -> bool:
    """A directory holding an adapter and no model of its own."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").exists()


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json, checked: a LoRA adapter we can merge exactly, or a CheckpointError naming the field."""
    config = read_json(directory / ADAPTER_CONFIG)
    where = directory / ADAPTER_CONFIG
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config['peft_type']!r} is not supported; only LoRA adapters are")
    if not config.get("base_model_name_or_path"):
        raise CheckpointError(f"{where}: base_model_name_or_path is not set, so the base model is unknown")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise CheckpointError(f"{where}: {name} must be a positive number, not {value!r}")
    for name in MUST_BE_OFF:
        if config.get(name):
            raise CheckpointError(f"{where}: {name}={config[name]!r} is not supported (only plain LoRA merges "
                                  "exactly here); merge the adapter with PEFT and load the merged model instead")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{where}: bias={config['bias']!r} is not supported (the adapter trained biases of "
                              "the base model); only bias='none' is")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise CheckpointError(
            f"{where}: init_lora_weights={config['init_lora_weights']!r} rewrites the base weights, so this adapter "
            "does not apply to the base model as published; save it converted (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion) or merged")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            raise CheckpointError(f"{where}: {name} must map module name patterns to numbers")
    return config


def pattern_value(patterns: dict[str, Any], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that, as a regular expression, matches the module's
    whole name or a suffix of it that starts after a dot."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """(r, scale) of one module's update, as PEFT computes them."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    if (directory / ADAPTER_WEIGHTS).exists():
        from safetensors.torch import load_file

        return load_file(str(directory / ADAPTER_WEIGHTS))
    if (directory / ADAPTER_WEIGHTS_LEGACY).exists():
        return torch.load(directory / ADAPTER_WEIGHTS_LEGACY, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{directory}: an adapter_config.json but no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_LEGACY})")


def merge_adapter(model: nn.Module, directory: Path, config: dict[str, Any] | None = None) -> None:
    """Add a saved adapter's updates into the model's weights, in place."""
    config = config if config is not None else read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    params = model.checkpoint_weights()  # views into fused projections, where the model has them
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module name as saved -> {"A": ..., "B": ...}
    for key, tensor in weights.items():
        found = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if found is None or not key.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{directory}: the adapter holds {key}, which is not a plain LoRA A or B matrix; "
                                  "only plain LoRA adapters are supported")
        pairs.setdefault(found.group(1)[len(PEFT_PREFIX):], {})[found.group(2)] = tensor
    for module, ab in pairs.items():
        if len(ab) != 2:
            (have,) = ab
            raise CheckpointError(f"{directory}: {module} has a lora_{have} matrix but no lora_{'B' if have == 'A' else 'A'}")
        name = map_weight_name(module + ".weight") or ""
        if name.startswith(model.skipped_checkpoint_prefixes()):
            continue  # a layer the inference model leaves out (vision blocks past the feature layer)
        target = params.get(name)
        if target is None:
            raise CheckpointError(f"{directory}: the adapter has weights for {module}, which the base model lacks")
        a, b = ab["A"], ab["B"]
        r, scale = module_scale(config, module)
        if a.shape[0] != r or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(target.shape):
            raise CheckpointError(
                f"{directory}: {module}'s A {tuple(a.shape)} and B {tuple(b.shape)} do not fit rank {r} (from the "
                f"config) and the base weight {tuple(target.shape)}")
        with torch.no_grad():
            a = a.to(target.device, torch.float32)
            b = b.to(target.device, torch.float32)
            target.add_((scale * (b @ a)).to(target.dtype))
