"""Making a model to train: from scratch, from a CLIP and a language-model checkpoint, or from a LLaVA checkpoint.

All three return a Pipeline in float32 on the CPU; the trainer moves and wraps it.

From parts, as the published checkpoints were made: the tokenizer gets `<image>` (and `<pad>` when it has no pad
token), the embeddings grow to a multiple of 64 with the new rows set to the mean of the old ones, the projector
gets PyTorch's default Linear init and `image_newline` a normal draw scaled by 1/sqrt(width).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch import nn

from ..checkpoint import CheckpointError, iter_checkpoint_tensors, map_part_weight_name, resolve_checkpoint, weight_files
from ..config import DEFAULT_PINPOINTS, LlavaConfig, RopeConfig, TextConfig, VisionConfig, text_config_from_hf, \
    vision_config_from_hf
from ..engine import Engine
from ..image import ImageProcessor, ImageProcessorConfig
from ..model.llava import LlavaModel
from ..pipeline import Pipeline, eos_token_ids, load, read_generation_config
from ..processor import Processor
from ..prompt import IMAGE_TOKEN, ChatTemplate, Tokenizer, resolve_chat_template


@dataclass
class ScratchSizes:
    """A small LLaVA-NeXT built from random weights (the demo model is one)."""

    tile_size: int = 32
    patch_size: int = 8
    pinpoints: list[list[int]] = field(default_factory=lambda: [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]])
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate: int = 384
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 512
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0


def _pinpoints_for(tile: int) -> list[tuple[int, int]]:
    return [(h * tile // 336, w * tile // 336) for h, w in DEFAULT_PINPOINTS]


def _image_processor(cfg: LlavaConfig) -> ImageProcessor:
    return ImageProcessor(ImageProcessorConfig.for_model(cfg))


def _pipeline(model: LlavaModel, tokenizer: Tokenizer, template: ChatTemplate, eos: list[int]) -> Pipeline:
    processor = Processor(tokenizer, _image_processor(model.cfg), template, model.cfg)
    return Pipeline(model, processor, Engine(model, tokenizer, eos), Path("."))


def init_weights(model: LlavaModel, std: float = 0.02) -> None:
    """Random weights for training from scratch: normal(0, std) matrices and embeddings, zero biases; the norms
    keep their unit init."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    nn.init.normal_(model.vision_tower.embeddings.class_embedding, std=std)
    _init_newline(model)


def _init_newline(model: LlavaModel) -> None:
    if model.cfg.is_anyres:
        with torch.no_grad():
            model.image_newline.copy_(torch.randn(model.cfg.text.hidden_size) / math.sqrt(model.cfg.text.hidden_size))


