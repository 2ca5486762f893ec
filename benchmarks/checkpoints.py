"""Random LLaVA-NeXT checkpoints for the benchmarks, built once into a cache directory.

Every preset has the real geometry (336 px tiles, patch 14, the published pinpoints, a 32,064-token vocabulary, so
the lm_head costs what it costs in real decoding) and differs only in widths and depths:

  small       CLIP 256 wide x 6, mistral 512 wide x 8                       (~0.1 B parameters)
  medium      CLIP 512 wide x 12, mistral 1024 wide x 12                    (~0.3 B)
  mistral-7b  the exact shapes of llava-v1.6-mistral-7b: CLIP-L/336 x 24,   (~7.6 B, ~15 GB in bfloat16)
              mistral 4096 wide x 32, 8 kv heads, 14336 MLP

small and medium are written by transformers (float32); mistral-7b is written tensor by tensor in bfloat16 from the
shapes of a model built on the meta device, so building it needs no more memory than its largest tensor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRESETS = {
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
                  text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2)),
    "medium": dict(vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                   text=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                             num_key_value_heads=4)),
    "mistral-7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, projection_dim=768),
                       text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, rope_theta=1_000_000.0,
                                 max_position_embeddings=32768)),
}
VOCAB_SIZE = 32064
STREAMED = {"mistral-7b"}  # written tensor by tensor in bfloat16


def build_checkpoint(cache: Path, preset: str) -> Path:
    """The preset's checkpoint directory under `cache`, built on first use."""
    directory = Path(cache) / preset
    if (directory / "config.json").exists():
        return directory
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import build_tokenizer_json
    from tokenizers import Tokenizer
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor,
                              MistralConfig, PreTrainedTokenizerFast)

    tok_json, roles = build_tokenizer_json("sentencepiece")
    backend = Tokenizer.from_str(json.dumps(tok_json))
    spec = PRESETS[preset]
    vision = dict(projection_dim=256) | spec["vision"]
    text = dict(max_position_embeddings=8192) | spec["text"]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, **vision),
        text_config=MistralConfig(vocab_size=VOCAB_SIZE, sliding_window=None, **text),
        image_token_index=backend.token_to_id("<image>"),
    )
    partial = directory.with_name(directory.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    if preset in STREAMED:
        _write_random_bf16(config, partial)
    else:
        import torch
        from transformers import LlavaNextForConditionalGeneration

        torch.manual_seed(0)
        LlavaNextForConditionalGeneration(config).save_pretrained(partial)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **roles)
    template = (ROOT / "llava_next" / "templates" / "mistral.jinja").read_text()
    LlavaNextProcessor(LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                       tokenizer, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=template).save_pretrained(partial)
    partial.rename(directory)
    return directory


def _write_random_bf16(config, directory: Path, shard_bytes: int = 4 * 2**30) -> None:
    """Safetensors shards of random bfloat16 weights with the names and shapes transformers gives the model."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    config.torch_dtype = "bfloat16"
    config.save_pretrained(directory)
    # Drawn on the GPU where there is one: the CPU's generator draws one number at a time (~1 minute for 7B).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    shards, current, size = [], {}, 0
    names = sorted(shapes)

    def flush():
        nonlocal current, size
        if current:
            file = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(directory / file), metadata={"format": "pt"})
            shards.append((file, list(current)))
            current, size = {}, 0

    for name in names:
        shape = shapes[name]
        if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02, generator=gen).cpu()
        nbytes = tensor.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        current[name] = tensor
        size += nbytes
    flush()
    total = len(shards)
    weight_map = {}
    for i, (file, keys) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (directory / file).rename(directory / final)
        weight_map.update({k: final for k in keys})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
