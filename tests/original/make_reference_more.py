"""Three more tiny checkpoints in the ORIGINAL LLaVA layout, and the original code's outputs on them.

The companion of `make_reference.py` (same environment, same helpers, same cases and recorded fields; read its
docstring first). It covers what the first three checkpoints do not:

- `llava-v0-tiny`: the first LLaVA's kind of model, its config written as those were (no mm_projector_type,
  image_aspect_ratio, mm_patch_merge_type, mm_vision_select_feature or mm_use_im_patch_token, so the original's
  defaults apply: `linear`, square, flat, patch, and the `<im_patch>` token), `mm_use_im_start_end: true`,
  `max_sequence_length` instead of max_position_embeddings, no rope_theta or num_key_value_heads; a 224 px tower
  (`clip-tiny-224/`, patch 14: 256 patches); one `pytorch_model.bin` with the `rotary_emb.inv_freq` buffers; the
  tokenizer as llava 1.2.2's train.py saves it for `--version v0` (`[PAD]` added as the pad token, then
  `<im_patch>`, `<im_start>`, `<im_end>`: ids 1000-1003 in `added_tokens.json`, the embedding grown to 1004 rows),
  no `legacy` in tokenizer_config.json (transformers 4.37's default: legacy);
- `llava-v1.6-spatial-tiny`: anyres with `mm_patch_merge_type: spatial` (no unpadding, no newline), an
  `mlp3x_gelu` projector, two `pytorch_model-*.bin` shards with the trained tower inside
  (`unfreeze_mm_vision_tower`), conversation template llava_v1;
- `llava-llama-2-flat-tiny`: anyres with `mm_patch_merge_type: flat` and `mm_vision_select_feature: cls_patch`
  (577 rows per tile, every tile in a row), template llava_llama_2 (the name's "llama-2").

Each reference also records what the loaded model is (`observed`: tower geometry, projector, embedding rows,
added tokens, the text config's defaults), and the spatial one what the original does with `cls_patch` under
`spatial` packing (`cls_patch_with_spatial`).

Command (from the repository root, after make_reference.py has written clip-tiny-336/; about a minute):

    .venv-llava-orig/bin/python tests/original/make_reference_more.py

It rewrites only clip-tiny-224/, the three checkpoints above and their reference/ files. Two runs write
byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_reference as mr  # noqa: E402
import synthetic_images  # noqa: E402

CLIP_224_DIR = HERE / "clip-tiny-224"
CLIP_224_REL = "tests/original/clip-tiny-224"

# the fields of make_reference.CHECKPOINTS, plus: tower (mm_vision_tower), mm_projector_type, vocab_size,
# hidden_size, intermediate_size (smaller text models than the first three, to keep the files small), config
# (values written into config.json), config_omit (keys left out), tokenizer ("builder-files" as make_reference
# writes them, or "v0": see v0_tokenizer)
CHECKPOINTS = {
    "llava-v0-tiny": dict(
        text="llama", model_type="llava", seed=46, weights="bin-single", rope_theta=10000.0,
        max_position_embeddings=2048, num_key_value_heads=4, tokenizer_model_max_length=2048,
        image_aspect_ratio="square", mm_patch_merge_type="flat", unfreeze_mm_vision_tower=False,
        tower_inside=False, legacy=None, rotary_inv_freq=True, tower=CLIP_224_REL, mm_projector_type="linear",
        vocab_size=1004, tokenizer="v0", hidden_size=48, intermediate_size=96,
        config={"mm_use_im_start_end": True, "max_sequence_length": 2048, "rms_norm_eps": 1e-06,
                "sep_image_conv_front": False, "transformers_version": "4.28.0.dev0"},
        config_omit=("mm_projector_type", "image_aspect_ratio", "mm_patch_merge_type", "mm_vision_select_feature",
                     "mm_use_im_patch_token", "mm_projector_lr", "tokenizer_model_max_length",
                     "tokenizer_padding_side", "max_position_embeddings", "num_key_value_heads", "rope_theta",
                     "rope_scaling", "pretraining_tp", "attention_bias", "attention_dropout"),
    ),
    "llava-v1.6-spatial-tiny": dict(
        text="llama", model_type="llava_llama", seed=43, weights="bin", rope_theta=10000.0,
        max_position_embeddings=4096, num_key_value_heads=4, tokenizer_model_max_length=4096,
        image_aspect_ratio="anyres", mm_patch_merge_type="spatial", unfreeze_mm_vision_tower=True,
        tower_inside=True, legacy=False, rotary_inv_freq=False, mm_projector_type="mlp3x_gelu",
        tokenizer="builder-files", hidden_size=32, intermediate_size=64,
    ),
    "llava-llama-2-flat-tiny": dict(
        text="llama", model_type="llava_llama", seed=45, weights="safetensors", rope_theta=10000.0,
        max_position_embeddings=8192, num_key_value_heads=4, tokenizer_model_max_length=8192,
        image_aspect_ratio="anyres", mm_patch_merge_type="flat", unfreeze_mm_vision_tower=False,
        tower_inside=False, legacy=False, rotary_inv_freq=False, tokenizer="builder-files",
        hidden_size=32, intermediate_size=64,
        config={"mm_vision_select_feature": "cls_patch"},
    ),
}


def v0_tokenizer(directory: Path, sp_model: bytes) -> None:
    """The tokenizer as the first LLaVA's training leaves it (llava 1.2.2's train.py does the same for
    `--version v0`): `[PAD]` added as the pad token (smart_tokenizer_and_embedding_resize), then
    initialize_vision_tokenizer's `<im_patch>`, `<im_start>`, `<im_end>`: ids 1000-1003. Written as transformers
    before 4.34 wrote it (the config says 4.28): the added tokens only in added_tokens.json (tokenizer_config.json
    has no added_tokens_decoder), the pad token named in special_tokens_map.json, no `legacy`."""
    from transformers import AutoTokenizer

    base, saved = directory / "base-tokenizer", directory / "saved-tokenizer"
    base.mkdir()
    mr.tokenizer_files(base, sp_model, 2048, legacy=False)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["legacy"]
    specials = json.loads((base / "special_tokens_map.json").read_text())
    del specials["pad_token"]  # llama's own tokenizer has none
    mr._write_json(base / "tokenizer_config.json", config)
    mr._write_json(base / "special_tokens_map.json", specials)
    tokenizer = AutoTokenizer.from_pretrained(base, use_fast=False, model_max_length=2048, padding_side="right")
    assert tokenizer.pad_token is None
    tokenizer.add_special_tokens(dict(pad_token="[PAD]"))
    tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    tokenizer.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    tokenizer.save_pretrained(saved)
    shutil.copy(saved / "added_tokens.json", directory / "added_tokens.json")
    shutil.copy(base / "tokenizer.model", directory / "tokenizer.model")
    mr._write_json(directory / "tokenizer_config.json", config)
    mr._write_json(directory / "special_tokens_map.json", {**specials, "pad_token": "[PAD]"})
    shutil.rmtree(base)
    shutil.rmtree(saved)
    reread = AutoTokenizer.from_pretrained(directory, use_fast=False)
    assert reread.get_added_vocab() == tokenizer.get_added_vocab() and reread.pad_token == "[PAD]"
    assert [reread.get_added_vocab()[t] for t in ("[PAD]", "<im_patch>", "<im_start>", "<im_end>")] == [1000, 1001,
                                                                                                     1002, 1003]


def tower_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    stored = load_file(str(directory / "model.safetensors"))
    return {k[len("vision_model."):]: v for k, v in stored.items() if k.startswith("vision_model.")}


def build() -> dict:
    clip_224 = mr.make_clip(seed=224, image_size=224, directory=CLIP_224_DIR)
    clip_336 = tower_weights(mr.CLIP_DIR)  # make_reference.py's, read as written
    sp_model = mr.train_tokenizer()
    assert sp_model == (HERE / "llava-v1.5-tiny" / "tokenizer.model").read_bytes()
    built = {}
    for name, spec in CHECKPOINTS.items():
        clip = clip_224 if spec.get("tower") == CLIP_224_REL else clip_336
        weights = mr.write_checkpoint(name, spec, clip, sp_model, v0_tokenizer if spec["tokenizer"] == "v0" else None)
        built[name] = {"clip_vision": clip, "weights": {name: weights}}
    return built


def observe(tokenizer, model, image_processor) -> dict:
    """What the original builder made of the checkpoint."""
    tower, cfg = model.get_vision_tower(), model.config
    added = tokenizer.get_added_vocab()
    return {"observed": {
        "vision_tower_image_size": tower.config.image_size, "vision_tower_patch_size": tower.config.patch_size,
        "num_patches_per_side": tower.num_patches_per_side, "select_feature": tower.select_feature,
        "select_layer": tower.select_layer, "mm_projector": str(model.get_model().mm_projector),
        "has_image_newline": hasattr(model.get_model(), "image_newline"),
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "lm_head_rows": model.get_output_embeddings().weight.shape[0],
        "added_vocab": dict(sorted(added.items(), key=lambda kv: kv[1])),
        "pad_token": tokenizer.pad_token, "tokenizer_legacy": getattr(tokenizer, "legacy", None),
        "text_config": {k: getattr(cfg, k, None) for k in (
            "max_position_embeddings", "max_sequence_length", "num_key_value_heads", "rope_theta", "rms_norm_eps",
            "mm_use_im_start_end", "mm_use_im_patch_token", "image_aspect_ratio", "mm_patch_merge_type",
            "mm_projector_type", "mm_vision_select_feature")},
    }}


V0_PROBE = "Hi [PAD] there <im_start><image><im_end>\nDescribe the image in detail."


def observe_v0(tokenizer, model, image_processor) -> dict:
    """Also the same tokenizer files with the pad token not named in special_tokens_map.json: transformers still
    gives added_tokens.json's tokens their ids there (as plain tokens, not special), and the builder's tokens,
    already present, keep theirs."""
    import tempfile

    from llava.mm_utils import tokenizer_image_token
    from transformers import AutoTokenizer

    out = observe(tokenizer, model, image_processor)
    d = HERE / "llava-v0-tiny"
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json"):
            shutil.copy(d / f, Path(tmp) / f)
        specials = json.loads((d / "special_tokens_map.json").read_text())
        del specials["pad_token"]
        mr._write_json(Path(tmp) / "special_tokens_map.json", specials)
        variant = AutoTokenizer.from_pretrained(tmp, use_fast=False)
        variant.add_tokens(["<im_patch>"], special_tokens=True)  # the builder, as for this config
        variant.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
        probes = [V0_PROBE, mr.QUESTION]
        out["pad_token_not_named"] = {
            "change": "special_tokens_map.json without pad_token",
            "added_vocab": dict(sorted(variant.get_added_vocab().items(), key=lambda kv: kv[1])),
            "special_added_tokens": sorted(t for t in variant.get_added_vocab() if t in variant.all_special_tokens),
            "pad_token": variant.pad_token, "len_tokenizer": len(variant),
            "probes": probes,
            "image_token_ids": [tokenizer_image_token(t, variant) for t in probes],
            "decode_skip_special": [variant.decode(variant(t).input_ids, skip_special_tokens=True) for t in probes],
            "same_probe_with_the_checkpoint_files": tokenizer_image_token(V0_PROBE, tokenizer),
            "decode_skip_special_with_the_checkpoint_files": [
                tokenizer.decode(tokenizer(t).input_ids, skip_special_tokens=True) for t in probes],
            "special_added_tokens_with_the_checkpoint_files": sorted(
                t for t in tokenizer.get_added_vocab() if t in tokenizer.all_special_tokens),
        }
    return out


def observe_cls_patch_with_spatial(tokenizer, model, image_processor) -> dict:
    """The same model with mm_vision_select_feature cls_patch: what `spatial` packing does with 577-row tiles."""
    from llava.mm_utils import process_images

    out = observe(tokenizer, model, image_processor)
    tower = model.get_vision_tower()
    image = synthetic_images.make_image(500, 316)
    pixel = process_images([image], image_processor, model.config)
    ids = torch.tensor([[1, -200, 306]])
    tower.select_feature = "cls_patch"
    try:
        with torch.no_grad():
            model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, pixel, [image.size])
        outcome = "no error"
    except Exception as e:  # recorded as observed
        outcome = f"{type(e).__name__}: {e}".rstrip(": ")
    finally:
        tower.select_feature = "patch"
    out["cls_patch_with_spatial"] = {"image": "500x316", "outcome": outcome}
    return out


def observe_truncation(tokenizer, model, image_processor) -> dict:
    """The two_images case with tokenizer_model_max_length 4096 (what LLaVA-1.6 configs say; this checkpoint says
    8192 so that its cases run whole): the original cuts the merged sequence there."""
    from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    out = observe(tokenizer, model, image_processor)
    images = [synthetic_images.make_image(*s) for s in mr.TWO_IMAGES]
    conv = conv_templates["llava_llama_2"].copy()
    conv.append_message(conv.roles[0], mr.TWO_QUESTION.replace("<image-placeholder>", "<image>"))
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixel = process_images(images, image_processor, model.config)
    saved, model.config.tokenizer_model_max_length = model.config.tokenizer_model_max_length, 4096
    try:
        with torch.no_grad():
            *_, embeds, labels = model.prepare_inputs_labels_for_multimodal(
                ids, None, None, None, ids.clone(), pixel, [im.size for im in images])
    finally:
        model.config.tokenizer_model_max_length = saved
    is_image = (labels[0] == IGNORE_INDEX).tolist()
    spans = [[i, i + 1] for i, flag in enumerate(is_image) if flag and (i == 0 or not is_image[i - 1])]
    for span in spans:
        while span[1] < len(is_image) and is_image[span[1]]:
            span[1] += 1
    out["truncation_at_4096"] = {
        "case": "two_images", "tokenizer_model_max_length": 4096, "sequence_length": embeds.shape[1],
        "image_feature_spans": spans, "text_tokens_kept": is_image.count(False),
        "text_tokens_in_prompt": int((ids[0] != IMAGE_TOKEN_INDEX).sum()),
    }
    return out


def observe_pad_with_spatial_unpad() -> dict:
    """llava-v1.5-tiny with mm_patch_merge_type spatial_unpad and a model.image_newline weight (a pad model
    trained with LLaVA-1.6 settings): the original builds and loads the newline but packs pad images flat."""
    import contextlib
    import io
    import tempfile

    from llava.constants import IGNORE_INDEX
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model
    from safetensors.torch import load_file

    base = json.loads((mr.OUT_REF / "llava-v1.5-tiny.json").read_text())
    case = next(c for c in base["cases"] if c["name"] == "500x316")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "llava-v1.5-unpad-tiny"
        shutil.copytree(HERE / "llava-v1.5-tiny", d)
        config = json.loads((d / "config.json").read_text())
        config["mm_patch_merge_type"] = "spatial_unpad"
        mr._write_json(d / "config.json", config)
        newline = (torch.arange(mr.HIDDEN, dtype=torch.float32) / mr.HIDDEN).half()
        shard = "pytorch_model-00002-of-00002.bin"
        state = torch.load(d / shard, weights_only=True)
        state["model.image_newline"] = newline
        torch.save(state, d / shard)
        index = json.loads((d / "pytorch_model.bin.index.json").read_text())
        index["weight_map"]["model.image_newline"] = shard
        mr._write_json(d / "pytorch_model.bin.index.json", index)
        with contextlib.redirect_stdout(io.StringIO()):
            tokenizer, model, image_processor, _ = load_pretrained_model(str(d), None, d.name, device="cpu")
        model = model.float().eval()
        image = synthetic_images.make_image(500, 316)
        ids = torch.tensor([case["input_ids"]])
        pixel = process_images([image], image_processor, model.config)
        with torch.no_grad():
            *_, labels = model.prepare_inputs_labels_for_multimodal(ids, None, None, None, ids.clone(), pixel,
                                                                    [image.size])
            logits = model(input_ids=ids, images=pixel, image_sizes=[image.size]).logits[0, -1]
    flat = load_file(str(mr.OUT_REF / "llava-v1.5-tiny.safetensors"))["500x316.logits_last"]
    return {
        "what": "llava-v1.5-tiny (pad) with mm_patch_merge_type spatial_unpad and a model.image_newline weight",
        "image_newline_loaded": bool(torch.equal(model.get_model().image_newline, newline.float())),
        "case": "500x316", "image_feature_rows": int((labels[0] == IGNORE_INDEX).sum()),
        "logits_last_max_abs_diff_from_the_flat_reference": float((logits - flat).abs().max()),
    }


def main() -> None:
    os.chdir(HERE.parent.parent)  # mm_vision_tower and the model paths are relative to the repository root
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    from safetensors.torch import save_file

    built = build()
    # the anyres checkpoints here process images as this one does: their pixels are stored there
    elsewhere = {"llava-v1.6-vicuna-tiny": json.loads((mr.OUT_REF / "llava-v1.6-vicuna-tiny.json").read_text())}
    extras = {"llava-v0-tiny": observe_v0, "llava-v1.6-spatial-tiny": observe_cls_patch_with_spatial,
              "llava-llama-2-flat-tiny": observe_truncation}
    for name in CHECKPOINTS:
        ref, tensors = mr.run_checkpoint(name, built[name], extras.get(name, observe), elsewhere)
        mr._write_json(mr.OUT_REF / f"{name}.json", ref)
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
                  mr.OUT_REF / f"{name}.safetensors")
    mr._write_json(mr.OUT_REF / "observations.json", {"pad_with_spatial_unpad": observe_pad_with_spatial_unpad()})


if __name__ == "__main__":
    main()