def build_scratch(tokenizer_dir: str | Path, sizes: ScratchSizes, chat_template: str | None = None,
                  seed: int = 0) -> Pipeline:
    tokenizer = Tokenizer.from_dir(Path(tokenizer_dir))
    if tokenizer.image_token_id is None:
        raise CheckpointError(f"{tokenizer_dir}: the tokenizer has no {IMAGE_TOKEN} token")
    vocab = math.ceil(tokenizer.vocab_size / 64) * 64
    cfg = LlavaConfig(
        model_type="llava_next",
        vision=VisionConfig(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_intermediate,
                            num_layers=sizes.vision_layers, num_heads=sizes.vision_heads, image_size=sizes.tile_size,
                            patch_size=sizes.patch_size, projection_dim=sizes.vision_hidden),
        text=TextConfig(model_type="llama", vocab_size=vocab, hidden_size=sizes.text_hidden,
                        intermediate_size=sizes.text_intermediate, num_layers=sizes.text_layers,
                        num_heads=sizes.text_heads, num_kv_heads=sizes.text_kv_heads,
                        head_dim=sizes.text_hidden // sizes.text_heads, rms_norm_eps=1e-5,
                        max_position_embeddings=sizes.max_position_embeddings, rope=RopeConfig(theta=sizes.rope_theta),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=[tuple(p) for p in sizes.pinpoints],
        image_seq_length=(sizes.tile_size // sizes.patch_size) ** 2,
    )
    torch.manual_seed(seed)
    model = LlavaModel(cfg)
    init_weights(model)
    template = resolve_chat_template(tokenizer, "llama", override=chat_template)
    return _pipeline(model, tokenizer, template, [tokenizer.eos_token_id])


def _read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def build_from_parts(vision: str, language: str, chat_template: str | None = None, seed: int = 0,
                     feature_layer: int = -2) -> Pipeline:
    """A new LLaVA-NeXT from a CLIP checkpoint and a llama / mistral / qwen2 checkpoint (transformers layout)."""
    vision_dir, language_dir = resolve_checkpoint(vision), resolve_checkpoint(language)
    vd = _read_config(vision_dir)
    vision_cfg = vision_config_from_hf(vd.get("vision_config", vd) if vd.get("model_type") == "clip" else vd,
                                       f"{vision_dir}/config.json")
    ld = _read_config(language_dir)
    text_cfg = text_config_from_hf(ld, f"{language_dir}/config.json")
    tokenizer = Tokenizer.from_dir(language_dir)
    backend = tokenizer.backend
    new = [AddedToken(IMAGE_TOKEN, special=True, normalized=False)]
    if tokenizer.pad_token_id is None:
        new.append(AddedToken("<pad>", special=True, normalized=False))
    backend.add_special_tokens(new)
    tokenizer_config = dict(tokenizer.config)
    if tokenizer.pad_token_id is None:
        tokenizer_config["pad_token"] = "<pad>"
    tokenizer = Tokenizer(backend, tokenizer_config)
    old_vocab = text_cfg.vocab_size
    text_cfg.vocab_size = max(old_vocab, math.ceil(tokenizer.vocab_size / 64) * 64)
    text_cfg.pad_token_id = tokenizer.pad_token_id
    cfg = LlavaConfig(model_type="llava_next", vision=vision_cfg, text=text_cfg, image_token_id=tokenizer.image_token_id,
                      vision_feature_layer=feature_layer, image_grid_pinpoints=_pinpoints_for(vision_cfg.image_size),
                      image_seq_length=vision_cfg.patches_per_side**2,
                      tie_word_embeddings=text_cfg.tie_word_embeddings)
    torch.manual_seed(seed)
    model = LlavaModel(cfg)
    params = dict(model.named_parameters())
    loaded = set()
    for key, read in iter_checkpoint_tensors(weight_files(vision_dir)):
        target = map_part_weight_name(key, "vision")
        if target in params:
            _copy(params[target], read(), key)
            loaded.add(target)
    for key, read in iter_checkpoint_tensors(weight_files(language_dir)):
        target = map_part_weight_name(key, "language")
        if target is None:
            continue
        if target not in params:
            raise CheckpointError(f"{language_dir}: unexpected weight {key} for a {text_cfg.model_type} model")
        tensor = read()
        if tensor.shape[0] == old_vocab and params[target].shape[0] > old_vocab:
            tensor = _grow_rows(tensor, params[target].shape[0])
        _copy(params[target], tensor, key)
        loaded.add(target)
    missing = sorted(n for n in params if n.startswith(("vision_tower.", "language_model.")) and n not in loaded
                     and not n.startswith("vision_tower.post_layernorm"))
    if missing:
        raise CheckpointError(f"weights missing from the vision or language checkpoint: {', '.join(missing[:8])}")
    _init_newline(model)
    template = resolve_chat_template(tokenizer, text_cfg.model_type, override=chat_template)
    return _pipeline(model, tokenizer, template, eos_token_ids(read_generation_config(language_dir), cfg, tokenizer))


def _copy(target: torch.Tensor, tensor: torch.Tensor, key: str) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} but the model needs {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(tensor.to(target.dtype))


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """New vocabulary rows set to the mean of the existing ones (as the original LLaVA code did)."""
    mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def load_for_training(path: str) -> Pipeline:
    """Continue from an existing LLaVA checkpoint (published, or an earlier stage of ours), in float32 on the CPU."""
    return load(path, dtype=torch.float32, device="cpu", progress=False, trainable=True)
