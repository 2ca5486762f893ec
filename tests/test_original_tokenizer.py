"""Tokenizers of original-layout LLaVA checkpoints (sentencepiece tokenizer.model only) against transformers 4.37.2.

The recorded values come from tests/original/make_tokenizer_reference.py (reference/tokenizers.json: the slow
LlamaTokenizer with legacy false and true, the converted LlamaTokenizerFast, each also with the builder's added
tokens) and from make_reference.py (reference/<checkpoint>.json: the original pipeline's prompt ids).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from llava_next.prompt import IMAGE_TOKEN, IncrementalDetokenizer, PromptError, Tokenizer, original_added_tokens
from llava_next.sentencepiece_model import SentencePieceError, read_model

ORIGINAL = Path(__file__).resolve().parent / "original"
RECORDED = json.loads((ORIGINAL / "reference" / "tokenizers.json").read_text())
CHECKPOINTS = ["llava-v1.5-tiny", "llava-v1.6-vicuna-tiny", "llava-v1.6-mistral-tiny"]
ORIGINAL_IMAGE_ID = -200  # what the original code writes for an image


def ours(name: str) -> Tokenizer:
    """Our tokenizer built as the recorded transformers one was."""
    spec = RECORDED["tokenizers"][name]
    flavour = "fast" if spec["class"] == "LlamaTokenizerFast" else "slow"
    return Tokenizer.from_sentencepiece(ORIGINAL / spec["directory"], flavour, spec["added_tokens"])


def as_original(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    return [ORIGINAL_IMAGE_ID if i == tokenizer.image_token_id else i for i in ids]


def plain_encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """tokenizer(text).input_ids as transformers gives it: `<image>` is text there (the image rule is llava's)."""
    if IMAGE_TOKEN in text:
        return tokenizer.backend.encode(text).ids
    return tokenizer.encode(text)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {name: ours(name) for name in RECORDED["tokenizers"]}


def test_the_fixture_covers_what_differs():
    # the recorded flavours really disagree somewhere, so that agreeing with each one means something
    encode = RECORDED["encode"]

    def differ(a: str, b: str) -> int:
        return sum(x != y for x, y in zip(encode[a], encode[b]))

    assert differ("slow_legacy_false", "slow_legacy_true") > 10
    assert differ("slow_legacy_false", "fast") > 10
    assert encode["fast"] == encode["fast_from_legacy_false"]  # the conversion ignores legacy
    decode = RECORDED["decode"]
    assert sum(a["text"] != b["text"] for a, b in zip(decode["slow_legacy_true"], decode["fast"])) > 10
    assert RECORDED["versions"]["transformers"] == "4.37.2"


@pytest.mark.parametrize("name", list(RECORDED["tokenizers"]))
def test_encodes_every_text_as_transformers_4_37(name, tokenizers):
    tokenizer = tokenizers[name]
    assert tokenizer.vocab_size == RECORDED["tokenizers"][name]["len"]
    for text, expected in zip(RECORDED["texts"], RECORDED["encode"][name]):
        assert plain_encode(tokenizer, text) == expected, text
    for text, expected in zip(RECORDED["random_texts"], RECORDED["encode_random"].get(name, [])):
        assert plain_encode(tokenizer, text) == expected, text


@pytest.mark.parametrize("name", list(RECORDED["tokenizers"]))
def test_image_placeholders_follow_the_original_chunk_rule(name, tokenizers):
    tokenizer = tokenizers[name]
    expected = RECORDED["image_chunks"][name]
    got = [as_original(tokenizer, tokenizer.encode(text)) for text in RECORDED["image_texts"]]
    assert got == expected
    batch = tokenizer.encode_batch(RECORDED["image_texts"])
    assert [as_original(tokenizer, ids) for ids in batch] == expected
    literal_nowhere = [tokenizer.encode_literal_text(t, True, []) for t in RECORDED["image_texts"]]
    assert [as_original(tokenizer, ids) for ids in literal_nowhere] == expected


@pytest.mark.parametrize("name", [n for n in RECORDED["tokenizers"] if n in RECORDED["decode"]])
def test_decodes_as_transformers_4_37(name, tokenizers):
    tokenizer = tokenizers[name]
    for record in RECORDED["decode"][name]:
        assert tokenizer.decode(record["ids"], skip_special_tokens=False) == record["text"], record["ids"]
        assert tokenizer.decode(record["ids"], skip_special_tokens=True) == record["text_skipping_special"], \
            record["ids"]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_prompt_ids_of_the_original_pipeline(checkpoint):
    reference = json.loads((ORIGINAL / "reference" / f"{checkpoint}.json").read_text())
    directory = ORIGINAL / checkpoint
    # the original builder: the fast tokenizer for mistral names, the slow one otherwise
    flavour = "fast" if "mistral" in checkpoint else "slow"
    assert reference["tokenizer_class"] == {"fast": "LlamaTokenizerFast", "slow": "LlamaTokenizer"}[flavour]
    added = original_added_tokens(json.loads((directory / "config.json").read_text()))
    tokenizer = Tokenizer.from_sentencepiece(directory, flavour, added)
    assert tokenizer.vocab_size == reference["len_tokenizer"]
    for case in reference["cases"]:
        assert as_original(tokenizer, tokenizer.encode(case["prompt"])) == case["input_ids"], case["name"]
    probes = reference["tokenizer_probes"]
    slow = Tokenizer.from_sentencepiece(directory, "slow")
    fast = Tokenizer.from_sentencepiece(directory, "fast")
    for i, text in enumerate(probes["texts"]):
        assert plain_encode(tokenizer, text) == probes["builder"][i]
        assert plain_encode(slow, text) == probes["slow"][i]
        assert plain_encode(fast, text) == probes["fast"][i]
        assert slow.decode(probes["slow"][i]) == probes["decode_slow"][i]
        assert fast.decode(probes["fast"][i]) == probes["decode_fast"][i]
    for text, expected in probes["image_token_chunks"].items():
        assert as_original(tokenizer, tokenizer.encode(text)) == expected


def test_added_tokens_follow_the_model_config():
    assert original_added_tokens({}) == ["<im_patch>"]  # mm_use_im_patch_token missing counts as true
    assert original_added_tokens({"mm_use_im_patch_token": False}) == []
    assert original_added_tokens({"mm_use_im_patch_token": False, "mm_use_im_start_end": True}) == [
        "<im_start>", "<im_end>"]
    tokenizer = ours("slow_legacy_false_im")
    assert [tokenizer.token_id(t) for t in ("<im_patch>", "<im_start>", "<im_end>")] == [1000, 1001, 1002]
    assert tokenizer.image_token_id == 1003 == tokenizer.vocab_size


def test_from_dir_reads_a_directory_with_only_tokenizer_model(tmp_path):
    plain = Tokenizer.from_dir(ORIGINAL / "llava-v1.5-tiny")  # its config: mm_use_im_patch_token false
    assert plain.splits_images and plain.slow_decoder is not None and plain.image_token_id == 1000
    reference = json.loads((ORIGINAL / "reference" / "llava-v1.5-tiny.json").read_text())
    case = reference["cases"][0]
    assert as_original(plain, plain.encode(case["prompt"])) == case["input_ids"]
    # a config without mm_use_im_patch_token gets <im_patch>, as the original builder adds it
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ORIGINAL / "llava-v1.5-tiny" / name, tmp_path / name)
    config = json.loads((ORIGINAL / "llava-v1.5-tiny" / "config.json").read_text())
    del config["mm_use_im_patch_token"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    patched = Tokenizer.from_dir(tmp_path)
    assert patched.token_id("<im_patch>") == 1000 and patched.image_token_id == 1001
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(PromptError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["slow_legacy_false", "slow_legacy_true", "fast"])
def test_typed_image_and_special_text_stays_text_in_literal_spans(name, tokenizers):
    tokenizer = tokenizers[name]
    prefix, user = "USER: <image>\n", "What is <image> in </s> this?"
    text = prefix + user + " ASSISTANT:"
    literal = [(len(prefix), len(prefix) + len(user))]
    ids = tokenizer.encode_literal_text(text, True, literal)
    assert ids.count(tokenizer.image_token_id) == 1 and tokenizer.eos_token_id not in ids
    # the template's <image> cuts the text as the original does ...
    head = tokenizer.encode("USER: " + IMAGE_TOKEN)
    assert ids[: len(head)] == head and head[-1] == tokenizer.image_token_id
    # ... the typed one is text (it is no token here), and the typed </s> is the text of that token alone
    typed = tokenizer.backend.encode("\nWhat is <image> in ", add_special_tokens=False).ids
    eos_as_text = tokenizer._literal_backend().encode("</s>", add_special_tokens=False).ids
    assert ids[len(head) :][: len(typed) + len(eos_as_text)] == typed + eos_as_text
    # without spans the typed text is what encode() makes of it
    assert tokenizer.encode_literal_text(text, True, []) == tokenizer.encode(text)


@pytest.mark.parametrize("name", ["slow_legacy_false", "slow_legacy_true", "fast"])
def test_decode_skips_the_image_id(name, tokenizers):
    tokenizer = tokenizers[name]
    ids = tokenizer.encode("USER: <image>\nHi there ASSISTANT: café 北京 🦙 ok</s>")
    assert tokenizer.image_token_id in ids
    without = [i for i in ids if i != tokenizer.image_token_id]
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == tokenizer.decode(without, skip_special_tokens=skip)
    assert tokenizer.decode(ids).endswith("café 北京 🦙 ok")


@pytest.mark.parametrize("name", ["slow_legacy_false", "slow_legacy_true", "fast", "slow_legacy_true_im"])
def test_streamed_text_joins_to_the_full_decode(name, tokenizers):
    # the slow decoder drops spaces at the start of every decode; streaming decodes windows of the sequence
    tokenizer = tokenizers[name]
    for text in RECORDED["texts"] + RECORDED["random_texts"]:
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detokenizer.add(i) for i in ids) + detokenizer.flush()
        assert streamed == detokenizer.text == tokenizer.decode(ids), text
        # with the special tokens the stream can differ (legacy puts a token's space in front of the text before
        # it, after that text was handed out), but the final text is the full decode
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
        for i in ids:
            detokenizer.add(i)
        detokenizer.flush()
        assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=False), text


