"""Sentencepiece `tokenizer.model` files, as original LLaVA checkpoints ship them, run with the tokenizers library.

Original-layout checkpoints (liuhaotian/llava-v1.5-7b, llava-v1.6-vicuna-7b, llava-v1.6-mistral-7b, ...) have no
tokenizer.json, only llama's kind of sentencepiece model: BPE over characters with byte fallback, a dummy-prefix
"▁", identity normalisation. The original code tokenizes them with transformers 4.37's classes, in one of two
flavours that differ around special tokens and in decoding:

  "slow"  LlamaTokenizer (sentencepiece itself) for llama-family checkpoints. With `legacy: false` in
          tokenizer_config.json the "▁" prefix goes only in front of the whole text, never after a special
          token; with `legacy: true` every stretch of text between special tokens gets one. Its decoding has
          quirks of its own (below, `SlowDecoder`).
  "fast"  LlamaTokenizerFast, converted from tokenizer.model by transformers 4.37 (its LlamaConverter), for
          checkpoints whose name says mistral: every stretch of text gets the "▁" prefix whatever `legacy` says,
          and decoding is the tokenizers library's.

This module reads the model file without the sentencepiece or protobuf packages (the file is a protobuf message,
read here field by field) and builds a `tokenizers.Tokenizer` that encodes as either flavour does.

Sentencepiece's BPE merges, at every step, the adjacent pair whose concatenation is the highest-scoring piece,
the leftmost on ties. The tokenizers library merges by rank in a merge list instead, so the list is every way of
splitting each piece into two pieces, ordered by the merged piece's score: the same choice at every step, except
where two different splits of one piece compete at the same step (sentencepiece takes the leftmost, the list its
own order). transformers' converter has that difference too; the tests compare both flavours with the real ones.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import AddedToken, Tokenizer as HFTokenizer

from .errors import LlavaError

SPACE = "▁"  # sentencepiece's visible space, U+2581

FLAVOURS = ("slow", "fast")


class SentencePieceError(LlavaError, ValueError):
    """A tokenizer.model that is not a sentencepiece model this package can run."""


# Piece types (ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Model types (TrainerSpec.ModelType)
MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
BPE_MODEL = 2


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    kind: int  # NORMAL, UNKNOWN, ...


@dataclass
class SentencePieceModel:
    """The parts of a sentencepiece ModelProto that tokenizing and decoding need; defaults are the proto's."""

    pieces: list[Piece]
    model_type: int = 1
    byte_fallback: bool = False
    unk_piece: str = "<unk>"
    unk_surface: str = " \u2047 "
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    denormalizer_charsmap: bytes = b""

    @property
    def unk_id(self) -> int:
        return next(i for i, p in enumerate(self.pieces) if p.kind == UNKNOWN)


# ---------------------------------------------------------------------------------------------------------------------
# Reading the file: protobuf wire format, only as much of it as ModelProto uses


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("a number runs past the end of the data")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a number is longer than 10 bytes")


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for every field of one protobuf message: an int for varint and fixed-width fields
    (the raw bits), bytes for length-delimited ones (strings and sub-messages)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            if pos + 8 > len(data):
                raise ValueError("a 64-bit field runs past the end of the data")
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError(f"field {number} says {length} bytes but fewer remain")
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(data):
                raise ValueError("a 32-bit field runs past the end of the data")
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"field {number} has wire type {wire}, which ModelProto never uses")
        if number == 0:
            raise ValueError("a field numbered 0")
        yield number, value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise ValueError("a string field holds a number")
    return value.decode("utf-8")


def _float(value: int | bytes) -> float:
    if not isinstance(value, int):
        raise ValueError("a float field holds bytes")
    return struct.unpack("<f", value.to_bytes(4, "little"))[0]


