"""Typed configs for the vision tower, the text decoder and the whole LLaVA model.

Checkpoints on the Hub describe themselves with transformers' `config.json`. Those files leave out every value that
equals the class default of their `model_type` (a llava-1.5 config says nothing about hidden size, say), so reading
one needs each model_type's defaults: they live here, once, in `HF_TEXT_DEFAULTS` and `HF_VISION_DEFAULTS`.
`to_hf_dict` writes the same format back, complete, so that transformers and this package read saved models alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import LlavaError


class ConfigError(LlavaError, ValueError):
    """A checkpoint's config asks for something this package does not support or does not understand."""


# The default grid of LLaVA-NeXT, as (height, width) pairs.
DEFAULT_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass
class VisionConfig:
    """A CLIP vision transformer."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336  # side of one square tile, in pixels
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768  # unused by LLaVA; kept so a saved config round-trips

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # "default", "linear" or "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass
class TextConfig:
    """A decoder-only transformer: llama (vicuna, Yi, Llama-3), mistral and qwen2 differ only in these fields."""

    model_type: str = "llama"  # what config.json calls it; the decoder itself never looks at this
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False  # qwen2 has biases on q, k, v
    o_bias: bool = False  # llama's attention_bias puts one on o_proj too
    mlp_bias: bool = False
    sliding_window: int | None = None  # attend to at most this many most recent positions
    sliding_window_start_layer: int = 0  # layers before this one attend to everything (qwen2's max_window_layers)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # The original LLaVA code (transformers 4.37) builds its rotary cos/sin tables while its loader forces float16,
    # so they hold float16 values in every run of it, float32 ones included: "float16" rounds ours the same way.
    rope_table_dtype: str | None = None

    def layer_window(self, layer: int) -> int | None:
        if self.sliding_window is None or layer < self.sliding_window_start_layer:
            return None
        return self.sliding_window


@dataclass
class LlavaConfig:
    """The whole model: vision tower, projector, optional anyres packing, decoder."""

    model_type: str = "llava_next"  # "llava" (1.5: one tile per image) or "llava_next" (anyres)
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 32000
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # (height, width); llava_next only
    image_seq_length: int = 576
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None  # the dtype the weights were saved in, when the config says
    # What the original LLaVA repositories can ask for beyond llava-hf's format (llava_next.original reads them):
    projector_depth: int = 2  # linear layers in the projector: 1 ("linear"), N ("mlpNx_gelu")
    patch_merge: str = "spatial_unpad"  # anyres packing: "spatial_unpad", "spatial" (no unpad, no newlines), "flat"
    unpad_rounding: str = "round7"  # unpadding's scaled side: int(round(x, 7)) (transformers) or int(x) ("int")

    @property
    def is_anyres(self) -> bool:
        return self.model_type == "llava_next"

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return list(layers) if isinstance(layers, (list, tuple)) else [layers]

    @property
    def base_tokens_per_tile(self) -> int:
        """Features one tile gives after the select strategy: 576 for 336 px tiles, patch 14, CLS dropped."""
        n = self.vision.patches_per_side**2
        return n + 1 if self.vision_feature_select_strategy == "full" else n


# ---------------------------------------------------------------------------------------------------------------------
# Reading transformers' config.json


# Every field that changes computation, at the value transformers' config class uses when config.json omits it.
HF_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False, sliding_window=None,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "mistral": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        sliding_window=4096, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    ),
    "qwen2": dict(
        vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=None, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=10000.0, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
        max_window_layers=28, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    ),
}

HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

# What LlavaConfig / LlavaNextConfig use when the top level omits a value. Note the vision config that these classes
# build when `vision_config` is absent altogether is CLIP ViT-L/14-336, not CLIPVisionConfig's own defaults.
HF_LLAVA_DEFAULTS: dict[str, Any] = dict(
    image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
    vision_feature_layer=-2, multimodal_projector_bias=True, tie_word_embeddings=False, image_seq_length=576,
)
HF_LLAVA_DEFAULT_VISION: dict[str, Any] = dict(
    model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336,
    num_hidden_layers=24, num_attention_heads=16, vocab_size=32000, projection_dim=768,
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = {"text": ("silu",), "vision": ("quick_gelu", "gelu"), "projector": ("gelu",)}


def _rope_from_hf(d: dict[str, Any], where: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` and `rope_scaling`.
    params = d.get("rope_parameters")
    if params is None:
        params = dict(d.get("rope_scaling") or {})
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}). "
            "Running it as plain rope would give wrong output, so the checkpoint cannot be loaded."
        )
    return RopeConfig(
        theta=float(params.get("rope_theta", 10000.0)),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def text_config_from_hf(d: dict[str, Any], where: str = "text_config") -> TextConfig:
    model_type = d.get("model_type", "llama")
    if model_type not in HF_TEXT_DEFAULTS:
        raise ConfigError(
            f"{where}: text model_type {model_type!r} is not supported "
            f"(supported: {', '.join(HF_TEXT_DEFAULTS)}; Yi and Llama-3 checkpoints use 'llama')."
        )
    v = {**HF_TEXT_DEFAULTS[model_type], **{k: val for k, val in d.items() if val is not None or k == "sliding_window"}}
    if v.get("hidden_act") not in SUPPORTED_ACTIVATIONS["text"]:
        raise ConfigError(f"{where}: hidden_act {v.get('hidden_act')!r} is not supported (supported: silu)")
    heads = int(v["num_attention_heads"])
    kv_heads = v["num_key_value_heads"] if v.get("num_key_value_heads") is not None else heads
    head_dim = v["head_dim"] if v.get("head_dim") is not None else int(v["hidden_size"]) // heads
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
        window = v.get("sliding_window") if v.get("use_sliding_window") else None
        window_start = int(v.get("max_window_layers", 28))
        layer_types = v.get("layer_types")
        if window is not None and layer_types is not None:
            sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
            if sliding != list(range(sliding[0] if sliding else len(layer_types), len(layer_types))):
                raise ConfigError(f"{where}: layer_types with sliding layers that are not a final run is not supported")
            window_start = sliding[0] if sliding else len(layer_types)
    else:
        qkv_bias = o_bias = bool(v.get("attention_bias", False))
        mlp_bias = bool(v.get("mlp_bias", False))
        window = v.get("sliding_window") if model_type == "mistral" else None
        window_start = 0
    return TextConfig(
        model_type=model_type,
        vocab_size=int(v["vocab_size"]),
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_act=v["hidden_act"],
        rms_norm_eps=float(v["rms_norm_eps"]),
        max_position_embeddings=int(v["max_position_embeddings"]),
        rope=_rope_from_hf(v, where),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        sliding_window=int(window) if window is not None else None,
        sliding_window_start_layer=window_start,
        tie_word_embeddings=bool(v.get("tie_word_embeddings", False)),
        bos_token_id=v.get("bos_token_id"),
        eos_token_id=v.get("eos_token_id"),
        pad_token_id=v.get("pad_token_id"),
    )


def vision_config_from_hf(d: dict[str, Any], where: str = "vision_config") -> VisionConfig:
    model_type = d.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ConfigError(f"{where}: vision model_type {model_type!r} is not supported (supported: clip_vision_model)")
    v = {**HF_VISION_DEFAULTS, **{k: val for k, val in d.items() if val is not None}}
    if v["hidden_act"] not in SUPPORTED_ACTIVATIONS["vision"]:
        raise ConfigError(f"{where}: hidden_act {v['hidden_act']!r} is not supported (supported: quick_gelu, gelu)")
    for key in ("image_size", "patch_size"):
        if not isinstance(v[key], int):
            raise ConfigError(f"{where}: {key} must be one integer (square tiles), got {v[key]!r}")
    return VisionConfig(
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        num_channels=int(v["num_channels"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        hidden_act=v["hidden_act"],
        projection_dim=int(v["projection_dim"]),
    )


def llava_config_from_hf(d: dict[str, Any], where: str = "config.json") -> LlavaConfig:
    """A checkpoint's config.json -> LlavaConfig, every value checked: a value of the wrong type or out of range
    is a ConfigError naming it, never an error deep inside the model or a model that silently computes nonsense."""
    try:
        cfg = _llava_config_from_hf(d, where)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: a value has the wrong type or form ({type(e).__name__}: {e})") from None
    check_config(cfg, where)
    return cfg


def check_config(cfg: LlavaConfig, where: str) -> None:
    """Sizes positive and consistent, rope parameters positive, pinpoints whole tiles."""
    parts = (("text_config", cfg.text, ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                                        "num_kv_heads", "head_dim", "max_position_embeddings")),
             ("vision_config", cfg.vision, ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                                            "patch_size", "image_size")))
    for part, values, names in parts:
        for name in names:
            value = getattr(values, name)
            if value < 1:
                raise ConfigError(f"{where}: {part}: {name} must be a positive integer, got {value}")
    t, v = cfg.text, cfg.vision
    if t.num_heads % t.num_kv_heads:
        raise ConfigError(f"{where}: text_config: {t.num_heads} attention heads cannot share {t.num_kv_heads} kv heads")
    if v.hidden_size % v.num_heads or v.image_size % v.patch_size:
        raise ConfigError(f"{where}: vision_config: hidden_size {v.hidden_size} / {v.num_heads} heads or image_size "
                          f"{v.image_size} / patch_size {v.patch_size} does not divide")
    if not (t.rope.theta > 0 and t.rope.factor > 0 and math.isfinite(t.rope.theta)):
        raise ConfigError(f"{where}: text_config: rope theta {t.rope.theta} and factor {t.rope.factor} must be > 0")
    if not t.rms_norm_eps >= 0:
        raise ConfigError(f"{where}: text_config: rms_norm_eps must be >= 0, got {t.rms_norm_eps}")
    for h, w in cfg.image_grid_pinpoints or []:
        if h < v.image_size or w < v.image_size or h % v.image_size or w % v.image_size:
            raise ConfigError(f"{where}: image_grid_pinpoints ({h}, {w}) is not a whole number of "
                              f"{v.image_size} px tiles")


def _llava_config_from_hf(d: dict[str, Any], where: str) -> LlavaConfig:
    model_type = d.get("model_type")
    if model_type not in ("llava", "llava_next"):
        raise ConfigError(
            f"{where}: model_type {model_type!r} is not a LLaVA checkpoint this package supports "
            "(supported: 'llava' for LLaVA 1.5, 'llava_next' for LLaVA-NeXT / 1.6)."
        )
    v = {**HF_LLAVA_DEFAULTS, **{k: val for k, val in d.items() if val is not None}}
    text = text_config_from_hf(d.get("text_config") or {"model_type": "llama"}, f"{where}: text_config")
    vision = vision_config_from_hf(d.get("vision_config") or HF_LLAVA_DEFAULT_VISION, f"{where}: vision_config")
    if v["projector_hidden_act"] not in SUPPORTED_ACTIVATIONS["projector"]:
        raise ConfigError(f"{where}: projector_hidden_act {v['projector_hidden_act']!r} is not supported (gelu)")
    strategy = v["vision_feature_select_strategy"]
    if strategy not in ("default", "full"):
        raise ConfigError(f"{where}: vision_feature_select_strategy {strategy!r} must be 'default' or 'full'")
    layers = v["vision_feature_layer"]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (layers if isinstance(layers, list) else [layers])):
        raise ConfigError(f"{where}: vision_feature_layer must be a layer index or a list of them, got {layers!r}")
    for layer in layers if isinstance(layers, list) else [layers]:
        if not -(vision.num_layers + 1) <= int(layer) <= vision.num_layers:
            raise ConfigError(f"{where}: vision_feature_layer {layer} is outside a {vision.num_layers}-layer tower")
    pinpoints = None
    if model_type == "llava_next":
        raw = d.get("image_grid_pinpoints") or [list(p) for p in DEFAULT_PINPOINTS]
        if not isinstance(raw, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and
                                                all(isinstance(x, int) for x in p) for p in raw):
            raise ConfigError(f"{where}: image_grid_pinpoints must be a list of [height, width] pairs, got {raw!r}")
        pinpoints = [(int(h), int(w)) for h, w in raw]
        if strategy == "full":
            raise ConfigError(f"{where}: LLaVA-NeXT packing needs vision_feature_select_strategy 'default'")
    # Older configs put vocab_size at the top level too; the text config's is the one the weights have.
    text_dtype = (d.get("text_config") or {}).get("torch_dtype")
    return LlavaConfig(
        model_type=model_type,
        vision=vision,
        text=text,
        image_token_id=int(d.get("image_token_id", v["image_token_index"])),
        vision_feature_layer=[int(x) for x in layers] if isinstance(layers, list) else int(layers),
        vision_feature_select_strategy=strategy,
        projector_hidden_act=v["projector_hidden_act"],
        projector_bias=bool(v["multimodal_projector_bias"]),
        image_grid_pinpoints=pinpoints,
        image_seq_length=int(v["image_seq_length"]),
        tie_word_embeddings=bool(v["tie_word_embeddings"]) or text.tie_word_embeddings,
        torch_dtype=d.get("torch_dtype") or d.get("dtype") or text_dtype,
    )


def read_config(path: str | Path) -> LlavaConfig:
    from .checkpoint import read_json

    path = Path(path)
    return llava_config_from_hf(read_json(path), where=str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Writing it back


def to_hf_dict(cfg: LlavaConfig) -> dict[str, Any]:
    """A complete config.json in transformers' format: readable by transformers 4.x and 5.x and by `read_config`."""
    t, vis = cfg.text, cfg.vision
    rope: dict[str, Any] = {"rope_type": t.rope.type}
    if t.rope.type == "linear":
        rope["factor"] = t.rope.factor
    elif t.rope.type == "llama3":
        rope.update(
            factor=t.rope.factor, low_freq_factor=t.rope.low_freq_factor, high_freq_factor=t.rope.high_freq_factor,
            original_max_position_embeddings=t.rope.original_max_position_embeddings,
        )
    text: dict[str, Any] = dict(
        model_type=t.model_type, vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim, hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope.theta,
        rope_scaling=None if t.rope.type == "default" else {**rope, "type": t.rope.type},
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
        pad_token_id=t.pad_token_id,
    )
    if t.model_type == "qwen2":
        text.update(use_sliding_window=t.sliding_window is not None, sliding_window=t.sliding_window,
                    max_window_layers=t.sliding_window_start_layer)
    else:
        text.update(attention_bias=t.qkv_bias, mlp_bias=t.mlp_bias)
        if t.model_type == "mistral":
            text["sliding_window"] = t.sliding_window
    out: dict[str, Any] = dict(
        architectures=["LlavaNextForConditionalGeneration" if cfg.is_anyres else "LlavaForConditionalGeneration"],
        model_type=cfg.model_type,
        image_token_index=cfg.image_token_id,
        projector_hidden_act=cfg.projector_hidden_act,
        multimodal_projector_bias=cfg.projector_bias,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        image_seq_length=cfg.image_seq_length,
        tie_word_embeddings=cfg.tie_word_embeddings,
        text_config=text,
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=vis.hidden_size, intermediate_size=vis.intermediate_size,
            num_hidden_layers=vis.num_layers, num_attention_heads=vis.num_heads, image_size=vis.image_size,
            patch_size=vis.patch_size, num_channels=vis.num_channels, layer_norm_eps=vis.layer_norm_eps,
            hidden_act=vis.hidden_act, projection_dim=vis.projection_dim,
        ),
    )
    if cfg.image_grid_pinpoints is not None:
        out["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cfg.torch_dtype:
        out["torch_dtype"] = cfg.torch_dtype
    return out


def as_dict(cfg: LlavaConfig) -> dict[str, Any]:
    return asdict(cfg)
