"""`llava-next convert`: a checkpoint of the original LLaVA code -> the llava-hf layout that transformers loads.

What changes is said, not hidden: the llava-hf format cannot express every behaviour of the original code
(llava_next.original), so a converted checkpoint behaves as transformers' LLaVA does where they differ.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from tokenizers import AddedToken

from .checkpoint import new_checkpoint_directory
from .errors import LlavaError, counted
from .outputs import output_directory
from .pipeline import load, write_checkpoint
from .processor import Processor
from .prompt import IMAGE_TOKEN, Tokenizer


class ConvertError(LlavaError, ValueError):
    """A checkpoint that cannot be written in the llava-hf layout."""


def convert(model: str | os.PathLike, out: str | os.PathLike, vision_tower: str | None = None,
            conv_template: str | None = None, dtype: str = "auto") -> tuple[Path, list[str]]:
    """Write `model` (original layout) to `out` in the llava-hf layout. Returns the directory and the list of
    behaviours of the original that the converted checkpoint does not keep."""
    pipe = load(model, dtype="float32" if dtype == "auto" else dtype, device="cpu", trainable=True, progress=False,
                vision_tower=vision_tower, conv_template=conv_template)
    layout, cfg = pipe.original, pipe.config
    if layout is None:
        raise ConvertError(f"{model} is already in the llava-hf layout; there is nothing to convert")
    if cfg.projector_depth != 2:
        raise ConvertError(f"the projector is {layout.projector_type} ({counted(cfg.projector_depth, 'layer')}); "
                           "transformers' LLaVA has a two-layer projector (mlp2x_gelu) only; load this checkpoint "
                           "as it is instead (llava-next generate --model ...)")
    if cfg.is_anyres and cfg.patch_merge != "spatial_unpad":
        raise ConvertError(f"mm_patch_merge_type {cfg.patch_merge!r}: transformers' LLaVA-NeXT packs anyres images "
                           "with spatial_unpad only")
    changes = [
        "prompts are tokenized whole with <image> as a special token (the original tokenizes the text around each "
        "<image> separately, each piece with sentencepiece's leading '▁'), so the ids next to an image differ",
    ]
    if cfg.is_anyres:
        changes.append("unpadding rounds int(round(x, 7)) instead of int(x): a few sizes (e.g. 47x1128) keep more "
                       "feature columns than the original")
    if cfg.text.rope_table_dtype:
        changes.append("rotary tables are float32 (the original's are float16 values): float32 logits move by ~1e-3")
    if cfg.is_anyres:
        changes.append("kept: pinpoints are written in (height, width) order, so a tie picks the original's canvas")

    # <image> becomes a real token, one past the vocabulary: one more embedding row (and lm_head row), the mean
    # of the others, which no image position reads and no answer picks.
    new = copy.deepcopy(cfg)
    image_id = cfg.text.vocab_size
    new.image_token_id, new.text.vocab_size = image_id, cfg.text.vocab_size + 1
    new.text.rope_table_dtype = None
    new.unpad_rounding = "round7"
    state = dict(pipe.model.checkpoint_weights())
    for name in ("language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state and not (name == "lm_head.weight" and cfg.tie_word_embeddings):
            w = state[name]
            state[name] = torch.cat([w, w.mean(0, keepdim=True)])
    saved_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(cfg.torch_dtype or "", torch.float32)
    state = {k: v.detach().to(saved_dtype) for k, v in state.items()}

    backend = type(pipe.processor.tokenizer.backend).from_str(pipe.processor.tokenizer.backend.to_str())
    if backend.get_vocab_size(with_added_tokens=True) != image_id:
        raise ConvertError(f"the tokenizer has {backend.get_vocab_size(with_added_tokens=True)} tokens but the "
                           f"model {image_id} embeddings; they do not belong together")
    backend.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tokenizer_config = {k: v for k, v in pipe.processor.tokenizer.config.items() if k != "added_tokens_decoder"}
    tokenizer = Tokenizer(backend, {**tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"})
    processor = Processor(tokenizer, pipe.processor.image_processor, pipe.processor.chat_template, new)

    directory = new_checkpoint_directory(out, pipe.directory)
    output_directory(directory)
    write_checkpoint(directory, new, processor, state, pipe.engine.eos_token_ids)
    return directory, changes
