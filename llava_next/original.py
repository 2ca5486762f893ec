"""Checkpoints in the layout of the original LLaVA and LLaVA-NeXT repositories, read directly.

liuhaotian/llava-v1.5-7b, llava-v1.6-vicuna-7b / -mistral-7b / -34b, the LLaVA-Llama-2 models, lmms-lab's
llama3-llava-next-8b and everything fine-tuned with that code keep their own layout: one flat config.json
(`model_type` llava / llava_llama / llava_mistral / llava_qwen with the text model's fields at the top and `mm_*`
fields), weights named `model.layers.*`, `model.mm_projector.{i}`, `model.image_newline` (often in legacy .bin
shards), a CLIP tower named by `mm_vision_tower` (its weights inside the checkpoint when it was trained), a
sentencepiece `tokenizer.model`, and prompts built by the code's conversation templates.

They were trained with that code, so they run with its behaviour where it differs from transformers' (llava-hf
checkpoints keep transformers' behaviour). Every difference is a parameter of the one implementation, not a copy:
  - pinpoints and image sizes are (width, height) there: read here into our (height, width) in the same order,
    so a full tie (both sides <= 336 px) goes to the same canvas as there (1 column, 2 rows);
  - unpadding takes int(x) of the scaled side (`LlavaConfig.unpad_rounding = "int"`);
  - `pad` (LLaVA 1.5): pad to a square of the CLIP mean colour (122, 116, 104) first;
  - `mm_use_im_start_end` wraps each image in `<im_start>` / `<im_end>`; the tokens the original builder adds
    (`<im_patch>`, `<im_start>`, `<im_end>`) are added in its order;
  - prompts are split at `<image>` and each piece tokenized on its own (its BOS dropped after the first);
  - the conversation template is picked by name as the original CLI does (llava_next.conversation).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import IGNORED_SUFFIXES, CheckpointError, read_json, resolve_checkpoint, weight_files
from .config import ConfigError, LlavaConfig, check_config, text_config_from_hf, vision_config_from_hf
from .conversation import (IMAGE_TEXT, IMAGE_TEXT_START_END, original_chat_template, stop_strings,
                           template_for_model_name)
from .errors import LlavaWarning

# model_type of the original code -> the decoder family it wraps
TEXT_FAMILIES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
ASPECT_RATIOS = ("square", "pad", "anyres")
PATCH_MERGES = ("flat", "spatial", "spatial_unpad")
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def is_original_layout(d: dict[str, Any]) -> bool:
    """A config.json written by the original code: flat, with the multimodal `mm_*` fields at the top."""
    return "text_config" not in d and any(k in d for k in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


@dataclass
class OriginalLayout:
    """What an original checkpoint's config asks for beyond LlavaConfig, and where its parts come from."""

    name: str  # the model name the original code decides by (template, tokenizer class)
    model_type: str
    vision_tower: str  # mm_vision_tower as written (a Hub id or a path), or the --vision-tower override
    tower_directory: Path
    tower_weights: str  # "checkpoint" (trained with the model, stored in it) or "mm_vision_tower"
    projector_type: str
    image_aspect_ratio: str
    patch_merge_type: str
    use_im_start_end: bool
    use_im_patch_token: bool
    conv_template: str
    tokenizer_class: str  # "LlamaTokenizer (slow)", "LlamaTokenizerFast", or what tokenizer.json is
    tokenizer_model_max_length: int | None
    padding_side: str
    added_tokens: list[str] = field(default_factory=list)
    rope_tables_float16: bool = False
    tower_given: bool = False  # by --vision-tower, not mm_vision_tower

    @property
    def image_text(self) -> str:
        return IMAGE_TEXT_START_END if self.use_im_start_end else IMAGE_TEXT

    def rules(self) -> dict[str, str]:
        """The behaviours in effect, for `llava-next info`."""
        tower_source = "given with --vision-tower" if self.tower_given else "named by mm_vision_tower"
        weights_source = "the checkpoint itself" if self.tower_weights == "checkpoint" else "there"
        rules = {
            "layout": f"original LLaVA ({self.model_type}), read as the original code runs it",
            "conversation template": self.conv_template,
            "tokenizer": f"{self.tokenizer_class}; the prompt split at <image>, each piece tokenized on its own",
            "vision tower": f"{self.vision_tower} ({tower_source}; its weights from {weights_source})",
            "projector": self.projector_type,
            "image aspect ratio": self.image_aspect_ratio,
        }
        if self.image_aspect_ratio == "pad":
            rules["pad"] = "to a square of the CLIP mean colour (122, 116, 104), then resize and crop"
        if self.image_aspect_ratio == "anyres":
            rules["pinpoints"] = "(width, height): a full tie (both sides <= 336 px) takes 1 column x 2 rows"
            rules["patch merge"] = self.patch_merge_type
            if self.patch_merge_type == "spatial_unpad":
                rules["unpad"] = "int(x) of the scaled side (transformers: int(round(x, 7)))"
        if self.use_im_start_end:
            rules["image tokens"] = "<im_start> <image> <im_end>"
        if self.rope_tables_float16:
            rules["rotary tables"] = "float16 values, as transformers 4.37 builds them under the original loader"
        return rules


