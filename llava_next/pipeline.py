"""`load()` and the Pipeline it returns: a checkpoint's model, processor and generation engine together."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .adapter import is_adapter, merge_adapter, read_adapter_config
from .checkpoint import (CheckpointError, load_weights, map_weight_name, new_checkpoint_directory, read_json,
                         read_safetensors_index, resolve_checkpoint, save_weights, weight_files)
from .config import LlavaConfig, read_config, to_hf_dict
from .engine import (Engine, Generation, SamplingParams, TextStream, bf16_layout_before_loading,
                     check_cpu_settings)
from .errors import LlavaError, counted
from .image import DEFAULT_MAX_PIXELS, ImageLimits
from .load_options import DEFAULT_DTYPE, DEFAULT_GROUP_SIZE, DEFAULT_MODEL, DTYPE_NAMES, QUANTIZE_MODES
from .model.llava import LlavaModel
from .outputs import output_directory
from .original import (OriginalLayout, end_of_turn_ids, is_original_layout, original_processor, read_layout,
                       weight_sources)
from .processor import Processor
from .quantize import (ConvertWhileLoading, QuantizeError, convert_linear, convert_linears, decoding_bf16_shapes,
                       empty_converted, float_prompt_layers, pack_all, quantized_state)
from .prompt import IMAGE_TOKEN, PromptError, images_given, normalize_messages, user_turn

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16) * 2))  # the names, then short ones


class DeviceError(LlavaError, ValueError):
    """A device or dtype that cannot be used here."""


class LoadError(LlavaError, ValueError):
    """load() arguments that cannot work."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {device!r} is not a device PyTorch knows; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {str(device)!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} was asked for but PyTorch sees no CUDA GPU here; use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def cpu_flags() -> set[str]:
    """The processor's feature flags as Linux reports them (x86 'flags', Arm 'Features'); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """bfloat16 matrix instructions: AVX512-BF16 or AMX on x86, the BF16 extension on Arm. Without them PyTorch
    emulates bfloat16 on the CPU, slower than float32."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & (cpu_flags() if flags is None else flags))


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, cfg: LlavaConfig,
                  flags: set[str] | None = None, quantized: bool = False) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why. "auto" (or None): on a GPU the checkpoint's 16-bit dtype (bfloat16 for a
    float32 checkpoint); on a CPU bfloat16 for a 16-bit checkpoint when the processor has native bfloat16
    instructions, else float32 (exact, and faster than emulated bfloat16). A quantized model computes in bfloat16
    on such a CPU whatever the checkpoint's dtype: its weights are already rounded far more than that."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise DeviceError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype, "asked for"
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise DeviceError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype], "asked for"
    saved = DTYPES.get(str(cfg.torch_dtype or "").replace("torch.", ""))
    if device.type != "cpu":
        if saved in (torch.bfloat16, torch.float16):
            return saved, f"auto: the checkpoint's {str(saved).removeprefix('torch.')} on a GPU"
        return torch.bfloat16, "auto: bfloat16 on a GPU for a float32 checkpoint"
    if quantized and cpu_has_native_bf16(flags):
        return torch.bfloat16, "auto: quantized, and this CPU has native bfloat16 (avx512_bf16 or AMX)"
    if saved not in (torch.bfloat16, torch.float16):
        return torch.float32, "auto: the checkpoint is float32"
    if cpu_has_native_bf16(flags):
        return torch.bfloat16, "auto: 16-bit checkpoint, and this CPU has native bfloat16 (avx512_bf16 or AMX)"
    return torch.float32, "auto: this CPU has no native bfloat16 instructions, so float32 is faster"


def read_generation_config(directory: Path) -> dict[str, Any]:
    path = directory / "generation_config.json"
    return read_json(path) if path.exists() else {}


def eos_token_ids(generation_config: dict[str, Any], cfg: LlavaConfig, tokenizer) -> list[int]:
    """The ids that end generation: generation_config.json's when it names any, else the config's, else the
    tokenizer's EOS."""
    candidates: Any = generation_config.get("eos_token_id")
    if candidates is None:
        candidates = cfg.text.eos_token_id
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    ids = candidates if isinstance(candidates, list) else [candidates]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.text.vocab_size for i in ids):
        raise CheckpointError(f"generation_config.json / config.json: eos_token_id {candidates!r} must be token ids "
                              f"below the vocabulary size {cfg.text.vocab_size}")
    return ids


