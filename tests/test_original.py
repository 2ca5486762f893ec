"""Checkpoints in the original LLaVA repositories' layout against the original code's own outputs.

tests/original/ holds tiny checkpoints in that layout and what llava-torch 1.2.2 (the original code) computed on
them (tests/original/README.md): prompts, input ids, pixels, packed image features, float32 logits and greedy
tokens. Loaded here directly, everything must agree: identical ids and pixels, logits within 1e-4, identical
greedy tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
import pytest
import torch
from safetensors.torch import load_file

import llava_next
from llava_next.checkpoint import CheckpointError
from llava_next.errors import LlavaError

ORIGINAL = Path(__file__).resolve().parent / "original"
sys.path.insert(0, str(ORIGINAL))
from synthetic_images import image_sha256, make_image  # noqa: E402

# make_reference.py's three, then make_reference_more.py's: the first LLaVA's kind (224 px tower, linear projector,
# <im_start>/<im_end>, square), anyres with spatial packing (mlp3x_gelu, .bin shards with the tower inside), anyres
# with flat packing and cls_patch
CHECKPOINTS = ["llava-v1.5-tiny", "llava-v1.6-vicuna-tiny", "llava-v1.6-mistral-tiny",
               "llava-v0-tiny", "llava-v1.6-spatial-tiny", "llava-llama-2-flat-tiny"]
CONVERTIBLE = CHECKPOINTS[:3]  # the llava-hf layout cannot say what the others ask for
MORE = CHECKPOINTS[3:]
TOWER = ORIGINAL / "clip-tiny-336"


def tower_of(checkpoint: str) -> Path:
    """The CLIP directory the checkpoint's mm_vision_tower names (relative to the repository root)."""
    config = json.loads((ORIGINAL / checkpoint / "config.json").read_text())
    return ORIGINAL.parent.parent / config["mm_vision_tower"]


def reference(checkpoint: str) -> dict:
    return json.loads((ORIGINAL / "reference" / f"{checkpoint}.json").read_text())


CASES = [(c, case["name"]) for c in CHECKPOINTS for case in reference(c)["cases"]]


@pytest.fixture(scope="module")
def loaded():
    cache: dict[str, tuple] = {}

    def get(checkpoint: str):
        if checkpoint not in cache:
            pipe = llava_next.load(ORIGINAL / checkpoint, dtype="float32", progress=False,
                                   vision_tower=tower_of(checkpoint), image_cache_bytes=0, prefix_cache=False)
            cache[checkpoint] = (pipe, reference(checkpoint),
                                 load_file(str(ORIGINAL / "reference" / f"{checkpoint}.safetensors")))
        return cache[checkpoint]

    return get


def case_of(ref: dict, name: str) -> dict:
    return next(c for c in ref["cases"] if c["name"] == name)


@functools.lru_cache(maxsize=None)
def picture(label: str) -> tuple[Image.Image, str]:
    """The synthetic image named "WxH" and its RGB digest, drawn once for every test that uses it."""
    width, height = (int(x) for x in label.split("x"))
    image = make_image(width, height)
    return image, image_sha256(image)


def images_of(case: dict) -> list:
    images = []
    for label, digest in zip(case["images"], case["image_rgb_sha256"]):
        image, drawn = picture(label)
        assert drawn == digest  # the same picture the original code saw
        images.append(image)
    return images


def prepared(loaded, checkpoint: str, name: str):
    """One reference case on its loaded checkpoint: (pipe, case, images, prompt text, reference tensors)."""
    pipe, ref, tensors = loaded(checkpoint)
    case = case_of(ref, name)
    images = images_of(case)
    text, _ = pipe.prompt_text(messages_of(case), images)
    return pipe, case, images, text, tensors


def messages_of(case: dict) -> list[dict]:
    # run_llava.py puts the images first ("<image-placeholder>" in a question marks where, here always in front)
    question = case["question"].replace("<image-placeholder>\n", "")
    content = [{"type": "image"} for _ in case["images"]] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def pixel_digest(pixels: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels.float().numpy()).tobytes()).hexdigest()


