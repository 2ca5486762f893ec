"""Text in and out: the tokenizer, chat templates, image-placeholder expansion and streaming detokenization.

The tokenizer is the checkpoint's own `tokenizer.json`, run by the `tokenizers` library exactly as stored (its
normalizer, pre-tokenizer, post-processor and decoder), which is what transformers 5 does for LLaVA checkpoints.
`tokenizer_config.json` supplies the names of the special tokens, added tokens missing from tokenizer.json, and
possibly a chat template. Checkpoints in the original LLaVA layout ship a sentencepiece `tokenizer.model` instead:
`Tokenizer.from_sentencepiece` tokenizes them as the original code does (sentencepiece_model.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as HFTokenizer

from .errors import LlavaError, counted
from .sentencepiece_model import SlowDecoder, build_backend, check_slow_supported, read_model

IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")  # what LLaVA's chat templates have speakers for


class PromptError(LlavaError, ValueError):
    """A prompt, a conversation or a template cannot be turned into model input."""


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def check_text(text: str) -> None:
    """Text must be valid Unicode: a lone surrogate (from bytes decoded with errors="surrogateescape", as Python
    does for command-line arguments that are not UTF-8) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the text has an invalid character at position {e.start} ({text[e.start]!r}, a lone "
                          "surrogate: bytes that were not UTF-8); give UTF-8 text") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def original_added_tokens(model_config: dict[str, Any]) -> list[str]:
    """The tokens the original LLaVA builder adds to the tokenizer after loading it, in its order, as special
    tokens: `<im_patch>` unless the model's config.json sets mm_use_im_patch_token false (a missing key counts as
    true), then `<im_start>`, `<im_end>` if it sets mm_use_im_start_end true."""
    tokens = []
    if model_config.get("mm_use_im_patch_token", True):
        tokens.append("<im_patch>")
    if model_config.get("mm_use_im_start_end", False):
        tokens += ["<im_start>", "<im_end>"]
    return tokens


