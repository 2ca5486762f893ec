"""The processor: chat messages or prompt text plus images -> the model's input tensors.

Its outputs have transformers' names, meanings and shapes (input_ids, attention_mask, pixel_values, image_sizes).
Each `<image>` becomes exactly `num_image_tokens(config, (H, W))` placeholder tokens: the same function the model's
packing is built on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .checkpoint import read_json
from .config import LlavaConfig
from .geometry import num_image_tokens
from .image import ImageLimits, ImageProcessor, ImageProcessorConfig, check_image, decode_image, to_rgb
from .prompt import (
    IMAGE_TOKEN,
    ChatTemplate,
    PromptError,
    Tokenizer,
    count_placeholders,
    expand_placeholders,
    image_count_message,
    normalize_messages,
    resolve_chat_template,
)


def read_image_processor_config(directory: Path, cfg: LlavaConfig) -> ImageProcessorConfig:
    """preprocessor_config.json (transformers 4.x) or the image_processor inside processor_config.json (5.x)."""
    legacy = directory / "preprocessor_config.json"
    combined = directory / "processor_config.json"
    d, where = None, None
    if combined.exists():
        d, where = read_json(combined).get("image_processor"), combined
    if d is None and legacy.exists():
        d, where = read_json(legacy), legacy
    if d is not None and not isinstance(d, dict):
        raise PromptError(f"{where}: image_processor must be a JSON object, found {type(d).__name__}")
    try:
        if d is None:  # no image processor saved: the published recipes' settings at this model's tile size
            ipc = ImageProcessorConfig.for_model(cfg)
        else:
            ipc = ImageProcessorConfig.from_hf(d, anyres=cfg.is_anyres, pinpoints=cfg.image_grid_pinpoints)
        ipc.checked()
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise PromptError(f"{where}: image processor settings that cannot work ({e})") from None
    ipc.origin = str(where) if d is not None else (
        f"none in {directory}: the published LLaVA recipes' CLIP preprocessing at {ipc.tile_size} px")
    if cfg.is_anyres:
        # The model packs features by its own pinpoints; tiles cut by different ones would not line up.
        ipc.image_grid_pinpoints = list(cfg.image_grid_pinpoints)
    if ipc.tile_size != cfg.vision.image_size:
        raise PromptError(
            f"{directory}: the image processor makes {ipc.tile_size} px tiles but the vision tower takes "
            f"{cfg.vision.image_size} px; the preprocessor config does not belong to this model"
        )
    return ipc


def image_costs(sizes: list[tuple[int, int]], costs: list[int]) -> str:
    """What the images of a prompt cost, for a message: each one, or for many the total and the dearest."""
    if not sizes:
        return "no images"
    if len(sizes) <= 3:
        return ", ".join(f"{w}x{h} px: {c} tokens" for (h, w), c in zip(sizes, costs))
    (h, w), dearest = max(zip(sizes, costs), key=lambda pair: pair[1])
    return f"{len(sizes)} images: {sum(costs)} tokens in all, the dearest {w}x{h} px: {dearest}"


class Processor:
    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, chat_template: ChatTemplate,
                 config: LlavaConfig, image_limits: ImageLimits = ImageLimits()):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.config = config
        self.image_limits = image_limits
        if tokenizer.image_token_id is None:
            raise PromptError(f"the tokenizer has no {IMAGE_TOKEN} token")
        if tokenizer.image_token_id != config.image_token_id:
            raise PromptError(
                f"the tokenizer's {IMAGE_TOKEN} is id {tokenizer.image_token_id} but the model config says "
                f"image_token_index {config.image_token_id}; tokenizer and weights come from different checkpoints"
            )

    @classmethod
    def from_dir(cls, directory: Path, config: LlavaConfig, chat_template: str | None = None,
                 image_limits: ImageLimits = ImageLimits()) -> "Processor":
        tokenizer = Tokenizer.from_dir(directory)
        template = resolve_chat_template(tokenizer, config.text.model_type, directory, chat_template)
        image_processor = ImageProcessor(read_image_processor_config(directory, config), image_limits.max_pixels)
        return cls(tokenizer, image_processor, template, config, image_limits)

    def save(self, directory: Path) -> None:
        """Tokenizer, image processor and chat template in transformers 4.x's file layout (5.x reads it too)."""
        self.tokenizer.save(directory)
        processor_class = "LlavaNextProcessor" if self.config.is_anyres else "LlavaProcessor"
        image = {**self.image_processor.cfg.to_hf(), "processor_class": processor_class}
        (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
        (directory / "processor_config.json").write_text(json.dumps({
            "image_token": IMAGE_TOKEN,
            "num_additional_image_tokens": 1,  # the CLS token, which the "default" strategy drops
            "patch_size": self.config.vision.patch_size,
            "processor_class": processor_class,
            "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
        }, indent=2))
        (directory / "chat_template.json").write_text(
            json.dumps({"chat_template": self.chat_template.source}, indent=2, ensure_ascii=False))

    # -- text --------------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        plain, _ = normalize_messages(messages)
        return self.chat_template.render(plain, add_generation_prompt=add_generation_prompt, **kwargs).text

    def image_tokens(self, image_size: tuple[int, int]) -> int:
        """Placeholder tokens an image of (height, width) costs."""
        return num_image_tokens(self.config, image_size)

    # -- images ------------------------------------------------------------------------------------------------------

    def load_image(self, source: Any, label: str = "image") -> Image.Image:
        """A PIL image, a path or bytes -> an RGB PIL image, within the limits."""
        if isinstance(source, Image.Image):
            image = check_image(source, self.image_limits, label)
        elif isinstance(source, (str, Path, bytes)):
            if isinstance(source, str) and source.startswith(("http://", "https://")):
                raise PromptError(f"{label}: images are not fetched from URLs; download it and pass the file")
            image = decode_image(source, self.image_limits, name=label if not isinstance(source, (str, Path)) else None)
        else:
            raise PromptError(f"{label}: expected a PIL image, a file path or bytes, got {type(source).__name__}")
        return to_rgb(image)

    # -- the whole input ---------------------------------------------------------------------------------------------

    def __call__(self, text: str | Sequence[str], images: Sequence[Any] | None = None,
                 padding_side: str | None = None, add_special_tokens: bool | None = None) -> dict[str, torch.Tensor]:
        """Prompt text(s) with `<image>` placeholders and the images, in order across the texts -> model inputs.

        add_special_tokens: None adds the tokenizer's BOS unless the text already starts with it (a template that
        writes BOS itself would otherwise give two).
        """
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else []
        if not texts or not all(isinstance(t, str) for t in texts):
            raise PromptError("text must be a string or a non-empty list of strings")
        if images is not None and not isinstance(images, (list, tuple)):
            raise PromptError(f"images must be a list (one entry per <image>), not a {type(images).__name__}")
        images = [self.load_image(im, f"image {i}") for i, im in enumerate(images or [])]
        placeholders = [count_placeholders(t) for t in texts]
        if sum(placeholders) != len(images):
            raise PromptError(image_count_message(sum(placeholders), len(images)))
        sizes = [(im.height, im.width) for im in images]
        costs = [self.image_tokens(s) for s in sizes]
        ids, first = [], 0
        for t, n in zip(texts, placeholders):
            expanded = expand_placeholders(t, costs[first : first + n])
            add = (not self.tokenizer.starts_with_bos(t)) if add_special_tokens is None else add_special_tokens
            ids.append(self.tokenizer.encode(expanded, add_special_tokens=add))
            self._check_fits(ids[-1], sizes[first : first + n], costs[first : first + n])
            first += n
        out = self.pad(ids, padding_side or self.tokenizer.padding_side)
        if images:
            out.update(self.image_processor(images))
        return out

    def chat_inputs(self, messages: Sequence[dict[str, Any]], images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Chat messages from someone who may not choose tokens (a server's users) -> model inputs for one prompt.

        Only the template's image items become image placeholders; `<image>` or any other special-token text typed
        in a message is tokenized as text. For messages without such text the ids equal `__call__`'s.
        """
        plain, _ = normalize_messages(messages)
        text, literal = self.chat_template.render_marking_text(plain)
        images = [self.load_image(im, f"image {i}") for i, im in enumerate(images)]
        add = not self.tokenizer.starts_with_bos(text)
        ids = self.tokenizer.encode_literal_text(text, add, literal)
        image_id = self.config.image_token_id
        if ids.count(image_id) != len(images):
            raise PromptError(image_count_message(ids.count(image_id), len(images)))
        sizes = [(im.height, im.width) for im in images]
        costs = iter([self.image_tokens(s) for s in sizes])
        expanded: list[int] = []
        for token in ids:  # the same ids as expanding the text first: added tokens are split out before the rest
            expanded.extend([token] * next(costs) if token == image_id else [token])
        self._check_fits(expanded, sizes, [self.image_tokens(s) for s in sizes])
        out = self.pad([expanded])
        if images:
            out.update(self.image_processor(images))
        return out

    # Checkpoints of the original LLaVA code: its tokenizer_model_max_length, at which that code cuts a prompt
    # (images included) even at inference, dropping its end. We refuse such a prompt instead (original.py).
    truncation_limit: int | None = None

    def _check_fits(self, ids: list[int], sizes, costs) -> None:
        window = self.config.text.max_position_embeddings
        if not ids:
            raise PromptError("the prompt is empty (no tokens at all); give some text")
        per_image = image_costs(sizes, costs)
        if self.truncation_limit is not None and len(ids) > self.truncation_limit:
            raise PromptError(
                f"the prompt is {len(ids)} tokens with its images ({per_image}), over this checkpoint's "
                f"tokenizer_model_max_length of {self.truncation_limit}: the original LLaVA code would cut it there "
                "and lose its end; use fewer or smaller images or a shorter text"
            )
        if len(ids) >= window:  # an answer needs at least one free position
            raise PromptError(
                f"the prompt is {len(ids)} tokens with its images ({per_image}) but the model's context window is "
                f"{window} tokens; use fewer or smaller images or a shorter text"
            )

    def pad(self, ids: list[list[int]], padding_side: str = "left") -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise PromptError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        pad_id = self.pad_token_id
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(longest - len(row), longest) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    @property
    def pad_token_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.config.text.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return candidate
        return 0