@pytest.mark.parametrize("checkpoint,name", CASES)
def test_prompt_ids_and_pixels_are_the_originals(loaded, checkpoint, name):
    pipe, case, images, text, _ = prepared(loaded, checkpoint, name)
    assert text == case["prompt"]
    marker = pipe.config.image_token_id
    ids = pipe.processor.tokenizer.encode(text)
    assert [-200 if t == marker else t for t in ids] == case["input_ids"]
    inputs = pipe.processor(text, images)
    assert inputs["input_ids"].shape[1] == case["sequence_length"]
    spans = []
    row = inputs["input_ids"][0].tolist()
    for i, t in enumerate(row):
        if t == marker and (i == 0 or row[i - 1] != marker):
            spans.append([i, i])
        if t == marker:
            spans[-1][1] = i + 1
    assert spans == case.get("image_feature_spans", [])
    assert [pipe.processor.image_tokens((im.height, im.width)) for im in images] == case.get("image_feature_rows", [])
    for image, digest, shape in zip(images, case.get("pixel_values_sha256", []), case.get("pixel_values_shape", [])):
        pixels = pipe.processor.image_processor([image])["pixel_values"][0]
        assert list(pixels.shape) == shape
        assert pixel_digest(pixels) == digest


@pytest.mark.parametrize("checkpoint,name", CASES)
def test_image_features_and_logits_are_the_originals_within_1e4(loaded, checkpoint, name):
    pipe, case, images, text, tensors = prepared(loaded, checkpoint, name)
    inputs = pipe.processor(text, images)
    with torch.inference_mode():
        if images:
            features = pipe.model.image_features(inputs["pixel_values"], inputs.get("image_sizes"))
            for i, f in enumerate(features):
                rowsum = tensors[f"{name}.image_features_rowsum.{i}"]  # recorded for every image of every case
                assert f.shape[0] == rowsum.shape[0]
                torch.testing.assert_close(f.sum(-1), rowsum, atol=1e-4, rtol=0)
                torch.testing.assert_close(f[:4], tensors[f"{name}.image_features_first_rows.{i}"], atol=1e-4, rtol=0)
                torch.testing.assert_close(f[-4:], tensors[f"{name}.image_features_last_rows.{i}"], atol=1e-4, rtol=0)
        logits = pipe.model(inputs["input_ids"], pixel_values=inputs.get("pixel_values"),
                            image_sizes=inputs.get("image_sizes"))[0]
    torch.testing.assert_close(logits[-1], tensors[f"{name}.logits_last"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[case["logits_positions"]], tensors[f"{name}.logits_at_positions"],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("checkpoint,name", CASES)
def test_greedy_answers_are_the_originals(loaded, checkpoint, name):
    pipe, case, images, _, _ = prepared(loaded, checkpoint, name)
    got = pipe.generate(messages_of(case), images, max_new_tokens=len(case["greedy_tokens"]))
    assert got.token_ids == case["greedy_tokens"]


@pytest.mark.parametrize("checkpoint", ["llava-v1.6-mistral-tiny", "llava-v0-tiny"])
def test_the_tower_named_by_the_config_is_found_from_the_working_directory(monkeypatch, checkpoint):
    # mm_vision_tower is "tests/original/clip-tiny-336" (-224), relative to the repository root, as the original
    # resolves it
    monkeypatch.chdir(ORIGINAL.parent.parent)
    pipe = llava_next.load(ORIGINAL / checkpoint, dtype="float32", progress=False)
    assert pipe.original.tower_directory.resolve() == tower_of(checkpoint).resolve()
    assert pipe.original.conv_template == reference(checkpoint)["conv_template"]


@pytest.mark.parametrize("checkpoint", MORE)
def test_the_model_is_what_the_original_builder_made_of_the_checkpoint(loaded, checkpoint):
    # make_reference_more.py recorded what the original built: tower geometry, projector, embedding rows, added
    # tokens and the text config's defaults (the v0 config leaves most mm_* fields and rope_theta,
    # num_key_value_heads, max_position_embeddings out)
    pipe, ref, _ = loaded(checkpoint)
    seen, cfg, layout = ref["observed"], pipe.config, pipe.original
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (seen["vision_tower_image_size"],
                                                              seen["vision_tower_patch_size"])
    assert cfg.vision_feature_select_strategy == {"patch": "default", "cls_patch": "full"}[seen["select_feature"]]
    assert cfg.vision_feature_layer == seen["select_layer"]
    linears = [n for n, _ in pipe.model.multi_modal_projector.named_children() if n.startswith("linear_")]
    assert len(linears) == seen["mm_projector"].count("Linear(")
    assert (getattr(pipe.model, "image_newline", None) is not None) == seen["has_image_newline"]
    assert pipe.model.language_model.embed_tokens.weight.shape[0] == seen["embedding_rows"]
    assert pipe.model.lm_head.weight.shape[0] == seen["lm_head_rows"]
    tokenizer = pipe.processor.tokenizer
    assert {t: tokenizer.backend.token_to_id(t) for t in seen["added_vocab"]} == seen["added_vocab"]
    assert tokenizer.special_tokens["pad_token"] == seen["pad_token"]
    text = seen["text_config"]
    assert (cfg.text.max_position_embeddings, cfg.text.num_kv_heads, cfg.text.rope.theta, cfg.text.rms_norm_eps) == (
        text["max_position_embeddings"], text["num_key_value_heads"], text["rope_theta"], text["rms_norm_eps"])
    assert layout.conv_template == ref["conv_template"]
    assert layout.tower_weights == ("checkpoint" if ref["vision_tower_weights_from"].startswith("checkpoint")
                                    else "mm_vision_tower")
    assert layout.use_im_start_end == bool(text["mm_use_im_start_end"])
    assert pipe.processor.tokenizer.vocab_size == ref["len_tokenizer"]


def test_cls_patch_under_spatial_packing_is_refused_where_the_original_fails(tmp_path):
    # The original's spatial packing asserts 576 rows per tile; cls_patch gives 577 (recorded: AssertionError).
    import shutil

    assert reference("llava-v1.6-spatial-tiny")["cls_patch_with_spatial"]["outcome"] == "AssertionError"
    for merge in ("spatial", "spatial_unpad"):
        target = tmp_path / merge / "llava-v1.6-spatial-tiny"
        shutil.copytree(ORIGINAL / "llava-v1.6-spatial-tiny", target)
        config = json.loads((target / "config.json").read_text())
        config.update(mm_vision_select_feature="cls_patch", mm_patch_merge_type=merge)
        (target / "config.json").write_text(json.dumps(config))
        with pytest.raises(LlavaError, match="cls_patch.*flat"):
            llava_next.load(target, progress=False, vision_tower=TOWER)


def test_added_tokens_json_alone_gives_the_tokens_their_ids(loaded, tmp_path):
    # Tokenizers written by transformers < 4.34 keep added tokens only in added_tokens.json (llava-v0-tiny's are
    # so written). Its pad token [PAD] is named in special_tokens_map.json; with it not named there, transformers
    # still reads [PAD] at 1000 (and the builder's tokens, already present, keep 1001-1003). Tokens named nowhere
    # are not special: decoding keeps them, the builder's <im_start> and <im_end> included.
    import shutil

    probe = reference("llava-v0-tiny")["pad_token_not_named"]
    checkpoint_tokenizer = loaded("llava-v0-tiny")[0].processor.tokenizer
    for text, expected in zip(probe["probes"], probe["decode_skip_special_with_the_checkpoint_files"]):
        ids = checkpoint_tokenizer.backend.encode(text).ids  # <image> as plain text, as the original's tokenizer(t)
        assert checkpoint_tokenizer.decode(ids, skip_special_tokens=True) == expected
    target = tmp_path / "llava-v0-tiny"
    shutil.copytree(ORIGINAL / "llava-v0-tiny", target)
    specials = json.loads((target / "special_tokens_map.json").read_text())
    del specials["pad_token"]
    (target / "special_tokens_map.json").write_text(json.dumps(specials))
    pipe = llava_next.load(target, dtype="float32", progress=False, vision_tower=tower_of("llava-v0-tiny"))
    tokenizer = pipe.processor.tokenizer
    assert {t: tokenizer.backend.token_to_id(t) for t in probe["added_vocab"]} == probe["added_vocab"]
    assert tokenizer.vocab_size == probe["len_tokenizer"]
    for text, expected in zip(probe["probes"], probe["image_token_ids"]):
        ids = tokenizer.encode(text)
        assert [-200 if t == pipe.config.image_token_id else t for t in ids] == expected
    assert probe["same_probe_with_the_checkpoint_files"] == probe["image_token_ids"][0]
    for text, expected in zip(probe["probes"], probe["decode_skip_special"]):
        assert tokenizer.decode(tokenizer.backend.encode(text).ids, skip_special_tokens=True) == expected


def test_an_image_newline_that_pad_images_never_use_is_loaded_and_left_unused(loaded, tmp_path):
    # A pad model trained with mm_patch_merge_type spatial_unpad carries model.image_newline: the original loads it
    # and packs pad images flat all the same (recorded: 576 rows, the flat logits exactly)
    import shutil

    seen = json.loads((ORIGINAL / "reference" / "observations.json").read_text())["pad_with_spatial_unpad"]
    assert seen["image_newline_loaded"] and seen["logits_last_max_abs_diff_from_the_flat_reference"] == 0.0
    target = tmp_path / "llava-v1.5-unpad-tiny"
    shutil.copytree(ORIGINAL / "llava-v1.5-tiny", target)
    config = json.loads((target / "config.json").read_text())
    config["mm_patch_merge_type"] = "spatial_unpad"
    (target / "config.json").write_text(json.dumps(config))
    shard = target / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.image_newline"] = torch.ones(64, dtype=torch.float16)
    torch.save(state, shard)
    index = json.loads((target / "pytorch_model.bin.index.json").read_text())
    index["weight_map"]["model.image_newline"] = shard.name
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    pipe = llava_next.load(target, dtype="float32", progress=False, vision_tower=TOWER)
    _, ref, tensors = loaded("llava-v1.5-tiny")
    case = case_of(ref, seen["case"])
    images = images_of(case)
    inputs = pipe.processor(pipe.prompt_text(messages_of(case), images)[0], images)
    assert inputs["input_ids"].shape[1] == case["sequence_length"]
    with torch.inference_mode():
        logits = pipe.model(inputs["input_ids"], pixel_values=inputs["pixel_values"])[0]
    torch.testing.assert_close(logits[-1], tensors[f"{case['name']}.logits_last"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("checkpoint", MORE)
def test_what_the_llava_hf_layout_cannot_say_is_not_converted(checkpoint, tmp_path):
    from llava_next.convert import ConvertError, convert

    reason = {"llava-v0-tiny": "projector is linear", "llava-v1.6-spatial-tiny": "projector is mlp3x_gelu",
              "llava-llama-2-flat-tiny": "mm_patch_merge_type 'flat'"}[checkpoint]
    with pytest.raises(ConvertError, match=reason):
        convert(ORIGINAL / checkpoint, tmp_path / "hf", vision_tower=tower_of(checkpoint))


def test_a_missing_tower_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="vision tower.*--vision-tower"):
        llava_next.load(ORIGINAL / "llava-v1.5-tiny", progress=False, vision_tower=tmp_path / "nowhere")


@pytest.mark.parametrize("checkpoint", CONVERTIBLE)
def test_converted_checkpoint_loads_in_transformers_with_our_logits(checkpoint, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from llava_next.convert import convert

    out, changes = convert(ORIGINAL / checkpoint, tmp_path / "hf", vision_tower=TOWER)
    assert any("tokenized whole" in c for c in changes)
    assert any("int(x)" in c for c in changes) == (checkpoint != "llava-v1.5-tiny")
    ours = llava_next.load(out, dtype="float32", progress=False)
    image = make_image(500, 316)  # a size where the original's and transformers' geometry agree
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    processor = AutoProcessor.from_pretrained(out)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == ours.prompt_text(messages, [image])[0]
    batch = processor(text=prompt, images=[image], return_tensors="pt")
    mine = ours.processor(prompt, [image])
    assert torch.equal(batch["input_ids"], mine["input_ids"])
    torch.testing.assert_close(batch["pixel_values"], mine["pixel_values"], atol=0, rtol=0)
    cls = LlavaForConditionalGeneration if checkpoint == "llava-v1.5-tiny" else LlavaNextForConditionalGeneration
    model = cls.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = model(**batch).logits[0]
        logits = ours.model(mine["input_ids"], pixel_values=mine["pixel_values"], image_sizes=mine.get("image_sizes"))[0]
        # the original-layout model on the same ids: the same weights, only the rotary tables' rounding differs
        original = llava_next.load(ORIGINAL / checkpoint, dtype="float32", progress=False, vision_tower=TOWER)
        before = original.model(mine["input_ids"], pixel_values=mine["pixel_values"],
                                image_sizes=mine.get("image_sizes"))[0]
    torch.testing.assert_close(logits, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(before, logits[:, :-1], atol=5e-3, rtol=0)  # (the added <image> row)


def test_info_shows_the_layout_and_the_rules_in_effect(capsys):
    from llava_next.cli import main

    assert main(["info", "--model", str(ORIGINAL / "llava-v1.6-vicuna-tiny"), "--vision-tower", str(TOWER),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "original"
    assert info["rules"]["conversation template"] == "llava_v1"
    assert "int(x)" in info["rules"]["unpad"] and "1 column x 2 rows" in info["rules"]["pinpoints"]
    assert info["image_grid_pinpoints"][0] == [672, 336]  # 336 wide, 672 tall, as the original reads [336, 672]


def test_an_unknown_conversation_template_lists_the_known_ones():
    with pytest.raises(LlavaError, match="llava_v1.*mistral_instruct|mistral_instruct.*llava_v1"):
        llava_next.load(ORIGINAL / "llava-v1.5-tiny", progress=False, vision_tower=TOWER, conv_template="nonesuch")


def test_pinpoint_ranges_of_llava_next_read_as_its_code_builds_them():
    from llava_next.original import _pinpoints

    # LLaVA-NeXT: "(1x1),...,(2x3)" is every (i, j) from (1, 1) to (2, 3), i tiles wide, j tall, i outermost
    got = _pinpoints("(1x1),...,(2x3)", 336, "config.json")
    wide_tall = [(i, j) for i in (1, 2) for j in (1, 2, 3)]
    assert got == [(j * 336, i * 336) for i, j in wide_tall]  # ours are (height, width)
    assert _pinpoints([[336, 672], [1008, 336]], 336, "config.json") == [(672, 336), (336, 1008)]
    with pytest.raises(LlavaError, match="image_grid_pinpoints"):
        _pinpoints("1x1", 336, "config.json")


def test_image_start_and_end_tokens_wrap_each_image_when_the_config_asks(tmp_path):
    # A v1.5 checkpoint trained with mm_use_im_start_end: the builder adds <im_start> and <im_end> (ids 1000,
    # 1001; the embedding grew with them) and the prompt wraps the image in them.
    import shutil

    target = tmp_path / "llava-v1.5-start-end"
    shutil.copytree(ORIGINAL / "llava-v1.5-tiny", target)
    config = json.loads((target / "config.json").read_text())
    config.update(mm_use_im_start_end=True, vocab_size=1002)
    (target / "config.json").write_text(json.dumps(config))
    for shard in target.glob("pytorch_model-*.bin"):
        state = torch.load(shard, weights_only=True)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in state:
                state[name] = torch.cat([state[name], state[name][:2] * 0.5])
        torch.save(state, shard)
    pipe = llava_next.load(target, dtype="float32", progress=False, vision_tower=TOWER)
    assert pipe.original.added_tokens == ["<im_start>", "<im_end>"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    image = make_image(300, 100)
    text, _ = pipe.prompt_text(messages, [image])
    assert "USER: <im_start><image><im_end>\nDescribe it. ASSISTANT:" in text
    ids = pipe.processor.tokenizer.encode(text)
    marker = pipe.config.image_token_id
    at = ids.index(marker)
    # (the exact ids of each piece are the tokenizer's tests' business, against the original tokenizer)
    assert ids[at - 1] == 1000 and 1001 in ids[at + 1 : at + 3] and marker == 1002
    assert len(pipe.generate(messages, [image], max_new_tokens=3).token_ids) == 3


def test_a_checkpoint_with_a_tokenizer_json_tokenizes_pieces_around_images_too(tmp_path):
    # LLaVA-NeXT's checkpoints ship tokenizer.json (which the original loads as a fast tokenizer): the mistral
    # checkpoint's fast tokenizer written as one gives the original's ids
    import shutil

    from llava_next.prompt import Tokenizer

    target = tmp_path / "llava-v1.6-mistral-json"
    shutil.copytree(ORIGINAL / "llava-v1.6-mistral-tiny", target)
    Tokenizer.from_sentencepiece(target, flavour="fast").backend.save(str(target / "tokenizer.json"))
    (target / "tokenizer.model").unlink()
    pipe = llava_next.load(target, dtype="float32", progress=False, vision_tower=TOWER)
    assert pipe.original.tokenizer_class == "tokenizer.json"
    for case in reference("llava-v1.6-mistral-tiny")["cases"]:
        text, _ = pipe.prompt_text(messages_of(case), images_of(case))
        ids = pipe.processor.tokenizer.encode(text)
        assert [-200 if t == pipe.config.image_token_id else t for t in ids] == case["input_ids"]
