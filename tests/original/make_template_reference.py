"""The original conversation templates' output on many conversations, for tests/test_conversation.py.

Not run by the tests: it needs the original code. It writes `reference/conversation_templates.json`, which the
tests read. Environment: the one of make_reference.py (`.venv-llava-orig`: transformers 4.37.2, llava-torch
1.2.2.post1), plus the LLaVA-NeXT repository's llava/conversation.py as a file outside this repository:

    git clone https://github.com/LLaVA-VL/LLaVA-NeXT /tmp/LLaVA-NeXT        # or any copy of it
    HF_HUB_OFFLINE=1 .venv-llava-orig/bin/python tests/original/make_template_reference.py \\
        --llava-next /tmp/LLaVA-NeXT/llava/conversation.py \\
        --llava-next-commit "$(git -C /tmp/LLaVA-NeXT rev-parse HEAD)"

(from the repository root; a few seconds). That file is loaded as a module by path, not installed, and nothing of
it is copied here. At import it tries to download the gated meta-llama/Meta-Llama-3-8B-Instruct tokenizer for
`llava_llama_3` (HF_HUB_OFFLINE=1 makes that fail at once; it then keeps None and its get_prompt() raises). For
that template this script gives the conversation a stand-in tokenizer that carries exactly that tokenizer's
published chat template and beginning-of-text token, which is all get_prompt() uses of it.

What a conversation is here: our chat messages (role + content items, as llava_next.prompt.normalize_messages
gives them) and the text that stands for an image; it goes to the original as llava/eval/run_llava.py passes a
question: each message's text is its items joined (an image item -> the image text), `conv.system` is replaced by
a system message (after the template's own role header, where its system text starts with one), the user messages
get `conv.roles[0]`, the assistant ones `conv.roles[1]`, and with a generation prompt a last `(roles[1], None)`.
Every template of both repositories renders every conversation; an exception is recorded as "ERROR <type>: ...".

Also recorded: each template's fields (both repositories, where both have it), the stop keyword of llava/serve/
cli.py and whether the original KeywordsStoppingCriteria fires with it on text that does not contain it, and the
template that llava/eval/run_llava.py itself picks for many model paths (its code run up to that choice).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from hashlib import sha256
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
OUT = HERE / "reference" / "conversation_templates.json"

IMAGE = "<image>\n"
IMAGE_START_END = "<im_start><image><im_end>\n"

# The chat template of meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json (and its bos_token), which
# LLaVA-NeXT's llava_llama_3 applies; the tokenizer itself is gated, so it stands in here.
LLAMA_3_INSTRUCT_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 "
    "%}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA_3_BOS = "<|begin_of_text|>"


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMG = {"type": "image"}
ODD = "Line one\nLine two\t\"quoted\" {{ braces }} {% tag %} \\backslash <s></s> ### [INST] Café 北京 😀"


def user(*items) -> dict:
    return {"role": "user", "content": list(items)}


def assistant(*items) -> dict:
    return {"role": "assistant", "content": list(items)}


def system(t: str) -> dict:
    return {"role": "system", "content": [text(t)]}


# (case id, messages, add_generation_prompt, image text)
CASES = [
    ("image_question", [user(IMG, text("What is this?"))], True, IMAGE),
    ("image_question_start_end", [user(IMG, text("What is this?"))], True, IMAGE_START_END),
    ("text_only", [user(text("Tell me a joke."))], True, IMAGE),
    ("two_images", [user(IMG, IMG, text("What is different between these two pictures?"))], True, IMAGE),
    ("two_images_start_end", [user(IMG, IMG, text("Compare them."))], True, IMAGE_START_END),
    ("image_after_text", [user(text("Look: "), IMG, text("What colour?"))], True, IMAGE),
    ("only_an_image", [user(IMG)], True, IMAGE),
    ("odd_characters", [user(IMG, text(ODD))], True, IMAGE),
    ("padded_text", [user(text("  padded question \n")), assistant(text(" padded answer  ")),
                     user(text("\tagain "))], True, IMAGE),
    ("two_turns", [user(IMG, text("What is this?")), assistant(text("A red circle.")),
                   user(text("And the colour?"))], True, IMAGE),
    ("two_turns_start_end", [user(IMG, text("What is this?")), assistant(text("A red circle.")),
                             user(text("And the colour?"))], True, IMAGE_START_END),
    ("three_turns_two_images", [user(IMG, text("First picture?")), assistant(text("A cat.")),
                                user(text("Second?")), assistant(text("Line 1\nLine 2")),
                                user(IMG, text("And this one?"))], True, IMAGE),
    ("system", [system("Answer in one word."), user(IMG, text("What is this?"))], True, IMAGE),
    ("system_empty", [system(""), user(IMG, text("What is this?"))], True, IMAGE),
    ("system_two_turns", [system("You are terse.\nNever apologise."), user(text("Hi")), assistant(text("Hello.")),
                          user(IMG, text("Describe."))], True, IMAGE),
    ("empty_user", [user(text(""))], True, IMAGE),
    ("empty_assistant", [user(IMG, text("What is this?")), assistant(text("")), user(text("Well?"))], True, IMAGE),
    ("empty_second_user", [user(IMG, text("What is this?")), assistant(text("A dog.")), user(text(""))], True, IMAGE),
    ("no_generation_prompt", [user(IMG, text("What is this?"))], False, IMAGE),
    ("no_generation_prompt_answer", [user(IMG, text("What is this?")), assistant(text("A red circle."))], False,
     IMAGE),
    ("no_generation_prompt_system", [system("Be brief."), user(text("Hi")), assistant(text("Hello.")),
                                     user(text("Bye"))], False, IMAGE),
]


def message_text(message: dict, image_text: str) -> str:
    return "".join(image_text if item["type"] == "image" else item["text"] for item in message["content"])


SYSTEM_HEADERS = ("<|im_start|>system\n", "<|system|>\n")


def system_header(template) -> str:
    """The role header the template's system text starts with (a given system message goes after it)."""
    return next((h for h in SYSTEM_HEADERS if template.system.startswith(h)), "")