def _number(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise ValueError("a number field holds bytes")
    return value


def _message(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("a message field holds a number")
    return value


def _flag(value: int | bytes) -> bool:
    return bool(_number(value))


# The fields read from ModelProto's sub-messages: field number -> (SentencePieceModel attribute, how to read it)
SUB_MESSAGE_FIELDS = {
    2: {  # TrainerSpec
        3: ("model_type", _number), 24: ("treat_whitespace_as_suffix", _flag), 35: ("byte_fallback", _flag),
        44: ("unk_surface", _text), 45: ("unk_piece", _text),
    },
    3: {  # NormalizerSpec
        1: ("normalizer_name", _text), 2: ("precompiled_charsmap", _message), 3: ("add_dummy_prefix", _flag),
        4: ("remove_extra_whitespaces", _flag), 5: ("escape_whitespaces", _flag),
    },
    5: {2: ("denormalizer_charsmap", _message)},  # NormalizerSpec of the denormaliser
}


def parse_model(data: bytes) -> SentencePieceModel:
    """A serialized ModelProto -> SentencePieceModel. Raises ValueError on malformed data."""
    model = SentencePieceModel(pieces=[])
    for number, value in _fields(data):
        if number == 1:  # repeated SentencePiece pieces: piece = 1, score = 2, type = 3
            text, score, kind = None, 0.0, NORMAL
            for n, v in _fields(_message(value)):
                if n == 1:
                    text = _text(v)
                elif n == 2:
                    score = _float(v)
                elif n == 3:
                    kind = _number(v)
            if not text:
                raise ValueError(f"piece {len(model.pieces)} has no text")
            model.pieces.append(Piece(text, score, kind))
        elif number in SUB_MESSAGE_FIELDS:
            wanted = SUB_MESSAGE_FIELDS[number]
            for n, v in _fields(_message(value)):
                if n in wanted:
                    attribute, read = wanted[n]
                    setattr(model, attribute, read(v))
    return model


def read_model(path: Path) -> SentencePieceModel:
    """tokenizer.model -> SentencePieceModel, refusing what this package cannot run exactly."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SentencePieceError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        model = parse_model(data)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise SentencePieceError(f"{path}: not a sentencepiece model ({e}); the file is corrupt or incomplete, "
                                 "copy it again") from None
    if not model.pieces:
        raise SentencePieceError(f"{path}: not a sentencepiece model (it has no pieces); the file is corrupt or "
                                 "incomplete, copy it again")
    if model.model_type != BPE_MODEL:
        kind = MODEL_TYPES.get(model.model_type, f"type {model.model_type}")
        raise SentencePieceError(
            f"{path}: a sentencepiece {kind} model; only BPE models (llama's and mistral's kind) are supported. "
            "Save the tokenizer with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)) to "
            "get a tokenizer.json instead")
    if sum(p.kind == UNKNOWN for p in model.pieces) != 1:
        raise SentencePieceError(f"{path}: a sentencepiece model needs exactly one unknown piece; the file is "
                                 "corrupt")
    return model


def check_slow_supported(model: SentencePieceModel, path: Path) -> None:
    """The slow flavour runs sentencepiece's own normaliser and segmentation: refuse the options it does not
    reproduce (none of them is set in llama's or mistral's tokenizer.model)."""
    problems = []
    if model.precompiled_charsmap or model.normalizer_name not in ("", "identity"):
        problems.append(f"text normalisation {model.normalizer_name!r}")
    if model.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces")
    if not model.escape_whitespaces:
        problems.append("escape_whitespaces off")
    if model.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix")
    if model.denormalizer_charsmap:
        problems.append("a denormaliser")
    kinds = {p.kind for p in model.pieces}
    if USER_DEFINED in kinds:
        problems.append("user-defined pieces")
    if UNUSED in kinds:
        problems.append("unused pieces")
    if problems:
        raise SentencePieceError(
            f"{path}: this sentencepiece model uses {', '.join(problems)}, which the sentencepiece-compatible "
            "('slow') tokenizer here does not reproduce; save the tokenizer with transformers to get a "
            "tokenizer.json instead")


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizers.Tokenizer


def converter_vocab(model: SentencePieceModel) -> list[tuple[str, float]]:
    """(piece, score) in id order as transformers 4.37's LlamaConverter takes them: ids 0-2 are named <unk>, <s>,
    </s> with score 0 whatever the file says."""
    return [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)] + [(p.text, p.score) for p in model.pieces[3:]]


def bpe_merges(model: SentencePieceModel, flavour: str) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, highest-scoring merged piece first.

    Within one piece the splits go by the ids of their left, then right, parts, and equal scores keep id order:
    transformers' converter orders them so, and the fast flavour must match it. The slow flavour leaves out what
    sentencepiece never merges into: unknown, control and byte pieces.
    """
    vocab = converter_vocab(model)
    ids = {text: i for i, (text, _) in enumerate(vocab)}
    mergeable = None if flavour == "fast" else {p.text for p in model.pieces if p.kind == NORMAL}
    merges = []
    for piece, score in vocab:
        if mergeable is not None and piece not in mergeable:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        if mergeable is not None:
            splits = [(a, b) for a, b in splits if a in mergeable and b in mergeable]
        splits.sort(key=lambda ab: (ids[ab[0]], ids[ab[1]]))
        merges.extend((a, b, score) for a, b in splits)
    merges.sort(key=lambda m: m[2], reverse=True)  # stable: ties keep the order above
    return [(a, b) for a, b, _ in merges]


def build_backend(model: SentencePieceModel, flavour: str, legacy: bool, special_tokens: Sequence[str],
                  bos_token: str | None, eos_token: str | None, add_bos: bool, add_eos: bool) -> HFTokenizer:
    """The tokenizers.Tokenizer that encodes as the flavour does, with `special_tokens` (the configured bos, eos,
    unk and pad) split out of the text before anything else, and BOS/EOS added as add_bos/add_eos say.

    How each flavour's "▁" prefix is expressed, per stretch of text between special tokens:
      fast, and slow with legacy: prepend "▁" to every stretch (slow only if the model's add_dummy_prefix is on),
        then spaces become "▁";
      slow without legacy: spaces become "▁", then the stretch that starts the text, and only that one, gets
        "▁" prepended, even when it already starts with one. The Metaspace pre-tokenizer's "first" scheme knows
        which stretch starts the text but skips stretches that start with its replacement character; with " " as
        that character (no spaces are left by then) it always prepends, and a second Metaspace turns that space
        into "▁".
    """
    if flavour not in FLAVOURS:
        raise SentencePieceError(f"tokenizer flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
    if flavour == "fast" and [p.text for p in model.pieces[:3]] != ["<unk>", "<s>", "</s>"]:
        # transformers' converter renames ids 0-2 so; a model with other pieces there would lose them
        raise SentencePieceError("the fast (converted) tokenizer needs <unk>, <s>, </s> as pieces 0-2, as llama's "
                                 f"and mistral's models have them; this one has {[p.text for p in model.pieces[:3]]}")
    vocab = converter_vocab(model) if flavour == "fast" else [(p.text, p.score) for p in model.pieces]
    unk = model.unk_piece if flavour == "fast" else model.pieces[model.unk_id].text
    byte_fallback = True if flavour == "fast" else model.byte_fallback  # the converter always sets it
    prefix_every_stretch = flavour == "fast" or (legacy and model.add_dummy_prefix)
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if prefix_every_stretch else []) + [
        {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    pre_tokenizer = None
    if flavour == "slow" and not legacy:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": " ", "prepend_scheme": "first", "split": False},
            {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never", "split": False},
        ]}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": byte_fallback, "ignore_merges": False,
            "vocab": {text: i for i, (text, _) in enumerate(vocab)},
            "merges": [[a, b] for a, b in bpe_merges(model, flavour)],
        },
    }
    backend = HFTokenizer.from_str(json.dumps(spec))
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special_tokens])
    backend.post_processor = bos_eos_processor(backend, bos_token, eos_token, add_bos, add_eos)
    return backend


