"""Tiny checkpoints in the ORIGINAL LLaVA repository layout, and the original code's outputs on them.

Not run by `make test`: it needs a separate environment with the original LLaVA code. The tests read what it
wrote (the checkpoints beside this file and `reference/`), so they need neither this environment nor this script.

Environment (Python 3.11, CPU), the one the committed references were made with:

    python3.11 -m venv .venv-llava-orig
    .venv-llava-orig/bin/pip install torch==2.13.0            # the CPU build
    .venv-llava-orig/bin/pip install transformers==4.37.2 sentencepiece protobuf pillow accelerate numpy safetensors
    .venv-llava-orig/bin/pip install --no-deps llava-torch==1.2.2.post1   # the original repository's code, v1.2.2

    resolved: torch 2.13.0+cpu, transformers 4.37.2, tokenizers 0.15.2, sentencepiece 0.2.3, protobuf 7.36.2,
              pillow 13.0.0, accelerate 1.15.0, numpy 2.4.6, safetensors 0.8.0, llava-torch 1.2.2.post1

Command (from the repository root; about a minute):

    .venv-llava-orig/bin/python tests/original/make_reference.py

What it does, all seeded and deterministic:

1. writes a tiny CLIP (text + vision, as openai/clip-vit-large-patch14-336 is laid out) at real geometry (336 px,
   patch 14) to `clip-tiny-336/`, and a byte-fallback BPE sentencepiece `tokenizer.model` trained here on
   generated text;
2. writes three LLaVA checkpoints in the original layout (config.json with the mm_* fields, weights named
   model.embed_tokens / model.layers.* / model.norm / lm_head / model.mm_projector.{0,2} / model.image_newline);
   weights are stored in float16 (as the published checkpoints are), so the original builder's float16 load loses
   nothing and the float32 run below uses exactly the stored values;
3. loads each with the original `load_pretrained_model(path, None, name, device="cpu")` (a `torch_dtype` passed
   through is overwritten by the builder's float16, as observed), casts it to float32 with `.float()`,
   and runs the original pipeline (conversation template chosen by the original CLI's rule, `process_images`,
   `tokenizer_image_token`, `prepare_inputs_labels_for_multimodal`, forward, greedy `generate`) on the images of
   `synthetic_images.py`, one at a time, two in one prompt, and none;
4. writes `reference/<checkpoint>.json` (texts, ids, sizes, counts, tokens, digests) and
   `reference/<checkpoint>.safetensors` (float32 tensors, named `<case>.<what>`).

The original code needs nothing more on these paths: no torchvision, deepspeed or bitsandbytes, and no module
is stubbed. The checkpoints' mm_vision_tower is the relative path tests/original/clip-tiny-336, so the script
changes to the repository root first. Two runs write byte-identical files.

make_reference_more.py adds three more checkpoints with these helpers (their defaults keep the files here as
they were); run it after this one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic_images  # noqa: E402

OUT_REF = HERE / "reference"
CLIP_DIR = HERE / "clip-tiny-336"
CLIP_REL = "tests/original/clip-tiny-336"  # mm_vision_tower, relative to the repository root (run from there)

VOCAB = 1000
HIDDEN = 64
CLIP_WIDTH = 32
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # as the v1.6 configs list them
MAX_NEW_TOKENS = 6
PIXEL_STRIDE = 7  # pixel values are stored at [..., ::7, ::7] (48 x 48 per tile); the full tensor as a sha256

CHECKPOINTS = {
    # LLaVA-1.5 (vicuna-7b-v1.5 based): pad + flat, legacy .bin shards, model_type "llava" as the published
    # liuhaotian/llava-v1.5-* configs say; the vision tower only from mm_vision_tower
    "llava-v1.5-tiny": dict(
        text="llama", model_type="llava", seed=21, weights="bin", rope_theta=10000.0,
        max_position_embeddings=4096, num_key_value_heads=4, tokenizer_model_max_length=2048,
        image_aspect_ratio="pad", mm_patch_merge_type="flat", unfreeze_mm_vision_tower=False,
        tower_inside=False, legacy=False, rotary_inv_freq=True,
    ),
    # LLaVA-1.6 vicuna: anyres + spatial_unpad, sharded safetensors, the (trained) vision tower inside the
    # checkpoint with unfreeze_mm_vision_tower true, as liuhaotian/llava-v1.6-vicuna-* ship it
    "llava-v1.6-vicuna-tiny": dict(
        text="llama", model_type="llava_llama", seed=16, weights="safetensors-sharded", rope_theta=10000.0,
        max_position_embeddings=4096, num_key_value_heads=4, tokenizer_model_max_length=4096,
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", unfreeze_mm_vision_tower=True,
        tower_inside=True, legacy=False, rotary_inv_freq=False,
    ),
    # LLaVA-1.6 mistral: anyres + spatial_unpad, one safetensors file, grouped-query attention, rope_theta 1e6,
    # tokenizer legacy=True (the fast tokenizer the builder picks for mistral); tower from mm_vision_tower
    "llava-v1.6-mistral-tiny": dict(
        text="mistral", model_type="llava_mistral", seed=17, weights="safetensors", rope_theta=1000000.0,
        max_position_embeddings=32768, num_key_value_heads=2, tokenizer_model_max_length=4096,
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad", unfreeze_mm_vision_tower=False,
        tower_inside=False, legacy=True, rotary_inv_freq=False,
    ),
}

QUESTION = "Describe the image in detail."
TWO_IMAGES = [(500, 316), (47, 1128)]
TWO_QUESTION = "<image-placeholder>\n<image-placeholder>\nWhat is different between these two pictures?"
TEXT_QUESTION = "Write a short story about a red circle."

TOKENIZER_PROBES = [
    "Hello world",
    " leading space",
    "two  spaces and a\nnewline",
    "\nstarts with a newline",
    "digits 12345 and 3.14",
    "unicode: café, naïve, 北京, 🦙",
    "</s> after an end token",
    "text<s>inside",
    "<image>\nDescribe",
    "USER: hi ASSISTANT:",
    "[INST] hi [/INST]",
    "\u2581literal metaspace",
]


# ----------------------------------------------------------------------------------------------- the tokenizer

WORDS = (
    "a chat between curious human user and an artificial intelligence assistant the gives helpful detailed polite "
    "answers to human's user's questions USER ASSISTANT system describe image in detail what is shown this picture "
    "color red green blue yellow circle square triangle star left right top bottom middle center there are two "
    "three one many small large bright dark cat dog sofa street sign car tree house window door sky cloud sun "
    "water river mountain write short story about different between these pictures answer question yes no you are "
    "language vision able understand visual content provides assist with variety of tasks using natural it shows "
    "how why where when which near far above below next behind front inside outside"
).split()


def train_tokenizer() -> bytes:
    """A llama-style sentencepiece model: BPE, byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no pad."""
    import sentencepiece as spm

    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        n = rng.randint(4, 14)
        words = [rng.choice(WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, n), str(rng.randint(0, 9999)))
        sep = rng.choice([" ", " ", " ", ", "])
        line = sep.join(words)
        line = line[0].upper() + line[1:] + rng.choice([".", "?", "!", ":"])
        lines.append(line)
    lines += ["[INST] " + l + " [/INST]" for l in lines[:200]]
    lines += ["Café naïve résumé über straße"] * 5
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def tokenizer_files(directory: Path, sp_model: bytes, max_length: int, legacy: bool) -> None:
    (directory / "tokenizer.model").write_bytes(sp_model)

    def tok(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False}

    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": tok("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": tok("</s>"), "legacy": legacy,
        "model_max_length": max_length, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": tok("<unk>"),
    }
    def plain(content):
        return {k: v for k, v in tok(content).items() if k != "__type"}

    specials = {"bos_token": plain("<s>"), "eos_token": plain("</s>"), "pad_token": "<unk>",
                "unk_token": plain("<unk>")}
    _write_json(directory / "tokenizer_config.json", config)
    _write_json(directory / "special_tokens_map.json", specials)


# ----------------------------------------------------------------------------------------------- the weights

def _normal(gen: torch.Generator, shape, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(torch.float16)


def make_clip(seed: int, image_size: int = 336, directory: Path = CLIP_DIR) -> dict:
    """A tiny CLIPModel (text + vision towers, projections) at real vision geometry (`image_size` px, patch 14),
    written to `directory`; returns its vision model's weights."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_dim=16),
        vision_config=dict(hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=14, projection_dim=16, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # the default init leaves the tiny tower nearly blind to the image; widen the patch embedding and the
        # layer norms so features (and so logits) depend clearly on the pixels
        vm = model.vision_model
        vm.embeddings.patch_embedding.weight.normal_(0.0, 0.25, generator=gen)
        vm.embeddings.class_embedding.normal_(0.0, 1.0, generator=gen)
        vm.embeddings.position_embedding.weight.normal_(0.0, 0.5, generator=gen)
        for name, p in vm.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model = model.half()
    if directory.exists():
        shutil.rmtree(directory)
    model.save_pretrained(directory, safe_serialization=True)
    # the published tower's preprocessor_config.json, in its old integer form
    _write_json(directory / "preprocessor_config.json", {
        "crop_size": image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": image_size,
    })
    return {k: v.clone() for k, v in model.vision_model.state_dict().items()}


def make_llm_weights(spec: dict, clip_vision: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(spec["seed"])
    layers, heads, kv = 2, 4, spec["num_key_value_heads"]
    hidden, inter = spec.get("hidden_size", HIDDEN), spec.get("intermediate_size", 128)
    head_dim = hidden // heads
    vocab = spec.get("vocab_size", VOCAB)  # more than the tokenizer.model's when the checkpoint has added tokens
    w = {"model.embed_tokens.weight": _normal(gen, (vocab, hidden), 1.0)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = _normal(gen, (heads * head_dim, hidden), hidden ** -0.5)
        w[p + "self_attn.k_proj.weight"] = _normal(gen, (kv * head_dim, hidden), hidden ** -0.5)
        w[p + "self_attn.v_proj.weight"] = _normal(gen, (kv * head_dim, hidden), hidden ** -0.5)
        w[p + "self_attn.o_proj.weight"] = _normal(gen, (hidden, heads * head_dim), hidden ** -0.5)
        w[p + "mlp.gate_proj.weight"] = _normal(gen, (inter, hidden), hidden ** -0.5)
        w[p + "mlp.up_proj.weight"] = _normal(gen, (inter, hidden), hidden ** -0.5)
        w[p + "mlp.down_proj.weight"] = _normal(gen, (hidden, inter), inter ** -0.5)
        w[p + "input_layernorm.weight"] = (1.0 + _normal(gen, (hidden,), 0.1).float()).half()
        w[p + "post_attention_layernorm.weight"] = (1.0 + _normal(gen, (hidden,), 0.1).float()).half()
        if spec["rotary_inv_freq"]:
            # checkpoints saved by transformers <= 4.31 (LLaVA-1.5) carry this buffer; current code drops it
            w[p + "self_attn.rotary_emb.inv_freq"] = 1.0 / (
                spec["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    w["model.norm.weight"] = (1.0 + _normal(gen, (hidden,), 0.1).float()).half()
    w["lm_head.weight"] = _normal(gen, (vocab, hidden), 3.0 * hidden ** -0.5)
    projector = spec.get("mm_projector_type", "mlp2x_gelu")
    if projector == "linear":  # one nn.Linear(mm_hidden, hidden)
        w["model.mm_projector.weight"] = _normal(gen, (hidden, CLIP_WIDTH), 2.0 * CLIP_WIDTH ** -0.5)
        w["model.mm_projector.bias"] = _normal(gen, (hidden,), 0.1)
    else:  # mlpNx_gelu: Linear(mm_hidden, hidden), then N - 1 times GELU, Linear(hidden, hidden)
        depth = int(projector[len("mlp"):-len("x_gelu")])
        w["model.mm_projector.0.weight"] = _normal(gen, (hidden, CLIP_WIDTH), 2.0 * CLIP_WIDTH ** -0.5)
        w["model.mm_projector.0.bias"] = _normal(gen, (hidden,), 0.1)
        for i in range(1, depth):
            w[f"model.mm_projector.{2 * i}.weight"] = _normal(gen, (hidden, hidden), 2.0 * hidden ** -0.5)
            w[f"model.mm_projector.{2 * i}.bias"] = _normal(gen, (hidden,), 0.1)
    if "unpad" in spec["mm_patch_merge_type"]:
        w["model.image_newline"] = _normal(gen, (hidden,), 1.0)
    if spec["tower_inside"]:
        # the tower as trained further (unfreeze_mm_vision_tower): the CLIP beside, perturbed, so a test can tell
        # which copy was used
        for k, v in clip_vision.items():
            noise = torch.randn(v.shape, generator=gen) * (0.2 * v.float().std().clamp(min=1e-3))
            w["model.vision_tower.vision_tower.vision_model." + k] = (v.float() + noise).half()
    return w


def llm_config(name: str, spec: dict) -> dict:
    cfg = {
        "_name_or_path": f"./checkpoints/{name}",
        "architectures": ["LlavaMistralForCausalLM" if spec["text"] == "mistral" else "LlavaLlamaForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": spec.get("hidden_size", HIDDEN),
        "image_aspect_ratio": spec["image_aspect_ratio"], "initializer_range": 0.02,
        "intermediate_size": spec.get("intermediate_size", 128),
        "max_position_embeddings": spec["max_position_embeddings"], "mm_hidden_size": CLIP_WIDTH,
        "mm_patch_merge_type": spec["mm_patch_merge_type"], "mm_projector_lr": None,
        "mm_projector_type": spec.get("mm_projector_type", "mlp2x_gelu"), "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": spec.get("tower", CLIP_REL),
        "model_type": spec["model_type"], "num_attention_heads": 4, "num_hidden_layers": 2,
        "num_key_value_heads": spec["num_key_value_heads"], "rms_norm_eps": 1e-05, "rope_theta": spec["rope_theta"],
        "tie_word_embeddings": False, "tokenizer_model_max_length": spec["tokenizer_model_max_length"],
        "tokenizer_padding_side": "right", "torch_dtype": "float16", "transformers_version": "4.37.2",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True,
        "vocab_size": spec.get("vocab_size", VOCAB),
    }
    if spec["image_aspect_ratio"] == "anyres":
        cfg["image_grid_pinpoints"] = PINPOINTS
    if spec["unfreeze_mm_vision_tower"]:
        cfg["unfreeze_mm_vision_tower"] = True
        cfg["mm_vision_tower_lr"] = 2e-06
    if spec["text"] == "llama":
        cfg.update(pretraining_tp=1, rope_scaling=None, pad_token_id=0)
    else:
        cfg.update(sliding_window=None)
    cfg.update(spec.get("config", {}))  # what a checkpoint says otherwise
    for key in spec.get("config_omit", ()):  # what an older checkpoint does not say at all
        del cfg[key]
    return dict(sorted(cfg.items()))


def save_weights(directory: Path, weights: dict, how: str) -> None:
    from safetensors.torch import save_file

    names = list(weights)
    if how == "safetensors":
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return
    if how == "bin-single":
        torch.save({n: w.contiguous() for n, w in weights.items()}, directory / "pytorch_model.bin")
        return
    # two shards, split after the first decoder layer, with the index transformers writes
    split = next(i for i, n in enumerate(names) if n.startswith("model.layers.1."))
    shards = [names[:split], names[split:]]
    ext, index_name = (("bin", "pytorch_model.bin.index.json") if how == "bin"
                       else ("safetensors", "model.safetensors.index.json"))
    prefix = "pytorch_model" if how == "bin" else "model"
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        part = {n: weights[n].contiguous() for n in shard}
        if how == "bin":
            torch.save(part, directory / fname)
        else:
            save_file(part, directory / fname, metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
            total += weights[n].numel() * weights[n].element_size()
    _write_json(directory / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_checkpoint(name: str, spec: dict, clip_vision: dict, sp_model: bytes, write_tokenizer=None) -> dict:
    """One checkpoint directory beside this file, afresh; returns its weights. `write_tokenizer(directory,
    sp_model)` replaces tokenizer_files."""
    d = HERE / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    weights = make_llm_weights(spec, clip_vision)
    save_weights(d, weights, spec["weights"])
    _write_json(d / "config.json", llm_config(name, spec))
    _write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                               "transformers_version": "4.37.2"})
    if write_tokenizer is not None:
        write_tokenizer(d, sp_model)
    else:
        tokenizer_files(d, sp_model, spec["tokenizer_model_max_length"], spec["legacy"])
    return weights


def build_checkpoints() -> dict:
    OUT_REF.mkdir(exist_ok=True)
    clip_vision = make_clip(seed=336)
    sp_model = train_tokenizer()
    stored = {name: write_checkpoint(name, spec, clip_vision, sp_model) for name, spec in CHECKPOINTS.items()}
    return {"clip_vision": clip_vision, "weights": stored}


# ----------------------------------------------------------------------------------------------- the reference run

def conv_mode_for(model_name: str) -> str:
    """The rule of the original llava/serve/cli.py and llava/eval/run_llava.py (re-stated; the module has no
    function for it)."""
    n = model_name.lower()
    if "llama-2" in n:
        return "llava_llama_2"
    if "mistral" in n:
        return "mistral_instruct"
    if "v1.6-34b" in n:
        return "chatml_direct"
    if "v1" in n:
        return "llava_v1"
    if "mpt" in n:
        return "mpt"
    return "llava_v0"


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def run_checkpoint(name: str, built: dict, extra=None, pixels_elsewhere=None) -> tuple[dict, dict]:
    """The original code on one checkpoint. `extra(tokenizer, model, image_processor)`, when given, returns more
    fields for the reference (observations particular to that checkpoint). `pixels_elsewhere` maps a checkpoint
    name to its reference: pixels equal to one of its single-image cases' are not stored again."""
    from llava.constants import (DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN,
                                 IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX, IGNORE_INDEX)
    from llava.conversation import conv_templates
    from llava.mm_utils import (get_anyres_image_grid_shape, get_model_name_from_path, process_images,
                                select_best_resolution, tokenizer_image_token)
    from llava.model.builder import load_pretrained_model
    from llava.model.llava_arch import unpad_image
    from transformers import AutoTokenizer

    path = f"tests/original/{name}"
    model_name = get_model_name_from_path(path)
    with contextlib.redirect_stdout(io.StringIO()):
        tokenizer, model, image_processor, context_len = load_pretrained_model(
            path, None, model_name, device="cpu", torch_dtype=torch.float32)
    loaded_dtype = str(next(model.parameters()).dtype)
    tower_dtype = str(model.get_vision_tower().vision_tower.dtype)
    model = model.float().eval()

    # which stored weights the original code actually uses
    sd = model.state_dict()
    for k, v in built["weights"][name].items():
        if k.startswith("model.vision_tower.") or k.endswith("rotary_emb.inv_freq"):
            continue
        assert torch.equal(sd[k], v.float()), f"{name}: {k} not loaded as stored"
    tower_sd = model.get_vision_tower().vision_tower.vision_model.state_dict()
    from_clip = all(torch.equal(tower_sd[k], v.float()) for k, v in built["clip_vision"].items())
    inside = {k[len("model.vision_tower.vision_tower.vision_model."):]: v for k, v in built["weights"][name].items()
              if k.startswith("model.vision_tower.")}
    from_inside = bool(inside) and all(torch.equal(tower_sd[k], v.float()) for k, v in inside.items())
    assert from_clip != from_inside, "the tower matches neither (or both) stored copies"

    conv_mode = conv_mode_for(model_name)
    cfg = model.config
    ref = {
        "checkpoint": name, "model_name": model_name, "conv_template": conv_mode,
        "model_class": type(model).__name__, "tokenizer_class": type(tokenizer).__name__,
        "len_tokenizer": len(tokenizer), "context_len": context_len,
        "builder_dtype_despite_torch_dtype_float32": loaded_dtype, "builder_vision_tower_dtype": tower_dtype,
        "vision_tower_weights_from": "checkpoint (model.vision_tower.vision_tower.*)" if from_inside
        else "mm_vision_tower (the CLIP directory)",
        "attn_implementation": getattr(cfg, "_attn_implementation", None),
        "image_aspect_ratio": getattr(cfg, "image_aspect_ratio", None),
        "mm_patch_merge_type": getattr(cfg, "mm_patch_merge_type", None),
        "image_grid_pinpoints": getattr(cfg, "image_grid_pinpoints", None),
        "tokenizer_model_max_length": getattr(cfg, "tokenizer_model_max_length", None),
        "image_processor": {"size": image_processor.size, "crop_size": image_processor.crop_size,
                            "image_mean": image_processor.image_mean, "image_std": image_processor.image_std,
                            "resample": int(image_processor.resample)},
        "pad_colour": [int(x * 255) for x in image_processor.image_mean],
        "max_new_tokens": MAX_NEW_TOKENS, "pixel_stride": PIXEL_STRIDE,
        "cases": [],
    }
    if extra is not None:
        ref.update(extra(tokenizer, model, image_processor))
    tensors = {}

    def render(qs: str, with_images: bool) -> str:
        if with_images:  # run_llava.py's rule
            image_text = DEFAULT_IMAGE_TOKEN
            if getattr(cfg, "mm_use_im_start_end", False):
                image_text = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
            if IMAGE_PLACEHOLDER in qs:
                qs = qs.replace(IMAGE_PLACEHOLDER, image_text)
            else:
                qs = image_text + "\n" + qs
        conv = conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    cases = [(synthetic_images.name(s), [s], QUESTION) for s in synthetic_images.SIZES]
    cases.append(("two_images", TWO_IMAGES, TWO_QUESTION))
    cases.append(("text_only", [], TEXT_QUESTION))

    pixel_sha = {}
    for case_name, sizes, question in cases:
        images = [synthetic_images.make_image(*s) for s in sizes]
        prompt = render(question, bool(images))
        input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        case = {"name": case_name, "images": [synthetic_images.name(s) for s in sizes],
                "image_rgb_sha256": [synthetic_images.image_sha256(im) for im in images],
                "question": question, "prompt": prompt, "input_ids": input_ids[0].tolist()}
        image_sizes = [im.size for im in images]  # (width, height), as the original CLI passes them
        case["image_sizes"] = [list(s) for s in image_sizes]
        if images:
            pixel = process_images(images, image_processor, cfg)
            per_image = list(pixel) if isinstance(pixel, list) else [pixel[i] for i in range(len(images))]
            case["process_images_returns"] = "list" if isinstance(pixel, list) else f"tensor{tuple(pixel.shape)}"
            case["pixel_values_shape"] = [list(p.shape) for p in per_image]
            case["pixel_values_sha256"] = [sha(p.float()) for p in per_image]
            case["pixel_values_dtype"] = str(per_image[0].dtype)
            for i, p in enumerate(per_image):
                p4 = p if p.ndim == 4 else p.unsqueeze(0)
                single = pixel_sha.get(case["images"][i])
                if single is not None:  # the same image alone: same pixels, stored once
                    assert single == case["pixel_values_sha256"][i], "pixels depend on the other images"
                    case.setdefault("pixel_values_same_as_case", []).append(case["images"][i])
                    continue
                pixel_sha[case["images"][i]] = case["pixel_values_sha256"][i]
                alone = ([case["images"][i]], [case["pixel_values_sha256"][i]])
                other = next((other for other, other_ref in (pixels_elsewhere or {}).items()
                              for c in other_ref["cases"] if (c["images"], c.get("pixel_values_sha256")) == alone),
                             None)
                if other is not None:  # the same image, processed the same way by another checkpoint
                    case.setdefault("pixel_values_same_as_checkpoint", []).append(other)
                    continue
                tensors[f"{case_name}.pixel_values_s{PIXEL_STRIDE}.{i}"] = p4[..., ::PIXEL_STRIDE, ::PIXEL_STRIDE]
                case.setdefault("pixel_values_tile_channel_mean", []).append(
                    p4.double().mean(dim=(2, 3)).tolist())
            if getattr(cfg, "image_aspect_ratio", None) == "anyres":
                case["best_resolution_wh"] = [list(select_best_resolution(s, cfg.image_grid_pinpoints))
                                              for s in image_sizes]
                tile = model.get_vision_tower().config.image_size
                grids = [get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, tile) for s in image_sizes]
                case["grid_cols_rows"] = [list(g) for g in grids]
                side = model.get_vision_tower().num_patches_per_side
                case["unpadded_rows_cols"] = [
                    list(unpad_image(torch.zeros(1, g[1] * side, g[0] * side), s).shape[1:])
                    for g, s in zip(grids, image_sizes)]
            images_arg = pixel
        else:
            images_arg = None

        with torch.no_grad():
            # the packing, seen through the original's own labels (image rows carry IGNORE_INDEX)
            if images_arg is not None:
                _, _, _, _, embeds, labels = model.prepare_inputs_labels_for_multimodal(
                    input_ids, None, None, None, input_ids.clone(), images_arg, image_sizes)
                lab = labels[0]
                is_img = lab == IGNORE_INDEX
                spans, start = [], None
                for t, flag in enumerate(is_img.tolist() + [False]):
                    if flag and start is None:
                        start = t
                    if not flag and start is not None:
                        spans.append([start, t])
                        start = None
                assert len(spans) == len(images), spans
                case["image_feature_spans"] = spans
                case["image_feature_rows"] = [b - a for a, b in spans]
                for i, (a, b) in enumerate(spans):
                    tensors[f"{case_name}.image_features_rowsum.{i}"] = embeds[0, a:b].sum(-1)
                    tensors[f"{case_name}.image_features_first_rows.{i}"] = embeds[0, a:a + 4]
                    tensors[f"{case_name}.image_features_last_rows.{i}"] = embeds[0, b - 4:b]
                seq_len = embeds.shape[1]
            else:
                seq_len = input_ids.shape[1]
            case["sequence_length"] = seq_len

            out = model(input_ids=input_ids, images=images_arg, image_sizes=image_sizes if images else None)
            logits = out.logits[0].float()
            assert logits.shape[0] == seq_len
            positions = sorted({0, seq_len - 1, *[b for a, b in case.get("image_feature_spans", [])
                                                 if b < seq_len]})
            case["logits_positions"] = positions
            tensors[f"{case_name}.logits_last"] = logits[-1]
            tensors[f"{case_name}.logits_at_positions"] = logits[positions]

            gen = model.generate(input_ids, images=images_arg, image_sizes=image_sizes if images else None,
                                 do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS, use_cache=True,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0)
            scores = torch.stack([s[0].float() for s in gen.scores])
            # transformers 4.37 starts the returned sequence with a bos placeholder when generating from
            # inputs_embeds (as LLaVA's generate does); the new tokens follow it
            assert gen.sequences[0, 0].item() == tokenizer.bos_token_id
            tokens = gen.sequences[0, 1:].tolist()
            assert int(scores[0].argmax()) == int(logits[-1].argmax()) == tokens[0]
            assert torch.allclose(scores[0], logits[-1], rtol=1e-4, atol=1e-4)
            top2 = scores.topk(2, dim=-1).values
            case["greedy_tokens"] = tokens
            case["greedy_min_top1_margin"] = float((top2[:, 0] - top2[:, 1]).min())
            case["greedy_text"] = tokenizer.batch_decode([tokens], skip_special_tokens=True)[0].strip()
            tensors[f"{case_name}.generate_scores"] = scores
        ref["cases"].append(case)
        print(f"  {name} {case_name}: seq {seq_len} rows {case.get('image_feature_rows')} "
              f"tokens {tokens} margin {case['greedy_min_top1_margin']:.3f}", flush=True)

    # tokenizers: the one the builder returned, and both transformers classes explicitly
    slow = AutoTokenizer.from_pretrained(path, use_fast=False)
    fast = AutoTokenizer.from_pretrained(path, use_fast=True)
    ref["tokenizer_probes"] = {
        "texts": TOKENIZER_PROBES,
        "builder": [tokenizer(t).input_ids for t in TOKENIZER_PROBES],
        "slow": [slow(t).input_ids for t in TOKENIZER_PROBES],
        "fast": [fast(t).input_ids for t in TOKENIZER_PROBES],
        "slow_class": type(slow).__name__, "fast_class": type(fast).__name__,
        "decode_slow": [slow.decode(slow(t).input_ids, skip_special_tokens=True) for t in TOKENIZER_PROBES],
        "decode_fast": [fast.decode(fast(t).input_ids, skip_special_tokens=True) for t in TOKENIZER_PROBES],
        "image_token_chunks": {  # how tokenizer_image_token sees "<image>" inside text
            t: tokenizer_image_token(t, tokenizer) for t in
            ["<image>\nDescribe", "A<image>B", "<image><image>", "USER: <image>\nHi ASSISTANT:"]},
    }
    return ref, tensors


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _render(conv) -> str:
    try:
        return conv.get_prompt()
    except Exception as e:  # recorded as observed (the plain template cannot render a second turn)
        return f"ERROR {type(e).__name__}: {e}"


def record_templates() -> dict:
    """Every conversation template of this version, rendered as the original renders it."""
    from llava.conversation import SeparatorStyle, conv_templates

    out = {}
    for name, template in conv_templates.items():
        one = template.copy()
        one.append_message(one.roles[0], "<image>\nWhat is this?")
        one.append_message(one.roles[1], None)
        two = template.copy()
        two.append_message(two.roles[0], "<image>\nWhat is this?")
        two.append_message(two.roles[1], "A red circle.")
        two.append_message(two.roles[0], "And the colour?")
        two.append_message(two.roles[1], None)
        out[name] = {
            "sep_style": template.sep_style.name, "system": template.system, "roles": list(template.roles),
            "sep": template.sep, "sep2": template.sep2, "version": template.version,
            "preset_messages": len(template.messages),
            "stop_str (cli.py)": template.sep if template.sep_style != SeparatorStyle.TWO else template.sep2,
            "one_turn": _render(one), "two_turns": _render(two),
        }
    return {"cli_rule": "llama-2 -> llava_llama_2; mistral -> mistral_instruct; v1.6-34b -> chatml_direct; "
                        "v1 -> llava_v1; mpt -> mpt; else llava_v0 (first match, on the lower-cased model name)",
            "cli_rule_examples": {n: conv_mode_for(n) for n in [
                "llava-v1.5-7b", "llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b", "llava-v1.6-34b",
                "llava-llama-2-13b-chat-lightning-preview", "llava-v1-0719-336px-lora-merge-vicuna-13b-v1.3",
                "LLaVA-Lightning-MPT-7B-preview", "llava-13b-v0"]},
            "templates": out}


def main() -> None:
    os.chdir(HERE.parent.parent)  # mm_vision_tower and the model paths are relative to the repository root
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    from safetensors.torch import save_file

    built = build_checkpoints()
    _write_json(OUT_REF / "templates.json", record_templates())
    for name in CHECKPOINTS:
        ref, tensors = run_checkpoint(name, built)
        _write_json(OUT_REF / f"{name}.json", ref)
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, OUT_REF / f"{name}.safetensors")


if __name__ == "__main__":
    main()
