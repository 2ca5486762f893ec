"""Text in and out: the tokenizer, chat templates, image-placeholder expansion and streaming detokenization.

The tokenizer is the checkpoint's own `tokenizer.json`, run by the `tokenizers` library exactly as stored (its
normalizer, pre-tokenizer, post-processor and decoder), which is what transformers 5 does for LLaVA checkpoints.
`tokenizer_config.json` supplies the names of the special tokens, added tokens missing from tokenizer.json, and
possibly a chat template.
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

from .checkpoint import read_json
from .errors import LlavaError

IMAGE_TOKEN = "<image>"


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


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any] | None = None):
        self.backend = tokenizer
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
        path = directory / "tokenizer.json"
        if not path.exists():
            raise PromptError(
                f"{directory} has no tokenizer.json. Checkpoints with only a sentencepiece tokenizer.model are not "
                "supported yet; save the tokenizer once with transformers (AutoTokenizer.from_pretrained(...)"
                ".save_pretrained(dir)) to write a tokenizer.json."
            )
        config_path = directory / "tokenizer_config.json"
        config = read_json(config_path) if config_path.exists() else {}
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for any file it cannot parse
            raise PromptError(f"{path}: not a tokenizer the tokenizers library can read ({str(e).splitlines()[0]}); "
                              "the file is corrupt or incomplete, copy it again") from None
        return cls(backend, config)

    def save(self, directory: Path) -> None:
        """tokenizer.json as run, and a tokenizer_config.json that names its special and added tokens."""
        self.backend.save(str(directory / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config.update({k: v for k, v in self.special_tokens.items() if v is not None})
        config["padding_side"] = self.padding_side
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
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_literal_text(self, text: str, add_special_tokens: bool, literal: Sequence[tuple[int, int]]) -> list[int]:
        """Like encode(), except that special-token text (`<image>`, `</s>`, `<|im_start|>`, ...) inside the
        `literal` character spans is tokenized as the plain text it is: a user who types `</s>` gets those
        characters, not the end of the prompt. Outside the spans, and wherever no such text occurs, the ids are
        exactly encode()'s."""
        check_text(text)
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        added = self.backend.get_added_tokens_decoder()
        ids: list[int] = []
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            inside = end > start and any(a <= start and end <= b for a, b in literal)
            if token in added and inside:
                ids.extend(self._literal_backend().encode(text[start:end], add_special_tokens=False).ids)
            else:
                ids.append(token)
        return ids

    def _literal_backend(self):
        # a copy that does not split out added tokens (a separate object: the flag is per tokenizer, and the
        # engine's thread decodes with the original meanwhile)
        if getattr(self, "_literal", None) is None:
            self._literal = type(self.backend).from_str(self.backend.to_str())
            self._literal.encode_special_tokens = True
        return self._literal

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up: bool | None = None) -> str:
        """The text of `ids`, cleaned up as the checkpoint's tokenizer_config says unless clean_up says otherwise."""
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if (self.clean_up_spaces if clean_up is None else clean_up) else text

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
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens, False)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], self.skip_special_tokens, False)
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


def normalize_messages(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages in transformers' chat format -> (plain copies for the template, one entry per image item in order:
    the image given inline, or None where the image is to come from the separate `images` list).

    String content becomes one text item (transformers' templates would silently drop it) and OpenAI-style
    `image_url` items become image items.
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


def image_count_message(placeholders: int, images: int) -> str:
    return (
        f"the prompt has {placeholders} {IMAGE_TOKEN} placeholder{'s' * (placeholders != 1)} but "
        f"{images} image{'s' * (images != 1)} {'was' if images == 1 else 'were'} given; put one {IMAGE_TOKEN} in the "
        "prompt where each image goes, in order, or pass chat messages with image items"
    )