def _inside(start: int, end: int, spans: Sequence[tuple[int, int]]) -> bool:
    return end > start and any(a <= start and end <= b for a, b in spans)


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None):
        self.backend = tokenizer
        # Set by from_sentencepiece for original-layout checkpoints: `<image>` splits the text into separately
        # tokenized stretches and stands for image_token_id (outside the vocabulary), and the slow flavour decodes
        # as transformers 4.37's LlamaTokenizer did.
        self.splits_images = False
        self.slow_decoder: SlowDecoder | None = None
        config = dict(config or {})
        self.config = config
        # Added tokens that tokenizer_config.json declares but tokenizer.json lacks (transformers adds them too).
        existing = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        for index, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            if spec["content"] in existing or tokenizer.token_to_id(spec["content"]) is not None:
                continue
            token = AddedToken(spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                               rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                               special=spec.get("special", True))
            tokenizer.add_tokens([token])
            if tokenizer.token_to_id(spec["content"]) != int(index):
                raise PromptError(f"tokenizer_config.json gives {spec['content']!r} id {index}, but tokenizer.json "
                                  f"has {tokenizer.get_vocab_size()} tokens; the two files do not belong together")
        self.special_tokens = {
            name: _token_text(config.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.bos_token_id = self.token_id(self.special_tokens["bos_token"])
        self.eos_token_id = self.token_id(self.special_tokens["eos_token"])
        self.pad_token_id = self.token_id(self.special_tokens["pad_token"])
        self.image_token_id = self.token_id(IMAGE_TOKEN)
        self.padding_side = config.get("padding_side", "left")
        self.chat_template = config.get("chat_template")
        # transformers 5 applies clean_up_tokenization_spaces only to non-BPE tokenizers (for BPE ones, Llama-3's
        # among them, it would delete real spaces before punctuation) unless the checkpoint insists
        is_bpe = json.loads(tokenizer.to_str()).get("model", {}).get("type") == "BPE"
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            not is_bpe or bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))

    @classmethod
    def from_dir(cls, directory: Path) -> "Tokenizer":
        """tokenizer.json and tokenizer_config.json; a directory with only a sentencepiece tokenizer.model is read
        as an original-layout checkpoint (from_sentencepiece, slow flavour, the added tokens its config.json asks
        for)."""
        from .checkpoint import read_json  # (here: checkpoint.py imports torch, which the command line's --help avoids)

        path = directory / "tokenizer.json"
        if not path.exists():
            if (directory / "tokenizer.model").exists():
                model_config = directory / "config.json"
                added = original_added_tokens(read_json(model_config) if model_config.exists() else {})
                return cls.from_sentencepiece(directory, "slow", added)
            raise PromptError(f"{directory} has no tokenizer.json (nor a sentencepiece tokenizer.model); copy the "
                              "checkpoint's tokenizer files into it")
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any file it cannot parse
            raise PromptError(f"{path}: not a tokenizer the tokenizers library can read ({str(e).splitlines()[0]}); "
                              "the file is corrupt or incomplete, copy it again") from None
        return cls(backend, config)

    @classmethod
    def from_sentencepiece(cls, directory: Path, flavour: str = "slow", added_tokens: Sequence[str] = ()) -> "Tokenizer":
        """The tokenizer of an original-layout LLaVA checkpoint, from its sentencepiece tokenizer.model,
        tokenizer_config.json and special_tokens_map.json, encoding and decoding as the original code's does:

        flavour "slow": transformers 4.37's LlamaTokenizer, honouring `legacy` (the original's choice for
            llama-family checkpoints); "fast": its LlamaTokenizerFast converted from tokenizer.model (the choice
            for checkpoints whose name contains "mistral").
        added_tokens: the tokens the original builder adds after loading, as special tokens, in order; they get
            ids len(tokenizer) onwards. `original_added_tokens(config)` gives them for a model config.

        `<image>` in the text follows the original's rule (tokenizer_image_token): the text is cut at each
        `<image>`, every stretch is tokenized on its own (with its own BOS and "▁" prefix), BOS is kept once at the
        start, and each `<image>` becomes `image_token_id`, which is len(tokenizer): an id outside the vocabulary
        that the model replaces with image features. encode, encode_batch and encode_literal_text all follow it;
        decode skips that id.
        """
        from .checkpoint import read_json

        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        # transformers lets special_tokens_map.json override tokenizer_config.json
        map_path = directory / "special_tokens_map.json"
        special_map = read_json(map_path) if map_path.exists() else {}
        for name, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", None)):
            config[name] = special_map.get(name) or config.get(name, default)
        added_path = directory / "added_tokens.json"
        if "added_tokens_decoder" not in config and added_path.exists():
            # written by transformers < 4.34 (the first LLaVA's checkpoints): the added tokens are only there, and
            # transformers 4.37 gives them their ids, special when the special-token settings name them
            named = {_token_text(config[name]) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
            named |= {_token_text(t) for t in special_map.get("additional_special_tokens")
                      or config.get("additional_special_tokens") or []}
            config["added_tokens_decoder"] = {str(index): {"content": token, "special": token in named}
                                              for token, index in read_json(added_path).items()}
        legacy = config.get("legacy")
        legacy = True if legacy is None else bool(legacy)  # transformers 4.37's default, with a warning
        model_path = directory / "tokenizer.model"
        model = read_model(model_path)
        if flavour == "slow":
            check_slow_supported(model, model_path)
        specials = [_token_text(config[name]) for name in ("bos_token", "eos_token", "unk_token", "pad_token")]
        backend = build_backend(model, flavour, legacy, [t for t in specials if t],
                                bos_token=specials[0], eos_token=specials[1],
                                add_bos=bool(config.get("add_bos_token", True)),
                                add_eos=bool(config.get("add_eos_token", False)))
        tokenizer = cls(backend, config)
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        for token in added_tokens:
            if token not in present:  # the builder's add_tokens leaves a token the tokenizer has as it is
                backend.add_special_tokens([AddedToken(token, normalized=False, special=True)])
        tokenizer.splits_images = True
        tokenizer.image_token_id = tokenizer.vocab_size
        # transformers 4.37 cleans up spaces whenever the config says so, BPE or not
        tokenizer.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        if flavour == "slow":
            tokenizer.slow_decoder = SlowDecoder(model, legacy, backend.get_added_tokens_decoder())
        return tokenizer

    def save(self, directory: Path) -> None:
        """tokenizer.json as run, and a tokenizer_config.json that names its special and added tokens.

        A tokenizer from tokenizer.model (from_sentencepiece) is saved with `<image>` as a special token at
        image_token_id, so that from_dir reads the same ids back: plain text and special tokens encode as before.
        What tokenizer.json cannot say is the original's image rule: from_dir's tokenizer treats `<image>` like
        any special token, so the stretch after it gets a "▁" prefix only where the flavour puts one after special
        tokens (fast and legacy slow: yes; slow with legacy false: no, where the original's rule has one); and it
        decodes as the fast flavour does, without the slow flavour's particulars.
        """
        backend = self.backend
        if self.splits_images:
            backend = HFTokenizer.from_str(self.backend.to_str())
            backend.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
            if backend.token_to_id(IMAGE_TOKEN) != self.image_token_id:
                raise PromptError(f"the tokenizer already has a {IMAGE_TOKEN} token, at id "
                                  f"{backend.token_to_id(IMAGE_TOKEN)}, not at the image id {self.image_token_id}")
        backend.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())
        }
        config.update({k: v for k, v in self.special_tokens.items() if v is not None})
        config["padding_side"] = self.padding_side
        if self.splits_images:
            # run tokenizer.json as stored, not rebuilt by a Llama tokenizer class from its own settings
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            for key in ("legacy", "sp_model_kwargs", "add_bos_token", "add_eos_token"):
                config.pop(key, None)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        check_text(text)
        if self.splits_images:
            return self._encode_image_stretches(text, add_special_tokens, ())
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_literal_text(self, text: str, add_special_tokens: bool, literal: Sequence[tuple[int, int]]) -> list[int]:
        """Like encode(), except that special-token text (`<image>`, `</s>`, `<|im_start|>`, ...) inside the
        `literal` character spans is tokenized as the plain text it is: a user who types `</s>` gets those
        characters, not the end of the prompt. Outside the spans, and wherever no such text occurs, the ids are
        exactly encode()'s."""
        check_text(text)
        if self.splits_images:
            return self._encode_image_stretches(text, add_special_tokens, literal)
        return self._encode_literal(text, add_special_tokens, literal)

    def _encode_literal(self, text: str, add_special_tokens: bool, literal: Sequence[tuple[int, int]]) -> list[int]:
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        if not literal:
            return encoding.ids
        added = self.backend.get_added_tokens_decoder()
        ids: list[int] = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            if token in added and _inside(start, end, literal):
                ids.extend(self._literal_backend().encode(text[start:end], add_special_tokens=False).ids)
            else:
                ids.append(token)
        return ids

    def _encode_image_stretches(self, text: str, add_special_tokens: bool,
                                literal: Sequence[tuple[int, int]]) -> list[int]:
        """The original LLaVA code's tokenizer_image_token: cut the text at every `<image>` (those inside the
        literal spans are text), tokenize each stretch on its own, with the special tokens, keep the first
        stretch's leading BOS once and drop the first token of every stretch, and put image_token_id between them.
        """
        cuts = []
        at = text.find(IMAGE_TOKEN)
        while at >= 0:
            if not _inside(at, at + len(IMAGE_TOKEN), literal):
                cuts.append(at)
            at = text.find(IMAGE_TOKEN, at + len(IMAGE_TOKEN))
        bounds = [0] + [c for cut in cuts for c in (cut, cut + len(IMAGE_TOKEN))] + [len(text)]
        stretches = []
        for start, end in zip(bounds[::2], bounds[1::2]):
            spans = [(max(a, start) - start, min(b, end) - start) for a, b in literal if a < end and b > start]
            stretches.append(self._encode_literal(text[start:end], add_special_tokens, spans))
        # the original drops a first token only when the first stretch starts with BOS (add_bos_token)
        offset = 1 if add_special_tokens and stretches[0][:1] == [self.bos_token_id] else 0
        ids = stretches[0][:offset]
        for k, stretch in enumerate(stretches):
            if k:
                ids.append(self.image_token_id)
            ids.extend(stretch[offset:])
        return ids

    def _literal_backend(self):
        # a copy that does not split out added tokens (a separate object: the flag is per tokenizer, and the
        # engine's thread decodes with the original meanwhile)
        if getattr(self, "_literal", None) is None:
            self._literal = type(self.backend).from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        return self._literal

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        if self.splits_images:
            return [self.encode(text, add_special_tokens) for text in texts]
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up: bool | None = None) -> str:
        """The text of `ids`, cleaned up as the checkpoint's tokenizer_config says unless clean_up says otherwise.
        An image placeholder outside the vocabulary (original-layout checkpoints) has no text."""
        ids = [int(i) for i in ids]
        if self.splits_images:
            ids = [i for i in ids if i != self.image_token_id]
        if self.slow_decoder is not None:
            text = self.slow_decoder.decode(ids, skip_special_tokens)
        else:
            text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if (self.clean_up_spaces if clean_up is None else clean_up) else text

    def decode_window(self, ids: Sequence[int], skip_special_tokens: bool, after_text: bool) -> str:
        """The text of a run of ids inside a longer sequence, without clean-up; after_text: ids before the run
        were written as text. Streaming compares such runs with and without their last tokens, so their start must
        decode the same either way: the slow flavour's decoder drops up to two leading spaces at the start of a
        decode (its first piece's "▁" and, with legacy, the next one's), which only the real start of a text
        loses, and with legacy writes a space for a special token in front of the text before it (see
        SlowDecoder.decode)."""
        if self.slow_decoder is not None and after_text:  # (it writes nothing for the image id)
            return self.slow_decoder.decode([int(i) for i in ids], skip_special_tokens, continuing=True)
        return self.decode(ids, skip_special_tokens, False)

    def starts_with_bos(self, text: str) -> bool:
        bos = self.special_tokens["bos_token"]
        return bool(bos) and text.startswith(bos)