def sampling_defaults(generation_config: dict[str, Any], where: str = "generation_config.json") -> dict[str, Any]:
    """The sampling a checkpoint's generation_config asks for, as SamplingParams fields, by transformers' rules:
    do_sample false (or absent) is greedy whatever temperature says; do_sample true samples with its temperature,
    top_k and top_p (transformers' defaults 1.0, 50, 1.0 where it gives none); repetition_penalty and
    max_new_tokens apply either way. max_length (a cap on prompt + answer, whose transformers default of 20
    would cut any answer after an image's tokens) is not applied."""
    g = generation_config
    out: dict[str, Any] = {}
    try:
        if g.get("max_new_tokens") is not None:
            out["max_new_tokens"] = int(g["max_new_tokens"])
        if g.get("repetition_penalty") is not None:
            out["repetition_penalty"] = float(g["repetition_penalty"])
        if g.get("do_sample"):
            out["temperature"] = float(g["temperature"] if g.get("temperature") is not None else 1.0)
            out["top_k"] = int(g["top_k"] if g.get("top_k") is not None else 50)
            out["top_p"] = float(g["top_p"] if g.get("top_p") is not None else 1.0)
        SamplingParams(**out).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: sampling settings that cannot work ({e})") from None
    return out


def sampling_params(options: dict[str, Any]) -> SamplingParams:
    known = set(SamplingParams.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return SamplingParams(**options)


def allocate(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A meta-device model's `to_empty(device=device)`, each tensor allocated by torch.empty_strided: to_empty's
    empty_like of a meta tensor runs PyTorch's Python reference implementation, whose first use imports sympy
    (through torch.fx's symbolic shapes): ~0.9 s of a 3.2 s load of the medium benchmark model. Parameters and buffers
    are all built contiguous, so their strides are kept as they are. (nn.Module's own
    _apply, which to_empty calls, keeps parameters parameters.)"""
    return model._apply(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device))


def build_model(cfg: LlavaConfig, files: list[Path], dtype: torch.dtype, device: torch.device, progress: bool,
                for_inference: bool = True, rename=map_weight_name, more=(), convert: str | None = None,
                group_size: int = DEFAULT_GROUP_SIZE) -> tuple[LlavaModel, dict[str, str], tuple | None]:
    """The model filled from the files, its linears converted to `convert`'s form (one of QUANTIZE_MODES, or "fast")
    as they are loaded; returns it, {linear: what it became} and, for "fast", the layout its bfloat16 decoding layers
    were laid out in (engine.bf16_layout_before_loading's answer, for the Engine; else None)."""
    # Built on the meta device and filled from the files: no time spent on random init, no second copy in memory.
    with torch.device("meta"):
        model = LlavaModel(cfg, for_inference=for_inference)
    model = allocate(model.to(dtype), device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.language_model.reset_rope()
    # bfloat16 decoding layers laid out as they are read, in the layout chosen before loading (the allocation above is
    # not touched yet): laid out after loading, each was held in both layouts beside the rest of the model for a moment
    bf16_layout = bf16_layout_before_loading(decoding_bf16_shapes(model)) if convert == "fast" else None
    packed = bf16_layout is not None and bf16_layout[0] == "blocked"
    converter = ConvertWhileLoading(model, convert, group_size, packed) if convert is not None else None
    load_weights(model, files, progress=progress, rename=rename, more=more,
                 on_loaded=converter.loaded if converter is not None else None)
    return model.eval(), converter.finish() if converter is not None else {}, bf16_layout


def build_quantized_model(cfg: LlavaConfig, quantization: dict[str, Any], files: list[Path], dtype: torch.dtype,
                          device: torch.device) -> LlavaModel:
    """A checkpoint written by save_quantized: the lean model with its converted layers, filled strictly by name."""
    with torch.device("meta"):
        model = LlavaModel(cfg, for_inference=True)
        empty_converted(model, quantization["layers"])
    model = allocate(model.to(dtype), device)  # (.to: float parts only, the integer buffers keep their dtype)
    if cfg.tie_word_embeddings and "lm_head" not in quantization["layers"]:
        model.lm_head.weight = model.language_model.embed_tokens.weight
    model.language_model.reset_rope()
    targets = quantized_state(model)
    stored = {t.name: t for path in files for t in read_safetensors_index(path)}
    missing, unexpected = sorted(set(targets) - set(stored)), sorted(set(stored) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"the quantized checkpoint does not match its config (missing: {missing[:5]}, "
                              f"unexpected: {unexpected[:5]}); write it again with `llava-next quantize`")
    with torch.no_grad():
        for name, target in targets.items():
            if stored[name].shape != tuple(target.shape):
                raise CheckpointError(f"the quantized checkpoint's {name} has shape {stored[name].shape}, the "
                                      f"model needs {tuple(target.shape)}")
            stored[name].read_into(target)
    pack_all(model)
    for name, kind in float_prompt_layers(model).items():  # as a model quantized while loading has them
        convert_linear(model, name, kind)
    return model.eval()


def save_quantized(pipe: "Pipeline", directory: str | os.PathLike) -> Path:
    """Write a quantized pipeline as a checkpoint that load() reads back quantized, without the float weights."""
    from safetensors.torch import save_file

    if pipe.quantization is None:
        raise QuantizeError("this pipeline is not quantized; load it with quantize=... first")
    if pipe.original is not None:
        # its files would mix the original layout's config with llava-hf weights and tokenizer files
        raise QuantizeError(f"{pipe.directory} is a checkpoint of the original LLaVA code: quantize it at load "
                            "(--quantize), or write it in the llava-hf layout first (llava-next convert) and "
                            "quantize that")
    directory = new_checkpoint_directory(directory, pipe.directory)
    output_directory(directory)
    config = read_json(pipe.directory / "config.json")
    config["quantization"] = pipe.quantization
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation_config = pipe.directory / "generation_config.json"
    if generation_config.exists():
        (directory / "generation_config.json").write_text(generation_config.read_text())
    state = {name: t.detach().contiguous().cpu() for name, t in quantized_state(pipe.model).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    pipe.processor.save(directory)
    return directory


def write_checkpoint(directory: Path, cfg: LlavaConfig, processor: Processor, state: dict[str, torch.Tensor],
                     eos_token_ids: Sequence[int]) -> None:
    """config, generation config, weights (in their own dtype) and processor files in the llava-hf layout."""
    config = to_hf_dict(cfg)
    config["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    eos = list(eos_token_ids)
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": cfg.text.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": processor.pad_token_id,
    }, indent=2))
    save_weights(state, directory, tied=cfg.tie_word_embeddings)
    processor.save(directory)


def load(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = DEFAULT_DTYPE,
    device: str | torch.device | None = None,
    revision: str | None = None,
    chat_template: str | None = None,
    max_image_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    image_cache_bytes: int = 256 * 2**20,
    prefix_cache: bool = True,
    prefix_cache_bytes: int = 0,
    quantize: str | None = None,
    group_size: int | None = None,
    compile: bool = False,
    trainable: bool = False,
    vision_tower: str | os.PathLike | None = None,
    conv_template: str | None = None,
) -> "Pipeline":
    """Load a LLaVA 1.5 / LLaVA-NeXT checkpoint: a local directory, a Hub id, or "demo" (the bundled demo model).

    A directory holding a LoRA adapter (adapter_config.json, as `llava-next train` writes with lora.merge: false)
    loads its base model and merges the adapter into it.

    image_cache_bytes bounds the cache of image features (keyed by the image's content; 0 turns it off);
    prefix_cache keeps finished requests' KV caches for the next one that starts the same way (the next turn of a
    conversation): the newest always, older ones while they fit in prefix_cache_bytes (0: the newest only, one
    conversation at a time; a server keeps several). Neither cache changes any answer.

    dtype "auto" (the default) is explained by `resolve_dtype`; `pipe.dtype_reason` says what it chose and why.
    quantize: "int8" or "int4" (weight-only; int4 in groups of `group_size` inputs, 128 by default) or "w8a8"
    (int8 weights and activations), applied while loading, layer by layer; a checkpoint written by `save_quantized`
    (`llava-next quantize`) loads quantized as it is, in its own groups. See llava_next/quantize.py for what each
    converts.

    compile: run each decoding step through torch.compile (CUDA graphs on a GPU). It costs a compilation on the
    first request (a minute for a 7B model) and pays on GPUs; on the CPUs measured here eager decoding was faster
    (BENCHMARKS.md), so it is off by default.

    A checkpoint in the layout of the original LLaVA / LLaVA-NeXT repositories (llava_next.original) loads as that
    code runs it: vision_tower overrides the CLIP tower its config names (mm_vision_tower), conv_template the
    conversation template the original CLI would pick from the model's name (llava_next.conversation).

    For inference the model is built lean: the vision tower stops at its feature layer and the decoder's q/k/v and
    gate/up projections are fused. trainable=True builds the plain model instead, parameter for parameter the
    checkpoint's, which training and save() need.
    """
    began = time.perf_counter()
    for name, value, low in (("max_image_pixels", max_image_pixels, 1), ("image_cache_bytes", image_cache_bytes, 0),
                             ("prefix_cache_bytes", prefix_cache_bytes, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LoadError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("progress", progress), ("prefix_cache", prefix_cache), ("compile", compile),
                        ("trainable", trainable)):
        if not isinstance(value, bool):  # ("no" is true to Python)
            raise LoadError(f"{name} must be True or False, got {value!r}")
    if not str(model).strip():
        raise LoadError("no model given: name a checkpoint directory, a Hub id or 'demo'")
    device = resolve_device(device)
    if device.type == "cpu":  # (the engine's measured choices are made on the CPU only; before any download too)
        check_cpu_settings()
    adapter = Path(model).expanduser() if str(model) != "demo" else None
    adapter_config = read_adapter_config(adapter) if adapter is not None and is_adapter(adapter) else None
    if adapter_config is not None:
        model = adapter_config["base_model_name_or_path"]
    directory = resolve_checkpoint(model, revision)
    raw_config = read_json(directory / "config.json")
    layout = None
    if is_original_layout(raw_config):
        cfg, layout = read_layout(directory, raw_config, str(model), None if vision_tower is None else str(vision_tower),
                                  conv_template)
    else:
        if vision_tower is not None or conv_template is not None:
            raise LoadError(f"{directory} is a llava-hf checkpoint: its vision tower and chat template are its own; "
                            "vision_tower and conv_template apply to checkpoints of the original LLaVA code only")
        cfg = read_config(directory / "config.json")
    saved_quantization = raw_config.get("quantization")
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, not {quantize!r}")
    if saved_quantization and quantize not in (None, saved_quantization["mode"]):
        raise QuantizeError(f"{directory} is already quantized ({saved_quantization['mode']}); load it without "
                            f"quantize, or quantize the original checkpoint to {quantize}")
    # A group size given for nothing, or not the one a quantized checkpoint has, is refused, never ignored (its own
    # may be named, with or without quantize="int4"); None is the checkpoint's own, or DEFAULT_GROUP_SIZE.
    if group_size is not None and saved_quantization:
        mode, saved_groups = saved_quantization["mode"], saved_quantization.get("group_size")
        if mode != "int4" or group_size != saved_groups:
            groups = f", in groups of {saved_groups}" if mode == "int4" else ""
            raise QuantizeError(f"group_size (--group-size) {group_size}: {directory} is quantized already "
                                f"({mode}{groups}); load it without a group size")
    elif group_size is not None and quantize != "int4":
        what = "this load does not quantize" if quantize is None else f"{quantize} has no groups"
        raise QuantizeError(f"group_size (--group-size) {group_size} applies to int4 quantization only; {what}")
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if (quantize or saved_quantization) and trainable:
        raise QuantizeError("a quantized model cannot be trained; load the float checkpoint with trainable=True")
    dtype, dtype_reason = resolve_dtype(dtype, device, cfg, quantized=bool(quantize or saved_quantization))
    limits = ImageLimits(max_pixels=max_image_pixels)
    if layout is not None:
        processor = original_processor(directory, cfg, layout, limits, chat_template)
    else:
        processor = Processor.from_dir(directory, cfg, chat_template, limits)
    if processor.tokenizer.vocab_size > cfg.text.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {processor.tokenizer.vocab_size} tokens but the model only "
            f"{cfg.text.vocab_size} embeddings"
        )
    bf16_layout = None
    if saved_quantization:
        llava = build_quantized_model(cfg, saved_quantization, weight_files(directory), dtype, device)
        quantization = saved_quantization
    else:
        weights = weight_sources(cfg, layout) if layout is not None else dict(rename=map_weight_name, more=())
        convert = quantize
        if quantize is None and device.type == "cpu" and not trainable:
            convert = "fast"  # (compiled decoding calls the same linears, oneDNN's as opaque operators)
        # An adapter is merged into the float weights: the conversion follows it
        llava, converted, bf16_layout = build_model(
            cfg, weight_files(directory), dtype, device, progress, for_inference=not trainable,
            convert=convert if adapter_config is None else None, group_size=group_size, **weights)
        if adapter_config is not None:
            merge_adapter(llava, adapter, adapter_config)
            if convert is not None:
                converted = convert_linears(llava, convert, group_size)
        quantization = None
        if quantize is not None:  # (the quantized layers: those left in float but laid out for oneDNN are not)
            quantization = {"mode": quantize, "group_size": group_size,
                            "layers": {name: kind for name, kind in converted.items() if not kind.startswith("fast")}}
    generation_config = read_generation_config(directory)
    eos = eos_token_ids(generation_config, cfg, processor.tokenizer)
    if layout is not None:
        eos += [i for i in end_of_turn_ids(layout, processor.tokenizer) if i not in eos]
    engine = Engine(llava, processor.tokenizer, eos, image_cache_bytes=image_cache_bytes, prefix_cache=prefix_cache,
                    prefix_cache_bytes=prefix_cache_bytes, compile=compile, bf16_layout=bf16_layout)
    return Pipeline(llava, processor, engine, directory, dtype_reason=dtype_reason, original=layout,
                    load_seconds=time.perf_counter() - began, quantization=quantization,
                    sampling_defaults=sampling_defaults(generation_config, str(directory / "generation_config.json")))


def image_list(images: Sequence[Any] | None) -> list[Any]:
    """One prompt's images as a list (None: none); a single image or a path given bare is refused, not iterated."""
    if images is not None and not isinstance(images, (list, tuple)):
        raise PromptError(f"images must be a list (one entry per image), not a {type(images).__name__}")
    return list(images or [])


@dataclass
class Pipeline:
    model: LlavaModel
    processor: Processor
    engine: Engine
    directory: Path
    dtype_reason: str = ""
    load_seconds: float = 0.0
    quantization: dict[str, Any] | None = None  # mode, group_size and what each converted layer became
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # the checkpoint's, under any caller's
    original: OriginalLayout | None = None  # a checkpoint of the original LLaVA code: its layout and rules

    @property
    def config(self) -> LlavaConfig:
        return self.model.cfg

    # -- inputs ------------------------------------------------------------------------------------------------------

    def prompt_text(self, prompt_or_messages: str | Sequence[dict], images: Sequence[Any] | None) -> tuple[str, list]:
        """One prompt (raw text with <image> placeholders, or chat messages) -> (prompt text, its images)."""
        images = image_list(images)
        if isinstance(prompt_or_messages, str):
            return prompt_or_messages, images
        plain, slots = normalize_messages(prompt_or_messages)
        wanted = sum(1 for slot in slots if slot is None)
        if len(images) != wanted:
            raise PromptError(f"the messages have {counted(wanted, 'image place')} without an image of its own "
                              f"(image items, and {IMAGE_TOKEN} typed in the text) but {images_given(len(images))}; "
                              "give one image per place, in order")
        if wanted < len(slots) and any(IMAGE_TOKEN in item.get("text", "") for m in plain for item in m["content"]):
            # the template may render image items before the text (the llava templates do): which typed <image> an
            # inline image would stand beside is not known here
            raise PromptError(f"the messages have {IMAGE_TOKEN} typed in their text and images given inline; give "
                              "the images in the images list instead (one per image item or typed placeholder, in "
                              "order)")
        separate = iter(images)
        filled = [next(separate) if slot is None else slot for slot in slots]
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
        repetition_penalty, seed, stop. Those not given come from the checkpoint's generation_config.json
        (`sampling_defaults`), then from SamplingParams' own defaults (greedy, 256 new tokens).
        """
        inputs, batched = self.prepare(prompt_or_messages, images)
        results = self.engine.generate(inputs, sampling_params({**self.sampling_defaults, **sampling}))
        return results if batched else results[0]

    def stream(self, prompt_or_messages, images=None, **sampling) -> TextStream:
        """Like generate() for one prompt, as an iterator of text pieces (`.generation` holds the result after)."""
        inputs, batched = self.prepare(prompt_or_messages, images)
        if batched:
            raise PromptError("stream() takes one prompt; use generate() for a batch")
        return self.engine.stream(inputs, sampling_params({**self.sampling_defaults, **sampling}))

    def conversation(self, system: str | None = None) -> "Conversation":
        """A conversation with memory: each ask() adds a turn, and the next turn reuses the cached work of the
        earlier ones (the images' features and the shared prefix's KV cache)."""
        return Conversation(self, [{"role": "system", "content": system}] if system else [])

    def clear_caches(self) -> None:
        self.engine.clear_caches()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses of the image-feature and prefix caches, and what they hold."""
        return self.engine.cache_stats()

    def save(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
             dtype: torch.dtype | None = None) -> Path:
        """Write the model in the llava-hf layout (transformers 4.x's, which 4.x, 5.x and `load` all read).

        state_dict: the weights to write, when they are not this model's own (a gathered FSDP state, say).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "chat_template.jinja").unlink(missing_ok=True)  # would shadow chat_template.json
        if state_dict is None and not self.model.vision_tower.complete:
            raise ValueError("this pipeline was loaded for inference, without the vision blocks past the feature "
                             "layer; load it with trainable=True to save a complete checkpoint")
        state = state_dict if state_dict is not None else self.model.checkpoint_weights()
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        write_checkpoint(directory, self.config, self.processor, state, self.engine.eos_token_ids)
        return directory

    def image_tokens(self, image) -> int:
        """How many tokens an image (PIL image or path) costs in a prompt."""
        im = self.processor.load_image(image)
        return self.processor.image_tokens((im.height, im.width))


@dataclass
class Conversation:
    """Turns of one chat, in the transformers message format, with every image given so far in order."""

    pipe: Pipeline
    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)

    def _turn(self, text: str, images: Sequence[Any]) -> tuple[list[dict[str, Any]], list[Any]]:
        if not isinstance(text, str):
            raise PromptError(f"the question must be a string, not {type(text).__name__}")
        loaded = [self.pipe.processor.load_image(im) for im in image_list(images)]
        turn = user_turn(text, len(loaded))
        return self.messages + [turn], self.images + loaded

    def ask(self, text: str, images: Sequence[Any] = (), **sampling) -> Generation:
        """The model's answer to `text` (with `images`, shown before it), remembered for the next turn."""
        messages, all_images = self._turn(text, images)
        result = self.pipe.generate(messages, all_images, **sampling)
        self._remember(messages, all_images, result.text)
        return result

    def stream(self, text: str, images: Sequence[Any] = (), **sampling) -> Iterator[str]:
        """Like ask(), as text pieces; the turn is remembered once the stream is exhausted."""
        messages, all_images = self._turn(text, images)
        stream = self.pipe.stream(messages, all_images, **sampling)
        yield from stream
        self._remember(messages, all_images, stream.generation.text)

    def _remember(self, messages: list[dict[str, Any]], images: list[Any], answer: str) -> None:
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images = images

