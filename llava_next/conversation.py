"""The original LLaVA repositories' conversation templates, by name, as chat templates.

Checkpoints in the layout of the original repositories (github haotian-liu/LLaVA, published on PyPI as llava-torch
1.2.2, and github LLaVA-VL/LLaVA-NeXT) ship no chat template: the original code builds every prompt with one of the
templates of its `llava/conversation.py` (`conv_templates[name].copy()`, `append_message`, `get_prompt()`), and its
command line picks the name from the model name. Here each of those templates becomes Jinja source for
`llava_next.prompt.ChatTemplate` that renders our normalized messages to exactly the text `get_prompt()` gives.

How a conversation maps onto the original's (the rules below are what the tests check against the recorded output
of the original code, tests/original/reference/conversation_templates.json):

- A message's text is its items in order: a text item is its text, an image item is `image_text` ("<image>\\n", or
  "<im_start><image><im_end>\\n" for checkpoints with `mm_use_im_start_end`), with nothing in between. So an image
  followed by a question is "<image>\\nWhat is this?", as llava/eval/run_llava.py builds it, and two images are
  "<image>\\n<image>\\n...".
- Messages alternate user, assistant, user, ... starting with a user message, after an optional system message;
  the user is the template's first role, the assistant its second.
- A system message replaces the template's system text. Where the template's system text begins with a role header
  (the ChatML-style templates: "<|im_start|>system\\n", "<|system|>\\n"), the header stays and the message replaces
  what follows it. The few-shot example of `default` / `v0` stays.
- The generation prompt is what `get_prompt()` adds for a last assistant message of None (for some templates
  nothing); without it the text is `get_prompt()` of the messages alone.
- The original tests a message with `if message:`, so a message whose text is empty renders as the generation
  prompt would (e.g. "USER:" with no separator), or not at all in the llama-2 and llama-3 styles. That is
  reproduced as is.

Where the original cannot render a conversation, the template refuses it with a message (a PromptError from
ChatTemplate): `plain` / `v0_plain` with an assistant message (the original fails: its second separator is None),
the llama-2 style with an empty first message (the original's assertion), and conversations that do not alternate
or end with an assistant message while a generation prompt is asked for. Two rules are this module's own:
`gemma_instruct` refuses a system message with text (the original silently drops it), and `llava_llama_3`, whose
original needs the meta-llama/Meta-Llama-3-8B-Instruct tokenizer (gated; without it the original raises), renders
with that tokenizer's published chat template, which the original applies to the system message and every non-empty
message (the text of each trimmed), always with a generation prompt; without one here, the assistant header is left
out. That template writes the beginning-of-text token "<|begin_of_text|>" into the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .prompt import IMAGE_TOKEN, PromptError

IMAGE_TEXT = IMAGE_TOKEN + "\n"  # what llava/eval/run_llava.py puts before the question
IMAGE_TEXT_START_END = "<im_start>" + IMAGE_TOKEN + "<im_end>\n"  # the same with mm_use_im_start_end


class ConversationTemplateError(PromptError):
    """An unknown conversation template name or an unusable placeholder text."""


# ---------------------------------------------------------------------------------------------------------------------
# The templates, as the two repositories define them

# Separator styles (the original's SeparatorStyle): how get_prompt() joins system text, roles and messages.
SINGLE, TWO, MPT, PLAIN, LLAMA_2, LLAMA_3, CHATML, GEMMA = (
    "single", "two", "mpt", "plain", "llama_2", "llama_3", "chatml", "gemma")

V122 = "llava-torch 1.2.2"
NEXT = "LLaVA-NeXT"


@dataclass(frozen=True)
class OriginalTemplate:
    style: str
    system: str  # the default system text, without system_header
    roles: tuple[str, str]  # (user, assistant) as written into the prompt
    sep: str
    sep2: str | None = None
    system_header: str = ""  # the role header the original's system text begins with; a given system keeps it
    presets: tuple[tuple[str, str], ...] = field(default=())  # a few-shot exchange before the conversation
    repositories: tuple[str, ...] = (V122, NEXT)  # whose conv_templates have it


_HUMAN_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_USER_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_MMTAG_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant is able to understand the visual content that the user provides, and assist the user "
                 "with a variety of tasks using natural language."
                 "The visual content will be provided with the following format: <Image>visual content</Image>.")
_VISION_ASSISTANT_SYSTEM = ("You are a helpful language and vision assistant. "
                            "You are able to understand the visual content that the user provides, "
                            "and assist the user with a variety of tasks using natural language.")
_LLAMA_2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.")
_ENERGY_EXAMPLE = (
    ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
    ("Assistant",
     "Renewable energy sources are those that can be replenished naturally in a relatively short amount of time, "
     "such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other hand, are "
     "finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key differences "
     "between renewable and non-renewable energy sources:\n"
     "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy sources are "
     "finite and will eventually run out.\n"
     "2. Environmental impact: Renewable energy sources have a much lower environmental impact than non-renewable "
     "sources, which can lead to air and water pollution, greenhouse gas emissions, and other negative effects.\n"
     "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have lower "
     "operational costs than non-renewable sources.\n"
     "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote locations "
     "than non-renewable sources.\n"
     "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different situations "
     "and needs, while non-renewable sources are more rigid and inflexible.\n"
     "6. Sustainability: Renewable energy sources are more sustainable over the long term, while non-renewable "
     "sources are not, and their depletion can lead to economic and social instability.\n"),
)
_IM_START_SYSTEM = "<|im_start|>system\n"
_IM_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_VICUNA_V0 = OriginalTemplate(SINGLE, _HUMAN_SYSTEM, ("Human", "Assistant"), "###", presets=_ENERGY_EXAMPLE)
_VICUNA_V1 = OriginalTemplate(TWO, _USER_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
_LLAVA_V0 = OriginalTemplate(SINGLE, _HUMAN_SYSTEM, ("Human", "Assistant"), "###")
_LLAVA_V0_MMTAG = OriginalTemplate(SINGLE, _MMTAG_SYSTEM, ("Human", "Assistant"), "###")
_LLAVA_V1 = OriginalTemplate(TWO, _HUMAN_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
_LLAVA_V1_MMTAG = OriginalTemplate(TWO, _MMTAG_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>")
_LLAMA_2 = OriginalTemplate(LLAMA_2, _LLAMA_2_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>")
_LLAVA_LLAMA_2 = OriginalTemplate(LLAMA_2, _VISION_ASSISTANT_SYSTEM, ("USER", "ASSISTANT"), "<s>", "</s>")
_MISTRAL_INSTRUCT = OriginalTemplate(LLAMA_2, "", ("USER", "ASSISTANT"), "", "</s>")
_MPT = OriginalTemplate(MPT, "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful "
                        "and honest answers.", _IM_ROLES, "<|im_end|>", system_header=_IM_START_SYSTEM)
_CHATML_DIRECT = OriginalTemplate(MPT, "Answer the questions.", _IM_ROLES, "<|im_end|>", system_header=_IM_START_SYSTEM)
_PLAIN = OriginalTemplate(PLAIN, "", ("", ""), "\n")

_NEXT = dict(repositories=(NEXT,))
_LLAVA_V0_MMTAG = OriginalTemplate(SINGLE, _MMTAG_SYSTEM, ("Human", "Assistant"), "###", **_NEXT)
_LLAVA_V1_MMTAG = OriginalTemplate(TWO, _MMTAG_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", **_NEXT)
_LLAVA_LLAMA_3 = OriginalTemplate(LLAMA_3, _VISION_ASSISTANT_SYSTEM, ("user", "assistant"), "<|eot_id|>", **_NEXT)
_LLAVA_LLAMA_2_SIMPLE = OriginalTemplate(
    LLAMA_2, "Answer the questions about the visual content that the user provides.", ("USER", "ASSISTANT"), "<s>",
    "</s>", **_NEXT)
_LLAVA_LLAMA_2_MMTAG = OriginalTemplate(
    LLAMA_2, "Answer the questions about the visual content that the user provides."
    "The visual content will be provided with the following format: <Image>visual content</Image>.",
    ("USER", "ASSISTANT"), "<s>", "</s>", **_NEXT)
_QWEN = OriginalTemplate(CHATML, "You are a helpful assistant.", ("<|im_start|>user", "<|im_start|>assistant"),
                         "<|im_end|>", system_header=_IM_START_SYSTEM, **_NEXT)
_QWEN_2_5 = OriginalTemplate(CHATML, "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                             ("<|im_start|>user", "<|im_start|>assistant"), "<|im_end|>",
                             system_header=_IM_START_SYSTEM, **_NEXT)
_MISTRAL_ORCA = OriginalTemplate(
    MPT, "You are MistralOrca, a large language model trained by Alignment Lab AI. Write out your reasoning "
    "step-by-step to be sure you get the right answers!", _IM_ROLES, "<|im_end|>", system_header=_IM_START_SYSTEM,
    **_NEXT)
_MISTRAL_ZEPHYR = OriginalTemplate(MPT, "You are a helpful AI assistant.", ("<|user|>\n", "<|assistant|>\n"), "</s>",
                                   system_header="<|system|>\n", **_NEXT)
_GEMMA_INSTRUCT = OriginalTemplate(GEMMA, "", ("<start_of_turn>user\n", "<start_of_turn>model\n"),
                                   "<end_of_turn>\n", **_NEXT)

# Every name either repository's conv_templates has; several names share one template, as there.
TEMPLATES: dict[str, OriginalTemplate] = {
    "default": _VICUNA_V0,
    "v0": _VICUNA_V0,
    "v1": _VICUNA_V1,
    "vicuna_v1": _VICUNA_V1,
    "llama_2": _LLAMA_2,
    "mistral_instruct": _MISTRAL_INSTRUCT,
    "chatml_direct": _CHATML_DIRECT,
    "mistral_direct": _CHATML_DIRECT,
    "plain": _PLAIN,
    "v0_plain": _PLAIN,
    "llava_v0": _LLAVA_V0,
    "v0_mmtag": OriginalTemplate(SINGLE, _MMTAG_SYSTEM, ("Human", "Assistant"), "###", repositories=(V122,)),
    "llava_v1": _LLAVA_V1,
    "v1_mmtag": OriginalTemplate(TWO, _MMTAG_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", repositories=(V122,)),
    "llava_llama_2": _LLAVA_LLAMA_2,
    "mpt": _MPT,
    # LLaVA-NeXT only
    "mistral_orca": _MISTRAL_ORCA,
    "mistral_zephyr": _MISTRAL_ZEPHYR,
    "llava_v0_mmtag": _LLAVA_V0_MMTAG,
    "llava_v1_mmtag": _LLAVA_V1_MMTAG,
    "llava_llama_3": _LLAVA_LLAMA_3,
    "llava_llama_2_simple": _LLAVA_LLAMA_2_SIMPLE,
    "llava_llama_2_mmtag": _LLAVA_LLAMA_2_MMTAG,
    "llava_mistral_instruct": OriginalTemplate(LLAMA_2, "", ("USER", "ASSISTANT"), "", "</s>", **_NEXT),
    "qwen_1_5": _QWEN,
    "qwen_2": _QWEN,
    "qwen_2_5": _QWEN_2_5,
    "gemma_instruct": _GEMMA_INSTRUCT,
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)

# meta-llama/Meta-Llama-3-8B-Instruct's beginning-of-text token, which its chat template writes into the text
LLAMA_3_BOS = "<|begin_of_text|>"


def original_template(name: str) -> OriginalTemplate:
    if not isinstance(name, str) or name not in TEMPLATES:
        raise ConversationTemplateError(
            f"unknown conversation template {name!r}; the original LLaVA repositories define: "
            f"{', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]


# ---------------------------------------------------------------------------------------------------------------------
# Choosing a template from the model name


def model_name_from_path(path: str) -> str:
    """The model name the original code derives from a checkpoint path or Hub id (llava.mm_utils
    get_model_name_from_path): the last path component, or "<parent>_checkpoint-N" for a training checkpoint."""
    parts = str(path).strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def template_for_model_name(name: str) -> str:
    """The conversation template for a model name (see model_name_from_path), first match on the lower-cased name.

    LLaVA-NeXT's models come first; its code chooses no template itself, so these rules follow its documentation:
    "llama-3" / "llama3" -> llava_llama_3 (lmms-lab/llama3-llava-next-8b, docs/LLaVA-NeXT.md); "qwen" -> qwen_1_5
    (llava-onevision-qwen2-*, llava-next-interleave-qwen-*, LLaVA-Video-7B-Qwen2, LLaVA-NeXT-Video-32B-Qwen: every
    Qwen-based model's documented template); "llava-next-72b" / "llava-next-110b" -> qwen_1_5 (Qwen1.5-based,
    docs/LLaVA-NeXT.md); "llava-next-video-34b" -> mistral_direct and other "llava-next-video" -> vicuna_v1
    (docs/LLaVA-NeXT-Video.md). Then llava-torch 1.2.2's rule (llava/eval/run_llava.py and llava/serve/cli.py):
    "llama-2" -> llava_llama_2, "mistral" -> mistral_instruct, "v1.6-34b" -> chatml_direct, "v1" -> llava_v1,
    "mpt" -> mpt, anything else llava_v0.
    """
    if not isinstance(name, str):
        raise ConversationTemplateError(f"the model name must be a string, not {type(name).__name__}")
    lowered = name.lower()
    rules = (
        (("llama-3", "llama3"), "llava_llama_3"),
        (("qwen", "llava-next-72b", "llava-next-110b"), "qwen_1_5"),
        (("llava-next-video-34b",), "mistral_direct"),
        (("llava-next-video",), "vicuna_v1"),
        (("llama-2",), "llava_llama_2"),
        (("mistral",), "mistral_instruct"),
        (("v1.6-34b",), "chatml_direct"),
        (("v1",), "llava_v1"),
        (("mpt",), "mpt"),
    )
    for needles, template in rules:
        if any(needle in lowered for needle in needles):
            return template
    return "llava_v0"


# ---------------------------------------------------------------------------------------------------------------------
# Stop strings


def stop_strings(name: str) -> list[str]:
    """Where the original ends an answer in a chat: llava/serve/cli.py (both repositories) and the web demo's model
    worker stop generating at the template's second separator for the TWO style and at its first otherwise, and cut
    it from the answer. An empty separator gives no stop string (mistral_instruct: the original's keyword "" matches
    any text and ends every answer after its first token).

    The one-shot llava/eval/run_llava.py of llava-torch 1.2.2 uses none (it stops at the EOS token or the length
    limit), so to reproduce its answers apply none. Several of these strings are special tokens ("</s>",
    "<|im_end|>", "<|eot_id|>") that text decoded without special tokens never contains: the original also compares
    token ids, so stop on the token id where the tokenizer has the string as one token.
    """
    template = original_template(name)
    stop = template.sep2 if template.style == TWO else template.sep
    return [stop] if stop else []


# ---------------------------------------------------------------------------------------------------------------------
# Jinja source

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?'()-_/=+*&^$~|[]<>")


def _literal(text: str) -> str:
    """A Jinja string literal for any text: Jinja unescapes literals like Python's unicode-escape, so everything
    beyond plain characters goes in as \\U escapes (no quote, backslash, brace or newline left to misread)."""
    return '"' + "".join(c if c in _SAFE else f"\\U{ord(c):08x}" for c in text) + '"'


# Shared by every style: `text_of` (a message's text), `system` (the given or the default system text), `chat`
# (the messages after it), and the checks every style needs.
_PRELUDE = """
{%- macro text_of(message) -%}
  {%- if message.content is string -%}{{- message.content -}}
  {%- else -%}
    {%- for item in message.content -%}
      {%- if item.type == 'image' -%}{{- @IMAGE_TEXT@ -}}
      {%- elif item.type == 'text' -%}{{- item.text -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0].role == 'system' -%}
  {%- set system = @SYSTEM_HEADER@ + text_of(messages[0]) -%}
  {%- set chat = messages[1:] -%}
  {%- set first = 1 -%}
{%- else -%}
  {%- set system = @SYSTEM@ -%}
  {%- set chat = messages -%}
  {%- set first = 0 -%}
{%- endif -%}
{%- if not chat -%}
  {{- raise_exception("the conversation has no user message; give at least one message with role 'user'") -}}
{%- endif -%}
{%- for message in chat -%}
  {%- if message.role == 'system' -%}
    {{- raise_exception("message " ~ (loop.index0 + first) ~ " is a system message; only the first message can be") -}}
  {%- elif message.role != 'user' and message.role != 'assistant' -%}
    {{- raise_exception("message " ~ (loop.index0 + first) ~ " has role '" ~ message.role ~ "'; the " ~ @NAME@ ~
                        " template knows 'system', 'user' and 'assistant'") -}}
  {%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception("message " ~ (loop.index0 + first) ~ " is from the " ~ message.role ~ "; the " ~ @NAME@ ~
                        " template needs user and assistant messages in turn, the user first") -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and chat[-1].role == 'assistant' -%}
  {{- raise_exception("the conversation ends with an assistant message, so a generation prompt would start a "
                      "second assistant turn; end it with a user message or ask for no generation prompt") -}}
{%- endif -%}
"""

# get_prompt() of each separator style. `role` is the template's name for the message's role.
_ROLE = "{%- set role = @USER@ if message.role == 'user' else @ASSISTANT@ -%}"

_STYLES = {
    SINGLE: """
{{- system + @SEP@ + @PRESETS@ -}}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}{{- role + ": " + text + @SEP@ -}}{%- else -%}{{- role + ":" -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ + ":" -}}{%- endif -%}
""",
    TWO: """
{{- system + @SEP@ -}}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}{{- role + ": " + text + (@SEP@ if message.role == 'user' else @SEP2@) -}}
  {%- else -%}{{- role + ":" -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ + ":" -}}{%- endif -%}