# The spaces that word-piece style decoders leave before punctuation and English contractions.
CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_up_tokenization(text: str) -> str:
    for before, after in CLEAN_UPS:
        text = text.replace(before, after)
    return text


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text pieces that never split a character or lose a space.

    Decoding token by token breaks multi-byte characters and drops the leading space that sentencepiece-style
    decoders strip from the start of any decoded run. So each step decodes a short window that starts a few tokens
    back, compares it with the same window without the new tokens, and keeps only the difference, holding it back
    while it ends in an incomplete character (byte-fallback tokens of a multi-byte character decode to U+FFFD until
    the last one arrives). A complete character is taken on the token that completes it, byte-fallback or not, so
    that whoever watches the text (stop strings) sees it then.

    With clean_up_tokenization_spaces the whole text is cleaned; its last few characters stay unsettled (a later
    token can complete a pattern such as " n't" that removes a space), and only the settled part is handed out.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.raw = ""  # the decode without clean-up
        self.text = ""  # the decode as the tokenizer gives it
        self.handed_out = 0
        self.finished = False

    @property
    def unsettled(self) -> int:
        """How many characters at the end of `text` a later token can still change."""
        if self.finished or not self.tokenizer.clean_up_spaces:
            return 0
        return min(len(self.text), max(len(before) for before, _ in CLEAN_UPS))

    @property
    def settled_length(self) -> int:
        return len(self.text) - self.unsettled

    def _hand_out(self) -> str:
        end = max(self.handed_out, self.settled_length)
        piece, self.handed_out = self.text[self.handed_out : end], end
        return piece

    def add(self, token_id: int) -> str:
        """Take one more token; return the text it settled (often empty)."""
        self.ids.append(token_id)
        after_text = self.prefix_offset > 0  # the tokens before the window have been written as text
        prefix = self.tokenizer.decode_window(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens,
                                              after_text)
        full = self.tokenizer.decode_window(self.ids[self.prefix_offset :], self.skip_special_tokens, after_text)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.raw += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text = clean_up_tokenization(self.raw) if self.tokenizer.clean_up_spaces else self.raw
        return self._hand_out()

    def flush(self) -> str:
        """Whatever is still held back at the very end. Afterwards `text` is the full decode of all the ids."""
        self.raw = self.tokenizer.decode(self.ids, self.skip_special_tokens, False)
        full = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        self.finished = True
        if not full.startswith(self.text[: self.handed_out]):
            # only invalid UTF-8 from the model gets here: a run of byte tokens that decodes differently as a whole
            self.text, self.handed_out = full, len(full)
            return ""
        self.text = full
        return self._hand_out()