@pytest.mark.parametrize("name", ["slow_legacy_false", "slow_legacy_true", "fast", "slow_legacy_false_im"])
def test_saved_tokenizer_json_encodes_the_same(name, tokenizers, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tokenizers[name]
    tokenizer.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    transformers_5 = AutoTokenizer.from_pretrained(tmp_path)
    assert again.image_token_id == tokenizer.image_token_id == again.token_id(IMAGE_TOKEN)
    texts = [t for t in RECORDED["texts"] + RECORDED["random_texts"] if IMAGE_TOKEN not in t]
    for text in texts:
        assert again.encode(text) == tokenizer.encode(text), text
        assert transformers_5(text).input_ids == tokenizer.encode(text), text
    # what the file cannot say: the original rule's "▁" after an image, where slow legacy=false puts none after
    # special tokens
    text = "USER: <image>\nHi"
    if name.startswith("slow_legacy_false"):
        saved = again.encode(text)
        after_image = saved.index(again.image_token_id) + 1
        assert tokenizer.encode(text) == saved[:after_image] + [tokenizer.token_id("▁")] + saved[after_image:]
    else:
        assert again.encode(text) == tokenizer.encode(text)


# -- files that are not a sentencepiece BPE model ---------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    if isinstance(value, bool) or isinstance(value, int):
        return _varint(number << 3) + _varint(int(value))
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def model_file(path: Path, model_type: int = 2, extra_pieces=(), **normalizer) -> Path:
    """A serialized ModelProto: <unk> <s> </s>, a few letters, then extra (text, score, type) pieces."""
    pieces = [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3), ("▁", -1.0, 1), ("a", -2.0, 1), ("b", -3.0, 1),
              ("ab", -0.5, 1), *extra_pieces]
    data = b"".join(_field(1, _field(1, t) + _field(2, s) + _field(3, k)) for t, s, k in pieces)
    data += _field(2, _field(3, model_type))
    spec = {"name": "identity", "add_dummy_prefix": True, "remove_extra_whitespaces": False, **normalizer}
    data += _field(3, _field(1, spec["name"]) + _field(3, spec["add_dummy_prefix"])
                   + _field(4, spec["remove_extra_whitespaces"]))
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(data)
    return path