def bos_eos_processor(backend: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool):
    """BOS and EOS around a text (and a pair) as LlamaTokenizer's build_inputs_with_special_tokens puts them."""
    from tokenizers.processors import TemplateProcessing

    for name, token, wanted in (("bos", bos, add_bos), ("eos", eos, add_eos)):
        if wanted and (token is None or backend.token_to_id(token) is None):
            raise SentencePieceError(f"tokenizer_config.json asks for add_{name}_token but the {name} token "
                                     f"{token!r} is not in the tokenizer")
    first = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    second = ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    specials = [(t, backend.token_to_id(t)) for t, wanted in ((bos, add_bos), (eos, add_eos)) if wanted]
    return TemplateProcessing(single=" ".join(first), pair=" ".join(first + second), special_tokens=specials)


# ---------------------------------------------------------------------------------------------------------------------
# Decoding as the slow tokenizer does


def decode_utf8_like_sentencepiece(data: bytes) -> str:
    """Bytes -> text one character at a time, each byte of a malformed character becoming U+FFFD (sentencepiece's
    rule; Python's errors="replace" puts one U+FFFD for a whole malformed sequence)."""
    out, pos = [], 0
    while pos < len(data):
        lead = data[pos]
        width = 1 if lead < 0x80 else 2 if lead & 0xE0 == 0xC0 else 3 if lead & 0xF0 == 0xE0 else \
            4 if lead & 0xF8 == 0xF0 else 0
        try:  # a complete, well-formed character of that width (no overlong forms, surrogates or > U+10FFFF)
            char = data[pos : pos + width].decode("utf-8") if width and pos + width <= len(data) else None
        except UnicodeDecodeError:
            char = None
        out.append("\ufffd" if char is None else char)
        pos += 1 if char is None else width
    return "".join(out)