# ---------------------------------------------------------------------------------------------------------------------
# Chat templates


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; we render it and remember where it was."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        marker = jinja2.nodes.Name("__generation_marker", "load")
        return jinja2.nodes.CallBlock(self.call_method("_mark", [marker]), [], [], body).set_lineno(lineno)

    def _mark(self, marker, caller):
        return f"{marker}[{caller()}{marker}]" if marker else caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_GenerationTag, jinja2.ext.loopcontrols])
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise_exception
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


BUILTIN_TEMPLATES = ("vicuna", "mistral", "chatml_yi", "chatml_qwen", "llama3")


def builtin_template(name: str) -> str:
    if name not in BUILTIN_TEMPLATES:
        raise PromptError(f"no built-in chat template {name!r} (there are: {', '.join(BUILTIN_TEMPLATES)})")
    return resources.files("llava_next").joinpath(f"templates/{name}.jinja").read_text()


def find_chat_template(directory: Path, tokenizer: Tokenizer) -> tuple[str | None, str]:
    """The checkpoint's chat template and where it came from, in transformers 5's order of precedence."""
    from .checkpoint import read_json

    processor_config = directory / "processor_config.json"
    if processor_config.exists():
        template = read_json(processor_config).get("chat_template")
        if template:
            return template, "processor_config.json"
    legacy = directory / "chat_template.json"
    if legacy.exists():
        template = read_json(legacy).get("chat_template")
        if not isinstance(template, str):
            raise PromptError(f"{legacy}: has no chat_template string")
        return template, "chat_template.json"
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text(), "chat_template.jinja"
    template = tokenizer.chat_template
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template:
        return template, "tokenizer_config.json"
    return None, ""