def model_name(model: str) -> str:
    """The name the original code decides by: the last path part (or Hub repository name), or
    `<parent>_<checkpoint-N>` for a training checkpoint directory, as its get_model_name_from_path."""
    from .conversation import model_name_from_path

    return model_name_from_path(str(model).rstrip("/"))


def _pinpoints(raw: Any, tile: int, where: str) -> list[tuple[int, int]]:
    """The config's pinpoints ((width, height) pairs, or LLaVA-NeXT's range string "(1x1),...,(3x3)" in tiles)
    -> our (height, width) pairs, in the same order."""
    if isinstance(raw, str):
        pairs = re.findall(r"\((\d+)x(\d+)\)", raw)
        if len(pairs) < 2:
            raise ConfigError(f"{where}: image_grid_pinpoints {raw!r} is not a range like \"(1x1),...,(3x3)\"")
        (c0, r0), (c1, r1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
        return [(r * tile, c * tile) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)]
    if not isinstance(raw, list) or not raw or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in raw):
        raise ConfigError(f"{where}: image_grid_pinpoints must be a list of [width, height] pairs, got {raw!r}")
    return [(int(h), int(w)) for w, h in raw]


def _projector_depth(projector_type: Any, where: str) -> int:
    if projector_type == "linear":
        return 1
    match = re.fullmatch(r"mlp(\d+)x_gelu", str(projector_type))
    if match and int(match.group(1)) >= 1:
        return int(match.group(1))
    raise ConfigError(f"{where}: mm_projector_type {projector_type!r} is not supported (supported: linear, "
                      "mlpNx_gelu such as mlp2x_gelu)")


def find_tower(spec: str, directory: Path, given: bool = False) -> Path:
    """mm_vision_tower, or the tower `given` instead -> the CLIP checkpoint's directory: a path (as given, or
    relative to the checkpoint, where a copied checkpoint often keeps it), else a Hub id."""
    for candidate in (Path(spec).expanduser(), directory / spec):
        if (candidate / "config.json").exists():
            return candidate
    try:
        return resolve_checkpoint(spec)
    except CheckpointError as e:
        if given:
            raise CheckpointError(f"the vision tower {spec!r} given with --vision-tower (vision_tower=...) could not "
                                  f"be found ({e}); give a CLIP checkpoint's directory or Hub id") from None
        raise CheckpointError(f"the vision tower {spec!r} that mm_vision_tower names could not be found ({e}); pass "
                              "its directory with --vision-tower (vision_tower=...)") from None