class SlowDecoder:
    """ids -> text as transformers 4.37's LlamaTokenizer.decode gives it. Its particulars:

    - special tokens inside the vocabulary (<s>, </s>, <unk>) are written as their text, and each stretch of
      pieces between them is decoded by sentencepiece separately;
    - the first piece of every stretch between tokens added after loading (LLaVA's <im_patch>, ...) loses one
      leading "▁", and those tokens are joined to the text around them with spaces;
    - with `legacy`, sentencepiece itself also drops the leading "▁" of a stretch's first piece that has one if
      nothing has been written in that stretch yet, and transformers writes a space for each special token that
      follows a piece, in front of the stretch before that token ("Hi</s>" decodes to " Hi</s>");
    - byte pieces are decoded character by character, each byte of a malformed character becoming U+FFFD.
    """

    def __init__(self, model: SentencePieceModel, legacy: bool, added: dict[int, AddedToken]):
        self.model = model
        self.legacy = legacy
        # transformers switches sentencepiece's dummy prefix off without legacy, and with it the stripping
        self.strip_first_space = legacy and model.add_dummy_prefix
        self.added = {i: t.content for i, t in added.items()}
        self.special_ids = {i for i, t in added.items() if t.special}
        self.special_texts = {t.content for t in added.values() if t.special}
        # added tokens written apart from the stretches around them: all but the special tokens inside the
        # sentencepiece vocabulary
        self.separate = {t.content for i, t in added.items() if not t.special or i >= len(model.pieces)}
        # piece text -> type, as sentencepiece looks a text up (any text that is no piece counts as unknown)
        self.kinds: dict[str, int] = {}
        for piece in model.pieces:
            self.kinds.setdefault(piece.text, piece.kind)
        self.unk_text = model.pieces[model.unk_id].text

    def decode(self, ids: Sequence[int], skip_special_tokens: bool, continuing: bool = False) -> str:
        """continuing: the ids are a window of a longer sequence, after text already written (streaming). The
        window's start then loses no space, and legacy's space for a special token goes right before that token
        rather than before the text in front of it, so that a longer window never changes a shorter one's text
        (the whole sequence's decode still puts it where transformers does)."""
        tokens = []
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in self.added:
                tokens.append(self.added[i])
            elif 0 <= i < len(self.model.pieces):
                tokens.append(self.model.pieces[i].text)
            # any other id (the image placeholder of original checkpoints) has no text
        texts, stretch = [], []
        for token in tokens:
            if token in self.separate:
                if stretch:
                    text = self._tokens_to_string(stretch, continuing and not texts)
                    if text:
                        texts.append(text)
                    stretch = []
                texts.append(token)
            else:
                stretch.append(token)
        if stretch:
            texts.append(self._tokens_to_string(stretch, continuing and not texts))
        return " ".join(texts)

    def _tokens_to_string(self, tokens: list[str], continuing: bool) -> str:
        tokens = list(tokens)
        if tokens[0].startswith(SPACE) and not continuing:
            tokens[0] = tokens[0][1:]
        out, run, previous_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.special_texts:
                space = " " if not previous_special and i != 0 and self.legacy else ""
                text = self._sentencepiece_decode(run, continuing and i == len(run))
                out += (text + space if continuing else space + text) + token
                previous_special, run = True, []
            else:
                run.append(token)
                previous_special = False
        return out + self._sentencepiece_decode(run, continuing and len(run) == len(tokens))

    def _sentencepiece_decode(self, pieces: list[str], continuing: bool) -> str:
        """sentencepiece's DecodePieces: control pieces vanish, text that is no piece is written as it is, byte
        pieces are collected into characters, "▁" is a space, and the first piece with a leading "▁" while nothing
        has been written loses it when the model adds a dummy prefix."""
        model = self.model
        out: list[str] = []
        pending = bytearray()
        at_start, consumed_space = not continuing, False
        for text in pieces:
            kind = self.kinds.get(text, UNKNOWN)
            if kind == BYTE:
                pending.append(int(text[3:5], 16))
                continue
            if pending:
                out.append(decode_utf8_like_sentencepiece(bytes(pending)))
                pending.clear()
            if consumed_space or any(out):
                at_start = False
            consumed_space = False
            if kind == CONTROL:
                continue
            if kind == UNKNOWN:
                out.append(model.unk_surface if text == self.unk_text else text)
                continue
            if at_start and self.strip_first_space and text.startswith(SPACE):
                text, consumed_space = text[1:], True
            out.append(text.replace(SPACE, " "))
        if pending:
            out.append(decode_utf8_like_sentencepiece(bytes(pending)))
        return "".join(out)