def resolve_chat_template(tokenizer: Tokenizer, text_model_type: str, directory: Path | None = None,
                          override: str | None = None) -> "ChatTemplate":
    """The one place that decides a chat template: `override` (a built-in name, a template file, or the Jinja
    source itself), else the checkpoint's own (`find_chat_template`), else the built-in one for its family."""
    if override is not None:
        if not isinstance(override, str):
            raise PromptError(f"chat_template must be a string (a built-in name, a file, or Jinja text), not "
                              f"{type(override).__name__}")
        if override in BUILTIN_TEMPLATES:
            source, origin = builtin_template(override), f"built-in template {override!r}"
        elif Path(override).is_file():
            source, origin = Path(override).read_text(), override
        elif "{{" in override or "{%" in override:
            source, origin = override, "the chat_template given"
        else:
            raise PromptError(f"chat template {override!r} is not a built-in name ({', '.join(BUILTIN_TEMPLATES)}), "
                              "a file, or Jinja template text")
        return ChatTemplate(source, origin, tokenizer.special_tokens)
    source, origin = find_chat_template(directory, tokenizer) if directory is not None else (None, "")
    if source is None:
        name = default_template_name(tokenizer, text_model_type)
        source, origin = builtin_template(name), f"built-in template {name!r} (the checkpoint has none)"
    return ChatTemplate(source, origin, tokenizer.special_tokens)


def default_template_name(tokenizer: Tokenizer, text_model_type: str) -> str:
    """The built-in template for a checkpoint that ships none, from the special tokens its tokenizer knows."""
    if tokenizer.token_id("<|start_header_id|>") is not None:
        return "llama3"
    if tokenizer.token_id("<|im_start|>") is not None:
        return "chatml_qwen" if text_model_type == "qwen2" else "chatml_yi"
    if text_model_type == "mistral":
        return "mistral"
    return "vicuna"


def user_turn(text: str, n_images: int) -> dict[str, Any]:
    """A user's message with `n_images` images: the llava convention, the images first, then the text; or where the
    text has `<image>` typed in it (a habit of LLaVA's users: "<image>\nWhat is this?"), the images there."""
    items = [] if IMAGE_TOKEN in text else [{"type": "image"}] * n_images
    return {"role": "user", "content": items + [{"type": "text", "text": text}]}