def read_layout(directory: Path, d: dict[str, Any], model: str, vision_tower: str | None = None,
                conv_template: str | None = None) -> tuple[LlavaConfig, OriginalLayout]:
    """config.json of an original checkpoint -> our LlavaConfig (image_token_id still to be set from the
    tokenizer) and the layout. `model` is what the user named (a Hub id or a path): the original decides by it."""
    where = str(directory / "config.json")
    model_type = d.get("model_type")
    if model_type not in TEXT_FAMILIES:
        raise ConfigError(f"{where}: model_type {model_type!r} of an original LLaVA checkpoint is not supported "
                          f"(supported: {', '.join(TEXT_FAMILIES)})")
    tower_spec = vision_tower or d.get("mm_vision_tower") or d.get("vision_tower")
    if not tower_spec:
        raise ConfigError(f"{where}: mm_vision_tower is missing; pass the CLIP tower with --vision-tower")
    tower_dir = find_tower(str(tower_spec), directory, given=vision_tower is not None)
    tower_raw = read_json(tower_dir / "config.json")
    vision = vision_config_from_hf(tower_raw.get("vision_config", tower_raw), f"{tower_dir / 'config.json'}")
    text = text_config_from_hf({**d, "model_type": TEXT_FAMILIES[model_type]}, where)
    if not (directory / "tokenizer.json").exists():
        # the original LLaVA repository's checkpoints (sentencepiece tokenizers) run on transformers 4.37, whose
        # rotary tables are float16 there (TextConfig.rope_table_dtype); LLaVA-NeXT's (tokenizer.json: Llama-3,
        # Qwen) run on a later transformers that computes them in float32
        text.rope_table_dtype = "float16"

    aspect = d.get("image_aspect_ratio", "square")
    if aspect not in ASPECT_RATIOS:
        raise ConfigError(f"{where}: image_aspect_ratio {aspect!r} is not supported (supported: "
                          f"{', '.join(ASPECT_RATIOS)}; LLaVA-NeXT's anyres_max_N is not yet)")
    merge = d.get("mm_patch_merge_type", "flat")
    if merge not in PATCH_MERGES:
        raise ConfigError(f"{where}: mm_patch_merge_type {merge!r} is not supported (supported: {', '.join(PATCH_MERGES)})")
    select = d.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"{where}: mm_vision_select_feature {select!r} must be 'patch' or 'cls_patch'")
    layer = d.get("mm_vision_select_layer", -2)
    if not isinstance(layer, int) or not -(vision.num_layers + 1) <= layer <= vision.num_layers:
        raise ConfigError(f"{where}: mm_vision_select_layer {layer!r} is outside a {vision.num_layers}-layer tower")
    if d.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise ConfigError(f"{where}: mm_hidden_size {d.get('mm_hidden_size')} is not the width of the vision tower "
                          f"{tower_spec} ({vision.hidden_size}); the tower is not the one this model was trained with")
    anyres = aspect == "anyres"
    if anyres and select == "cls_patch" and merge != "flat":
        # the original's spatial packing views each tile as a side x side grid and asserts the base tile has that
        # many rows: CLS makes one more, so every image fails there (AssertionError)
        raise ConfigError(f"{where}: mm_vision_select_feature 'cls_patch' cannot be packed with mm_patch_merge_type "
                          f"{merge!r} (the original code fails on every image); only 'flat' takes it")
    pinpoints = None
    if anyres:
        if d.get("image_grid_pinpoints") is None:
            raise ConfigError(f"{where}: image_aspect_ratio 'anyres' needs image_grid_pinpoints")
        pinpoints = _pinpoints(d["image_grid_pinpoints"], vision.image_size, where)
    cfg = LlavaConfig(
        model_type="llava_next" if anyres else "llava",
        vision=vision,
        text=text,
        image_token_id=-1,  # set from the tokenizer (an id past its vocabulary)
        vision_feature_layer=layer,
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
        projector_bias=True,
        image_grid_pinpoints=pinpoints,
        tie_word_embeddings=text.tie_word_embeddings,
        torch_dtype=d.get("torch_dtype"),
        projector_depth=_projector_depth(d.get("mm_projector_type", "linear"), where),
        patch_merge=merge if anyres else "spatial_unpad",
        unpad_rounding="int",
    )
    check_config(cfg, where)
    name = model_name(model)
    use_patch_token = bool(d.get("mm_use_im_patch_token", True))  # missing counts as true in the original builder
    use_start_end = bool(d.get("mm_use_im_start_end", False))
    added = (["<im_patch>"] if use_patch_token else []) + (["<im_start>", "<im_end>"] if use_start_end else [])
    has_json = (directory / "tokenizer.json").exists()
    fast = has_json or "mistral" in name.lower()
    tower_inside = bool(d.get("unfreeze_mm_vision_tower", False)) and _has_tower_weights(directory)
    layout = OriginalLayout(
        name=name, model_type=model_type, vision_tower=str(tower_spec), tower_given=vision_tower is not None,
        tower_directory=tower_dir,
        tower_weights="checkpoint" if tower_inside else "mm_vision_tower",
        projector_type=str(d.get("mm_projector_type", "linear")), image_aspect_ratio=aspect,
        patch_merge_type=merge, use_im_start_end=use_start_end, use_im_patch_token=use_patch_token,
        conv_template=conv_template or template_for_model_name(name),
        tokenizer_class=("tokenizer.json" if has_json else "LlamaTokenizerFast" if fast else "LlamaTokenizer (slow)"),
        tokenizer_model_max_length=d.get("tokenizer_model_max_length"),
        padding_side=d.get("tokenizer_padding_side", "right"), added_tokens=added,
        rope_tables_float16=text.rope_table_dtype == "float16",
    )
    original_chat_template(layout.conv_template)  # an unknown --conv-template name fails here, listing the known
    if conv_template is None and layout.conv_template == "llava_v0" and (
            layout.projector_type != "linear" or model_type == "llava_mistral"):
        # the original code's choice, from the name: for a folder renamed on download (./ckpt), a template the
        # checkpoint was not trained with, and answers that differ without an error
        likely = {"llava_mistral": "mistral_instruct", "llava_qwen": "qwen_1_5"}.get(
            model_type, "its template, e.g. llava_v1 for a vicuna model")
        warnings.warn(f"{directory}: no conversation template matches its name {name!r}, so it is llava_v0, as the "
                      f"original code chooses; this {model_type} checkpoint's {layout.projector_type} projector is "
                      "LLaVA-1.5's or later's. If the folder was renamed, give it the model's name (which also "
                      f"chooses the tokenizer), or pass --conv-template {likely} (conv_template= in Python)",
                      LlavaWarning, stacklevel=2)
    return cfg, layout


