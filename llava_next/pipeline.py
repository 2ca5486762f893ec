"""`load()` and the Pipeline it returns: a checkpoint's model, processor and generation engine together."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .adapter import is_adapter, merge_adapter, read_adapter_config
from .checkpoint import CheckpointError, load_weights, resolve_checkpoint, save_weights, weight_files
from .config import LlavaConfig, read_config, to_hf_dict
from .engine import Engine, Generation, SamplingParams, TextStream
from .image import DEFAULT_MAX_PIXELS, ImageLimits
from .model.llava import LlavaModel
from .processor import Processor
from .prompt import PromptError, normalize_messages

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA GPU here; use device='cpu'")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: LlavaConfig) -> torch.dtype:
    """float32 on CPU (fast and exact there); on a GPU the dtype the checkpoint was saved in, else bfloat16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    saved = DTYPES.get(str(cfg.torch_dtype or "").replace("torch.", ""))
    return saved if saved in (torch.bfloat16, torch.float16) else torch.bfloat16


def eos_token_ids(directory: Path, cfg: LlavaConfig, tokenizer) -> list[int]:
    """The ids that end generation: generation_config.json's when it names any, else the config's, else the
    tokenizer's EOS."""
    path = directory / "generation_config.json"
    candidates: Any = None
    if path.exists():
        candidates = json.loads(path.read_text()).get("eos_token_id")
    if candidates is None:
        candidates = cfg.text.eos_token_id
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    return [int(c) for c in (candidates if isinstance(candidates, list) else [candidates])]


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return SamplingParams(**options)


def build_model(cfg: LlavaConfig, files: list[Path], dtype: torch.dtype, device: torch.device, progress: bool) -> LlavaModel:
    # Built on the meta device and filled from the files: no time spent on random init, no second copy in memory.
    with torch.device("meta"):
        model = LlavaModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.language_model.reset_rope()
    load_weights(model, files, dtype, device, progress=progress)
    return model.eval()


def load(
    model: str | os.PathLike = "demo",
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> "Pipeline":
    """Load a LLaVA 1.5 / LLaVA-NeXT checkpoint: a local directory, a Hub id, or "demo" (the bundled demo model).

    A directory holding a LoRA adapter (adapter_config.json, as `llava-next train` writes with lora.merge: false)
    loads its base model and merges the adapter into it.
    """
    adapter = Path(model).expanduser() if str(model) != "demo" else None
    adapter_config = read_adapter_config(adapter) if adapter is not None and is_adapter(adapter) else None
    if adapter_config is not None:
        model = adapter_config["base_model_name_or_path"]
    directory = resolve_checkpoint(model, revision)
    cfg = read_config(directory / "config.json")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, cfg)
    processor = Processor.from_dir(directory, cfg, chat_template, ImageLimits(max_pixels=max_image_pixels))
    if processor.tokenizer.vocab_size > cfg.text.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {processor.tokenizer.vocab_size} tokens but the model only "
            f"{cfg.text.vocab_size} embeddings"
        )
    llava = build_model(cfg, weight_files(directory), dtype, device, progress)
    if adapter_config is not None:
        merge_adapter(llava, adapter, adapter_config)
    return Pipeline(llava, processor, Engine(llava, processor.tokenizer, eos_token_ids(directory, cfg, processor.tokenizer)),
                    directory)


@dataclass
class Pipeline:
    model: LlavaModel
    processor: Processor
    engine: Engine
    directory: Path

    @property
    def config(self) -> LlavaConfig:
        return self.model.cfg

    # -- inputs ------------------------------------------------------------------------------------------------------

    def prompt_text(self, prompt_or_messages: str | Sequence[dict], images: Sequence[Any] | None) -> tuple[str, list]:
        """One prompt (raw text with <image> placeholders, or chat messages) -> (prompt text, its images)."""
        images = list(images or [])
        if isinstance(prompt_or_messages, str):
            return prompt_or_messages, images
        plain, slots = normalize_messages(prompt_or_messages)
        separate = iter(images)
        filled = []
        for slot in slots:
            if slot is None:
                slot = next(separate, None)
                if slot is None:
                    raise PromptError(f"the messages have {len(slots)} image items but fewer images were given")
            filled.append(slot)
        left = sum(1 for _ in separate)
        if left:
            raise PromptError(f"the messages have {len(slots)} image items but {left} more image(s) were given; "
                              "add an {'type': 'image'} item for each")
        return self.processor.chat_template.render(plain, add_generation_prompt=True).text, filled

    def prepare(self, prompt_or_messages, images=None) -> tuple[dict[str, torch.Tensor], bool]:
        """Single prompt or a batch -> (model inputs, whether it was a batch)."""
        batched = isinstance(prompt_or_messages, (list, tuple)) and bool(prompt_or_messages) and \
            not isinstance(prompt_or_messages[0], dict)
        prompts = list(prompt_or_messages) if batched else [prompt_or_messages]
        if batched:
            per_prompt = list(images) if images is not None else [None] * len(prompts)
            if len(per_prompt) != len(prompts) or any(i is not None and not isinstance(i, (list, tuple)) for i in per_prompt):
                raise PromptError("for a batch of prompts, images must be a list with one list of images per prompt")
        else:
            per_prompt = [images]
        texts, all_images = [], []
        for prompt, ims in zip(prompts, per_prompt):
            text, ims = self.prompt_text(prompt, ims)
            texts.append(text)
            all_images.extend(ims)
        return self.processor(texts, all_images, padding_side="left"), batched

    # -- generation --------------------------------------------------------------------------------------------------

    def generate(self, prompt_or_messages, images=None, **sampling) -> Generation | list[Generation]:
        """Answer one prompt, or a batch (a list of prompts, with `images` a list of image lists).

        A prompt is raw text with one `<image>` per image, or chat messages (rendered with the chat template).
        `sampling` are the fields of `SamplingParams`: max_new_tokens, temperature, top_k, top_p,
        repetition_penalty, seed, stop.
        """
        inputs, batched = self.prepare(prompt_or_messages, images)
        results = self.engine.generate(inputs, sampling_params(sampling))
        return results if batched else results[0]

    def stream(self, prompt_or_messages, images=None, **sampling) -> TextStream:
        """Like generate() for one prompt, as an iterator of text pieces (`.generation` holds the result after)."""
        inputs, batched = self.prepare(prompt_or_messages, images)
        if batched:
            raise PromptError("stream() takes one prompt; use generate() for a batch")
        return self.engine.stream(inputs, sampling_params(sampling))

    def save(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> Path:
        """Write the model in the llava-hf layout (transformers 4.x's, which 4.x, 5.x and `load` all read).

        state_dict: the weights to write, when they are not this model's own (a gathered FSDP state, say).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "chat_template.jinja").unlink(missing_ok=True)  # would shadow chat_template.json
        state = state_dict if state_dict is not None else self.model.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        saved_dtype = next(iter(state.values())).dtype
        config = to_hf_dict(self.config)
        config["torch_dtype"] = str(saved_dtype).replace("torch.", "")
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        text = self.config.text
        eos = self.engine.eos_token_ids
        (directory / "generation_config.json").write_text(json.dumps({
            "bos_token_id": text.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": self.processor.pad_token_id,
        }, indent=2))
        save_weights(state, directory, tied=self.config.tie_word_embeddings)
        self.processor.save(directory)
        return directory

    def image_tokens(self, image) -> int:
        """How many tokens an image (PIL image or path) costs in a prompt."""
        im = self.processor.load_image(image)
        return self.processor.image_tokens((im.height, im.width))