""",
    MPT: """
{{- system + @SEP@ -}}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}{{- role + text + @SEP@ -}}{%- else -%}{{- role -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ -}}{%- endif -%}
""",
    CHATML: """
{%- if system -%}{{- system + @SEP@ + "\\n" -}}{%- endif -%}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}{{- role + "\\n" + text + @SEP@ + "\\n" -}}{%- else -%}{{- role + "\\n" -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ + "\\n" -}}{%- endif -%}
""",
    # the original ignores its system text here; a given system text would vanish, so it is refused
    GEMMA: """
{%- if first and system -%}
  {{- raise_exception("the " ~ @NAME@ ~ " template has no place for a system message (the original drops it); "
                      "put the instructions into the first user message") -}}
{%- endif -%}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}{{- role + text + @SEP@ -}}{%- else -%}{{- role -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- @ASSISTANT@ -}}{%- endif -%}
""",
    # the original's second separator is None: any assistant message with text fails there (TypeError)
    PLAIN: """
{{- system -}}
{%- for message in chat -%}{%- set text = text_of(message) -%}
  {%- if text and message.role == 'assistant' -%}
    {{- raise_exception("the " ~ @NAME@ ~ " template cannot render an assistant message (the original fails: its "
                        "second separator is None); give only the user message") -}}
  {%- elif text -%}{{- text + @SEP@ -}}
  {%- endif -%}
{%- endfor -%}
""",
    # the first message carries the system text; the original strips its leading separator; empty later messages
    # and the generation prompt add nothing
    LLAMA_2: """
{%- for message in chat -%}{%- set text = text_of(message) -%}
  {%- if loop.first -%}
    {%- if not text -%}
      {{- raise_exception("the first user message is empty; the " ~ @NAME@ ~ " template (like the original, which "
                          "asserts it) needs text or an image there") -}}
    {%- endif -%}
    {%- if system -%}{%- set text = "<<SYS>>\\n" + system + "\\n<</SYS>>\\n\\n" + text -%}{%- endif -%}
    {{- "[INST] " + text + " [/INST]" -}}
  {%- elif text and message.role == 'user' -%}{{- @SEP@ + "[INST] " + text + " [/INST]" -}}
  {%- elif text -%}{{- " " + text + " " + @SEP2@ -}}
  {%- endif -%}
{%- endfor -%}
""",
    # meta-llama/Meta-Llama-3-8B-Instruct's chat template applied to the system message and the non-empty messages
    LLAMA_3: """
{{- @BOS@ + "<|start_header_id|>system<|end_header_id|>\\n\\n" + system | trim + "<|eot_id|>" -}}
{%- for message in chat -%}@ROLE@{%- set text = text_of(message) -%}
  {%- if text -%}
    {{- "<|start_header_id|>" + role + "<|end_header_id|>\\n\\n" + text | trim + "<|eot_id|>" -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|start_header_id|>" + @ASSISTANT@ + "<|end_header_id|>\\n\\n" -}}{%- endif -%}
""",
}


def original_chat_template(name: str, image_text: str = IMAGE_TEXT) -> str:
    """Jinja source (for llava_next.prompt.ChatTemplate) that renders messages as the original template `name`
    does; each image item becomes `image_text` (IMAGE_TEXT, or IMAGE_TEXT_START_END for mm_use_im_start_end)."""
    template = original_template(name)
    if not isinstance(image_text, str) or image_text.count(IMAGE_TOKEN) != 1:
        raise ConversationTemplateError(
            f"image_text must be the text that stands for one image, with exactly one {IMAGE_TOKEN} in it (e.g. "
            f"{IMAGE_TEXT!r} or {IMAGE_TEXT_START_END!r}), not {image_text!r}")
    presets = "".join(role + ": " + text + template.sep for role, text in template.presets)
    values = {
        "@ROLE@": _ROLE,  # first: it holds placeholders of its own
        "@IMAGE_TEXT@": image_text,
        "@SYSTEM_HEADER@": template.system_header,
        "@SYSTEM@": template.system_header + template.system,
        "@NAME@": name,
        "@USER@": template.roles[0],
        "@ASSISTANT@": template.roles[1],
        "@SEP@": template.sep,
        "@SEP2@": template.sep2 or "",
        "@PRESETS@": presets,
        "@BOS@": LLAMA_3_BOS,
    }
    source = _PRELUDE + _STYLES[template.style]
    for placeholder, value in values.items():
        source = source.replace(placeholder, value if placeholder == "@ROLE@" else _literal(value))
    return source