def _has_tower_weights(directory: Path) -> bool:
    """Whether the checkpoint stores a tower: from its shard index when it has one (the weights are read once, at
    load), else from the single file's header (safetensors) or its memory-mapped pickle."""
    from .checkpoint import stored_tensors

    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).exists():
            return any(name.startswith(TOWER_PREFIX) for name in read_json(directory / index).get("weight_map", {}))
    return any(t.name.startswith(TOWER_PREFIX) for t in stored_tensors(weight_files(directory)))


def weight_sources(cfg: LlavaConfig, layout: OriginalLayout) -> dict[str, Any]:
    """How load_weights reads an original checkpoint: its names mapped to ours (`rename`), and the separate CLIP
    checkpoint's tower weights (`more`) unless the tower is inside."""
    inside = layout.tower_weights == "checkpoint"
    newline = cfg.is_anyres and cfg.patch_merge == "spatial_unpad"
    return dict(rename=lambda name: original_weight_name(name, inside, newline),
                more=() if inside else ((weight_files(layout.tower_directory), clip_tower_weight_name),))


def original_weight_name(name: str, tower_inside: bool, uses_newline: bool = True) -> str | None:
    """An original checkpoint's weight name -> ours, or None for what is not read (the tower's copy when the
    original code would not use it, buffers derived from the config, and the image newline where images are not
    packed with it: the original builds one for any `*unpad` merge type, but `pad` and `square` images are
    packed flat whatever that says)."""
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if name.startswith("model.vision_tower."):
        return "vision_tower." + name[len(TOWER_PREFIX):] if tower_inside and name.startswith(TOWER_PREFIX) else None
    if name.startswith("model.mm_projector."):
        rest = name[len("model.mm_projector."):]
        if rest in ("weight", "bias"):  # "linear": one nn.Linear
            return f"multi_modal_projector.linear_1.{rest}"
        index, _, param = rest.partition(".")  # nn.Sequential(Linear, GELU, Linear, ...): linears at 0, 2, 4, ...
        return f"multi_modal_projector.linear_{int(index) // 2 + 1}.{param}" if index.isdigit() else name
    if name == "model.image_newline":
        return "image_newline" if uses_newline else None
    if name.startswith("model."):
        return "language_model." + name[len("model."):]
    return name  # lm_head.*; anything else is reported as unexpected


