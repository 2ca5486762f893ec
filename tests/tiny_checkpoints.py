"""Tiny random LLaVA checkpoints, written by transformers itself in the exact on-disk layout of its version.

Run by the test process (transformers 5.x) and, as a script, by a second interpreter with transformers 4.x, so the
tests see both layouts the Hub holds. Geometry is real (336 px tiles, patch 14, the published pinpoints); widths
are tiny. Each family gets a tokenizer built with the `tokenizers` library in the style of the real one
(sentencepiece-like byte-fallback BPE for llama/mistral/Yi, byte-level BPE for Llama-3 and Qwen2) and the chat
template its llava-hf repository ships.

    python tests/tiny_checkpoints.py OUT_DIR '{"name": "mistral", "family": "mistral", "sharded": true}' ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "llava_next" / "templates"

CORPUS = [
    "USER: What is shown in this image? ASSISTANT: A red stop sign on a street corner.",
    "A chat between a curious human and an artificial intelligence assistant.",
    "The quick brown fox jumps over the lazy dog. What color is the circle? It is blue.",
    "[INST] Describe the picture in detail. [/INST] It shows two cats sleeping on a sofa.",
    "How many squares are there? There are three squares and one triangle at the top left.",
    "Is there a green star? Yes. No. Left, right, top, bottom, middle, center.",
    "Café, naïve, résumé, 北京, 東京, 😀 emoji, ümlaut and ß are unicode text.",
    "system user assistant Answer the questions. You are a helpful assistant.",
]

SENTENCEPIECE_DECODER = {
    "type": "Sequence",
    "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ],
}

FAMILIES = {
    # LLaVA 1.5 (vicuna): model_type llava, one 336 px crop per image
    "llava15": dict(model_type="llava", text="llama", tokenizer="sentencepiece", template="vicuna"),
    "vicuna": dict(model_type="llava_next", text="llama", tokenizer="sentencepiece", template="vicuna"),
    "mistral": dict(model_type="llava_next", text="mistral", tokenizer="sentencepiece", template="mistral"),
    # llava-v1.6-34b: Yi is a llama with ChatML tokens and no BOS
    "yi": dict(model_type="llava_next", text="llama", tokenizer="yi", template="chatml_yi"),
    "llama3": dict(model_type="llava_next", text="llama", tokenizer="llama3", template="llama3", rope_theta=500000.0),
    # llava-next-72b / 110b: Qwen 1.5 (qwen2 architecture)
    "qwen2": dict(model_type="llava_next", text="qwen2", tokenizer="qwen", template="chatml_qwen", rope_theta=1e6),
}


def _special(token_id: int, content: str, special: bool = True) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": special}


def build_tokenizer_json(kind: str) -> tuple[dict, dict]:
    """(tokenizer.json as a dict, the special tokens by role) in the style of a real family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    corpus = CORPUS * 20
    if kind in ("sentencepiece", "yi"):
        # trained word by word (as sentencepiece is: no merge crosses a word boundary), then stored the way the
        # llama tokenizer.json files are: a Prepend/Replace normalizer and no pre-tokenizer
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="always", split=True)
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=420, show_progress=False))
        j = json.loads(tok.to_str())
        j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                               {"type": "Replace", "pattern": {"String": " "},
                                                                "content": "\u2581"}]}
        if kind == "sentencepiece":
            head = ["<unk>", "<s>", "</s>"]
            extra = ["<image>", "<pad>"]
            roles = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
        else:
            head = ["<unk>", "<|startoftext|>", "<|endoftext|>"]
            extra = ["<|im_start|>", "<|im_end|>", "<image>", "<pad>"]
            roles = dict(bos_token="<|startoftext|>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>")
        vocab = {t: i for i, t in enumerate(head)}
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1]):
            vocab.setdefault(t, len(vocab))
        j["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
        j["pre_tokenizer"] = None
        j["decoder"] = SENTENCEPIECE_DECODER
        bos_in_template = kind == "sentencepiece"
    else:
        tok = Tokenizer(models.BPE())
        if kind == "qwen":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                                 behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        j = json.loads(tok.to_str())
        vocab = j["model"]["vocab"]
        if kind == "llama3":
            extra = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<image>", "<pad>"]
            roles = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>")
            bos_in_template = True
        else:
            extra = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
            roles = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
            bos_in_template = False
        head = []
    n = len(vocab)
    added = [_special(i, t) for i, t in enumerate(head)]
    added += [_special(n + i, t) for i, t in enumerate(extra)]
    j["added_tokens"] = added
    ids = {a["content"]: a["id"] for a in added}
    if bos_in_template:
        bos = roles["bos_token"]
        j["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids[bos]], "tokens": [bos]}},
        }
    elif kind in ("qwen",):
        j["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    else:
        j["post_processor"] = None
    return j, roles


def build(out: Path, family: str, sharded: bool = False, sparse_config: bool = False, tie: bool = False,
          feature_layer=-2, strategy: str = "default", sliding_window=None, template_location: str = "processor",
          pinpoints=None, num_layers: int = 2, seed: int = 0, rope_scaling=None, max_positions: int = 16384) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor,
                              MistralConfig, PreTrainedTokenizerFast, Qwen2Config)

    v5 = int(transformers.__version__.split(".")[0]) >= 5
    spec = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)

    tok_json, roles = build_tokenizer_json(spec["tokenizer"])
    backend = Tokenizer.from_str(json.dumps(tok_json))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **roles)
    vocab_size = backend.get_vocab_size()
    image_id = backend.token_to_id("<image>")
    template = (TEMPLATES / f"{spec['template']}.jinja").read_text()

    text_kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-5, tie_word_embeddings=tie,
                       bos_token_id=backend.token_to_id(roles.get("bos_token", "")) if roles.get("bos_token") else None,
                       eos_token_id=backend.token_to_id(roles["eos_token"]),
                       pad_token_id=backend.token_to_id(roles["pad_token"]))
    rope_theta = spec.get("rope_theta", 10000.0)
    if v5:
        text_kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, **(rope_scaling or {})}
    else:
        text_kwargs["rope_theta"] = rope_theta
        if rope_scaling:
            text_kwargs["rope_scaling"] = rope_scaling
    if spec["text"] == "mistral":
        text_config = MistralConfig(sliding_window=sliding_window, **text_kwargs)
    elif spec["text"] == "qwen2":
        text_config = Qwen2Config(use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                                  max_window_layers=1, **text_kwargs)
    else:
        text_config = LlamaConfig(**text_kwargs)
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                     image_size=336, patch_size=14, projection_dim=32)
    common = dict(vision_config=vision_config, text_config=text_config, image_token_index=image_id,
                  vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                  tie_word_embeddings=tie)
    if spec["model_type"] == "llava":
        config = LlavaConfig(**common)
        model_class = LlavaForConditionalGeneration
    else:
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        model_class = LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # transformers initialises some of these to constants; random values test more
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight",
                              "pre_layrnorm.weight", "image_newline")) or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if spec["text"] == "llama" and spec["tokenizer"] == "llama3":
        model.generation_config.eos_token_id = [backend.token_to_id("<|end_of_text|>"), backend.token_to_id("<|eot_id|>")]
    model.save_pretrained(out, max_shard_size="150KB" if sharded else "5GB")

    if spec["model_type"] == "llava":
        image_processor = _image_processor(transformers, "Llava", dict(do_pad=False))
        processor_class = LlavaProcessor
    else:
        image_processor = _image_processor(transformers, "LlavaNext", dict(image_grid_pinpoints=pinpoints) if pinpoints else {})
        processor_class = LlavaNextProcessor
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                                vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
                                chat_template=template if template_location == "processor" else None)
    # transformers 4.x can still write the legacy chat_template.json that the llava-hf repos hold
    processor.save_pretrained(out, **({} if v5 else {"save_jinja_files": False}))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "LlamaTokenizer" if spec["tokenizer"] in ("sentencepiece", "yi") else \
        "PreTrainedTokenizerFast" if spec["tokenizer"] == "llama3" else "Qwen2Tokenizer"
    if spec["tokenizer"] in ("sentencepiece", "yi"):
        tokenizer_config.update(add_bos_token=spec["tokenizer"] == "sentencepiece", add_eos_token=False, legacy=False)
    if template_location == "tokenizer":
        tokenizer_config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
    if sparse_config:
        _drop_defaults(out / "config.json", type(text_config), type(vision_config))


def _image_processor(transformers, prefix: str, extra: dict):
    cls = getattr(transformers, f"{prefix}ImageProcessorPil", None) or getattr(transformers, f"{prefix}ImageProcessor")
    return cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **extra)


def _drop_defaults(path: Path, text_class, vision_class) -> None:
    """Rewrite config.json as the transformers versions that wrote the llava-hf repos did: sub-configs without any
    value equal to their class default."""
    d = json.loads(path.read_text())
    for key, cls in (("text_config", text_class), ("vision_config", vision_class)):
        defaults = cls().to_dict()
        d[key] = {k: v for k, v in d[key].items() if k == "model_type" or k not in defaults or defaults[k] != v}
    path.write_text(json.dumps(d, indent=2))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    for spec in sys.argv[2:]:
        options = json.loads(spec)
        build(out_dir / options.pop("name"), **options)