def render(template, messages, add_generation_prompt, image_text, llama_3_tokenizer):
    conv = copy.deepcopy(template)  # not .copy(): LLaVA-NeXT's copy() drops the tokenizer llava_llama_3 needs
    if getattr(conv, "sep_style", None) is not None and conv.sep_style.name == "LLAMA_3":
        conv.tokenizer = llama_3_tokenizer
    conv.messages = []
    if messages[0]["role"] == "system":
        conv.system = system_header(template) + message_text(messages[0], image_text)
        messages = messages[1:]
    for message in messages:
        conv.append_message(conv.roles[0] if message["role"] == "user" else conv.roles[1],
                            message_text(message, image_text))
    conv.messages = [list(m) for m in template.messages] + conv.messages  # the template's own few-shot exchange
    if add_generation_prompt:
        conv.append_message(conv.roles[1], None)
    try:
        return conv.get_prompt()
    except Exception as e:
        return f"ERROR {type(e).__name__}: {e}"


def stand_in_llama_3_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, LLAMA_3_BOS: 1}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=LLAMA_3_BOS, unk_token="<unk>")
    tokenizer.chat_template = LLAMA_3_INSTRUCT_CHAT_TEMPLATE
    return tokenizer


def template_fields(template) -> dict:
    return {"sep_style": template.sep_style.name, "system": template.system, "roles": list(template.roles),
            "sep": template.sep, "sep2": template.sep2, "version": template.version,
            "preset_messages": [list(m) for m in template.messages]}


def keyword_stop(keyword: str, tokenizer) -> dict:
    """llava/serve/cli.py's stop keyword and whether the original criteria stop on an answer without it."""
    import torch
    from llava.mm_utils import KeywordsStoppingCriteria

    prompt = torch.tensor([tokenizer("USER: hi ASSISTANT:").input_ids])
    answer = tokenizer("The cat", add_special_tokens=False).input_ids
    criteria = KeywordsStoppingCriteria([keyword], tokenizer, prompt)
    fires = bool(criteria(torch.cat([prompt, torch.tensor([answer])], dim=1), None))
    return {"keyword": keyword, "stops_on_text_without_it": fires}


def observed_cli_choice(model_path: str) -> dict:
    """Run llava/eval/run_llava.py's eval_model up to its template choice: the loader is replaced by one that
    records the model name it is given, and conv_templates by a dict that records the key and stops the run."""
    import llava.eval.run_llava as run_llava

    seen = {}

    class Chosen(Exception):
        pass

    class Recorder(dict):
        def __getitem__(self, key):
            seen["template"] = key
            raise Chosen

    def fake_loader(path, base, model_name, *args, **kwargs):
        seen["model_name"] = model_name
        return None, SimpleNamespace(config=SimpleNamespace(mm_use_im_start_end=False)), None, None

    saved = run_llava.load_pretrained_model, run_llava.conv_templates
    run_llava.load_pretrained_model, run_llava.conv_templates = fake_loader, Recorder()
    try:
        run_llava.eval_model(SimpleNamespace(model_path=model_path, model_base=None, query="What?", conv_mode=None,
                                             image_file="x.png", sep=",", temperature=0, top_p=None, num_beams=1,
                                             max_new_tokens=8))
    except Chosen:
        pass
    finally:
        run_llava.load_pretrained_model, run_llava.conv_templates = saved
    return seen