def clip_tower_weight_name(name: str) -> str | None:
    """A CLIP checkpoint's weight name (CLIPModel or CLIPVisionModel) -> ours; its text half is not read."""
    if name.startswith("vision_model.") and not name.endswith(IGNORED_SUFFIXES):
        return "vision_tower." + name[len("vision_model."):]
    return None


def original_tokenizer(directory: Path, layout: OriginalLayout):
    """The tokenizer the original builder makes: tokenizer.json when the checkpoint has one, else the
    sentencepiece model as transformers' slow LlamaTokenizer (or the fast one for "mistral" names), with the
    builder's added tokens; prompts are tokenized piece by piece around each <image>."""
    from .prompt import Tokenizer

    if (directory / "tokenizer.json").exists():  # LLaVA-NeXT's Llama-3 and Qwen checkpoints
        from tokenizers import AddedToken

        tokenizer = Tokenizer.from_dir(directory)
        for token in layout.added_tokens:
            tokenizer.backend.add_special_tokens([AddedToken(token, normalized=False, special=True)])
        tokenizer.splits_images = True
        tokenizer.image_token_id = tokenizer.vocab_size
        return tokenizer
    flavour = "fast" if layout.tokenizer_class == "LlamaTokenizerFast" else "slow"
    return Tokenizer.from_sentencepiece(directory, flavour=flavour, added_tokens=layout.added_tokens)


def original_processor(directory: Path, cfg: LlavaConfig, layout: OriginalLayout, limits, chat_template: str | None = None):
    """Tokenizer, image preprocessing (the tower's CLIP settings with the checkpoint's aspect rule) and the
    conversation template of an original checkpoint. Sets cfg.image_token_id to the tokenizer's image marker."""
    from .image import ImageProcessor
    from .processor import Processor, read_image_processor_config
    from .prompt import ChatTemplate, resolve_chat_template

    tokenizer = original_tokenizer(directory, layout)
    cfg.image_token_id = tokenizer.image_token_id
    ipc = read_image_processor_config(layout.tower_directory, cfg)
    ipc.pad_to_square = layout.image_aspect_ratio == "pad"
    if chat_template is not None:  # a caller's own template wins, as for any checkpoint
        template = resolve_chat_template(tokenizer, cfg.text.model_type, directory, chat_template)
    else:
        template = ChatTemplate(original_chat_template(layout.conv_template, layout.image_text),
                                f"the original conversation template {layout.conv_template!r}", tokenizer.special_tokens)
    processor = Processor(tokenizer, ImageProcessor(ipc, limits.max_pixels), template, cfg, limits)
    processor.truncation_limit = layout.tokenizer_model_max_length
    return processor


def end_of_turn_ids(layout: OriginalLayout, tokenizer) -> list[int]:
    """The ids of the template's end-of-turn marker where the tokenizer has it as one special token
    (`<|im_end|>` for chatml_direct, `<|eot_id|>` for llava_llama_3, `</s>` for llava_v1): the original's chat
    front ends stop there, and a model trained on the template ends its answer with it rather than with EOS."""
    special = {t.content: i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
    return [special[s] for s in stop_strings(layout.conv_template) if s in special]