def test_a_handmade_model_file_reads_and_tokenizes(tmp_path):
    directory = model_file(tmp_path / "ok")
    model = read_model(directory / "tokenizer.model")
    assert [p.text for p in model.pieces][:7] == ["<unk>", "<s>", "</s>", "▁", "a", "b", "ab"]
    assert model.pieces[6].score == -0.5 and model.pieces[1].kind == 3 and not model.remove_extra_whitespaces
    for flavour in ("slow", "fast"):
        tokenizer = Tokenizer.from_sentencepiece(directory, flavour)
        assert tokenizer.encode("ab a") == [1, 3, 6, 3, 4]  # <s> ▁ ab ▁ a
        assert tokenizer.decode([3, 6, 3, 4]) == "ab a"


@pytest.mark.parametrize("model_type, kind", [(1, "unigram"), (3, "word"), (4, "char")])
def test_a_model_that_is_not_bpe_is_refused(model_type, kind, tmp_path):
    directory = model_file(tmp_path, model_type=model_type)
    for flavour in ("slow", "fast"):
        with pytest.raises(SentencePieceError, match=f"a sentencepiece {kind} model; only BPE models"):
            Tokenizer.from_sentencepiece(directory, flavour)


def test_corrupt_model_files_are_refused(tmp_path):
    good = (ORIGINAL / "llava-v1.5-tiny" / "tokenizer.model").read_bytes()
    for label, data in [("truncated", good[:5001]), ("text", b"this is not a model\n" * 20), ("empty", b""),
                        ("json", b'{"model": {"type": "BPE"}}'), ("zeros", bytes(64))]:
        directory = tmp_path / label
        directory.mkdir()
        (directory / "tokenizer.model").write_bytes(data)
        with pytest.raises(SentencePieceError, match="corrupt"):
            Tokenizer.from_sentencepiece(directory, "slow")
    with pytest.raises(SentencePieceError, match="cannot be read"):
        Tokenizer.from_sentencepiece(tmp_path / "missing", "slow")


def test_options_the_slow_flavour_cannot_reproduce_are_refused(tmp_path):
    user_defined = model_file(tmp_path / "user", extra_pieces=[("<tool>", 0.0, 4)])
    with pytest.raises(SentencePieceError, match="user-defined pieces"):
        Tokenizer.from_sentencepiece(user_defined, "slow")
    collapsing = model_file(tmp_path / "collapse", remove_extra_whitespaces=True)
    with pytest.raises(SentencePieceError, match="remove_extra_whitespaces"):
        Tokenizer.from_sentencepiece(collapsing, "slow")
    with pytest.raises(SentencePieceError, match="flavour must be one of slow, fast"):
        Tokenizer.from_sentencepiece(ORIGINAL / "llava-v1.5-tiny", "medium")