MODEL_PATHS = [
    "liuhaotian/llava-v1.5-7b", "liuhaotian/llava-v1.5-13b", "liuhaotian/llava-v1.6-vicuna-7b",
    "liuhaotian/llava-v1.6-vicuna-13b", "liuhaotian/llava-v1.6-mistral-7b", "liuhaotian/llava-v1.6-34b",
    "liuhaotian/llava-llama-2-13b-chat-lightning-preview", "liuhaotian/llava-v1-0719-336px-lora-merge-vicuna-13b-v1.3",
    "liuhaotian/LLaVA-Lightning-MPT-7B-preview", "liuhaotian/LLaVA-13b-delta-v0", "/ckpts/llava-v1.5-13b/",
    "/ckpts/llava-v1.5-13b/checkpoint-500", "/ckpts/my-model/checkpoint-500", "LLaVA-V1.5-7B-UPPER",
    "lmms-lab/llama3-llava-next-8b", "lmms-lab/llava-next-72b", "lmms-lab/llava-next-110b",
    "lmms-lab/llava-onevision-qwen2-7b-ov", "lmms-lab/llava-next-interleave-qwen-7b", "lmms-lab/LLaVA-Video-7B-Qwen2",
    "lmms-lab/LLaVA-NeXT-Video-7B-DPO", "lmms-lab/LLaVA-NeXT-Video-34B-DPO", "lmms-lab/LLaVA-NeXT-Video-32B-Qwen",
    "xtuner/llava-llama-3-8b-v1_1", "tiny",
]


def load_llava_next(path: Path):
    spec = importlib.util.spec_from_file_location("llava_next_repository_conversation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llava-next", type=Path, required=True, help="LLaVA-NeXT's llava/conversation.py")
    parser.add_argument("--llava-next-commit", default="", help="the commit that file is from (recorded)")
    args = parser.parse_args()

    from importlib.metadata import version

    import llava.conversation as v122
    import transformers
    from transformers import AutoTokenizer

    nxt = load_llava_next(args.llava_next)
    llama_3_tokenizer = stand_in_llama_3_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(str(HERE / "llava-v1.5-tiny"))  # for the stop keywords only

    sources = {"llava-torch 1.2.2": v122.conv_templates, "LLaVA-NeXT": nxt.conv_templates}
    names = list(dict.fromkeys([*v122.conv_templates, *nxt.conv_templates]))
    templates, renderings = {}, {}
    for name in names:
        where = {source: table[name] for source, table in sources.items() if name in table}
        fields = {source: template_fields(t) for source, t in where.items()}
        per_source = {source: [render(t, m, g, i, llama_3_tokenizer) for _, m, g, i in CASES]
                      for source, t in where.items()}
        first = next(iter(per_source.values()))
        if any(r != first for r in per_source.values()):
            sys.exit(f"{name}: the two repositories render differently; record both")
        template = next(iter(where.values()))
        keyword = template.sep2 if template.sep_style.name == "TWO" else template.sep
        templates[name] = {"in": list(where), "fields": next(iter(fields.values())),
                           "fields_differ_between_repositories": len({json.dumps(f) for f in fields.values()}) > 1,
                           "cli_stop": keyword_stop(keyword, tokenizer)}
        # names that are the same object in a repository's conv_templates are stored once
        alias = next((other for other in renderings
                      if any(table.get(other) is table.get(name) is not None for table in sources.values())), None)
        if alias is not None and renderings[alias] == dict(zip([c[0] for c in CASES], first)):
            templates[name]["alias_of"] = alias
        else:
            renderings[name] = dict(zip([c[0] for c in CASES], first))

    reference = {
        "made_by": "tests/original/make_template_reference.py",
        "versions": {"llava-torch": version("llava-torch"), "transformers": transformers.__version__,
                     "LLaVA-NeXT commit": args.llava_next_commit,
                     "LLaVA-NeXT llava/conversation.py sha256": sha256(args.llava_next.read_bytes()).hexdigest()},
        "llama_3_chat_template": LLAMA_3_INSTRUCT_CHAT_TEMPLATE,
        "cases": [{"id": c, "messages": m, "add_generation_prompt": g, "image_text": i} for c, m, g, i in CASES],
        "templates": templates,
        "renderings": renderings,
        "run_llava_choice": {path: observed_cli_choice(path) for path in MODEL_PATHS},
    }
    OUT.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