def normalize_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages in transformers' chat format -> (plain copies for the template, one entry per image place in order:
    the image given inline, or None where the image is to come from the separate `images` list).

    An image place is an image item, or `<image>` typed in a text item: as in transformers, typed text is rendered
    as it is, and the processor takes each `<image>` in the prompt for an image. String content becomes one text
    item (transformers' templates would silently drop it) and OpenAI-style `image_url` items become image items.
    """
    if isinstance(messages, (bytes, bytearray)):
        raise PromptError("the prompt is bytes; decode it to str first (e.g. data.decode('utf-8'))")
    if isinstance(messages, dict) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise PromptError("there are no messages; give at least one {'role': 'user', 'content': ...}")
    out, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise PromptError(f"message {i} must be a dict with a 'role' and a 'content'")
        if message["role"] not in ROLES:  # (a checkpoint's template would render "usr" as a speaker of its own)
            raise PromptError(f"message {i}: role {message['role']!r} is not one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            content = []
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise PromptError(f"message {i}: content must be a string or a list of items, not {type(content).__name__}")
        items = []
        for j, item in enumerate(content):
            if not isinstance(item, dict) or "type" not in item:
                raise PromptError(f"message {i}, content item {j}: expected a dict with a 'type'")
            kind = item["type"]
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise PromptError(f"message {i}, content item {j}: a text item needs a string 'text'")
                items.append({"type": "text", "text": item["text"]})
                images.extend([None] * item["text"].count(IMAGE_TOKEN))
            elif kind in ("image", "image_url"):
                source = item.get("image", item.get("path", item.get("url")))
                if kind == "image_url":
                    url = item.get("image_url")
                    source = url.get("url") if isinstance(url, dict) else url
                images.append(source)
                items.append({"type": "image"})
            else:
                raise PromptError(f"message {i}, content item {j}: content type {kind!r} is not supported "
                                  "(use 'text' and 'image')")
        plain = {k: v for k, v in message.items() if k != "content" and v is not None}
        plain["content"] = items
        out.append(plain)
    return out, images


@dataclass
class RenderedChat:
    text: str
    generation_spans: list[tuple[int, int]]  # character spans the template marked with {% generation %}


class ChatTemplate:
    def __init__(self, source: str, origin: str, special_tokens: dict[str, str | None]):
        if not isinstance(source, str) or not source.strip():
            raise PromptError(f"the chat template from {origin} is {'empty' if isinstance(source, str) else 'not text'}"
                              "; give a Jinja template")
        self.source = source
        self.origin = origin
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise PromptError(f"the chat template from {origin} does not parse: {e}") from None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> RenderedChat:
        marker = "\x00gen" + uuid.uuid4().hex
        variables = {**self.special_tokens, "tools": None, "documents": None, **kwargs}
        try:
            raw = self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                        __generation_marker=marker, **variables)
        except jinja2.TemplateError as e:
            raise PromptError(f"the chat template ({self.origin}) refused the conversation: {e}") from None
        return RenderedChat(*cut_marked(raw, marker))

    def render_marking_text(self, messages: Sequence[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The prompt (with the generation prompt) and the character spans of the messages' own text in it: what
        the template wrote around them is outside every span."""
        marker = "\x00text" + uuid.uuid4().hex

        def mark(text: str) -> str:
            # whitespace at the ends stays outside the marks, so that a template that trims still trims it
            core = text.strip()
            if not core:
                return text
            lead = text[: len(text) - len(text.lstrip())]
            return f"{lead}{marker}[{core}{marker}]{text[len(lead) + len(core):]}"

        marked = [{**m, "content": [{**item, "text": mark(item["text"])} if item.get("type") == "text" else item
                                    for item in m["content"]]} for m in messages]
        text, spans = cut_marked(self.render(marked, add_generation_prompt=True).text, marker)
        if marker in text:  # a template that cut or reordered the text: no span can be trusted
            raise PromptError(f"the chat template ({self.origin}) rewrites message text; it cannot be used where "
                              "message text must stay literal")
        return text, spans


def cut_marked(raw: str, marker: str) -> tuple[str, list[tuple[int, int]]]:
    """Text with `marker[...marker]` marks -> (the text without the marks, the character spans they enclosed)."""
    text, spans, pos = [], [], 0
    while True:
        start = raw.find(marker + "[", pos)
        end = raw.find(marker + "]", start) if start >= 0 else -1
        if end < 0:
            text.append(raw[pos:])
            break
        text.append(raw[pos:start])
        offset = sum(map(len, text))
        body = raw[start + len(marker) + 1 : end]
        text.append(body)
        spans.append((offset, offset + len(body)))
        pos = end + len(marker) + 1
    return "".join(text), spans


# ---------------------------------------------------------------------------------------------------------------------
# Placeholders


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_TOKEN)


def expand_placeholders(text: str, tokens_per_image: Iterable[int]) -> str:
    """Each `<image>` in `text`, in order, repeated to its image's exact token count."""
    counts = list(tokens_per_image)
    pieces = text.split(IMAGE_TOKEN)
    if len(pieces) - 1 != len(counts):
        raise PromptError(image_count_message(len(pieces) - 1, len(counts)))
    out = [pieces[0]]
    for n, piece in zip(counts, pieces[1:]):
        out.append(IMAGE_TOKEN * n)
        out.append(piece)
    return "".join(out)


def images_given(n: int) -> str:
    return f"{counted(n, 'image')} {'was' if n == 1 else 'were'} given"


def image_count_message(placeholders: int, images: int) -> str:
    return (
        f"the prompt has {counted(placeholders, f'{IMAGE_TOKEN} placeholder')} but {images_given(images)}; put one "
        f"{IMAGE_TOKEN} in the prompt where each image goes, in order, or pass chat messages with image items"
    )
