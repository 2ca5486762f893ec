"""The original LLaVA conversation templates as chat templates, against the original code's recorded output
(tests/original/reference/conversation_templates.json, written by tests/original/make_template_reference.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from llava_next.conversation import (
    IMAGE_TEXT,
    IMAGE_TEXT_START_END,
    TEMPLATE_NAMES,
    ConversationTemplateError,
    model_name_from_path,
    original_chat_template,
    original_template,
    stop_strings,
    template_for_model_name,
)
from llava_next.prompt import ChatTemplate, PromptError, normalize_messages

REFERENCE_DIR = Path(__file__).resolve().parent / "original" / "reference"
REFERENCE = json.loads((REFERENCE_DIR / "conversation_templates.json").read_text())
CASES = {case["id"]: case for case in REFERENCE["cases"]}
LLAMA_3_GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# What the original's failures look like in our refusals
REFUSALS = {
    "TypeError: can only concatenate str (not \"NoneType\") to str": "cannot render an assistant message",
    "AssertionError: first message should not be none": "the first user message is empty",
}

# LLaVA-NeXT model names, where this project's rule picks the template LLaVA-NeXT documents and the original
# llava-torch 1.2.2 CLI (which predates them) falls back to llava_v0 or llava_v1
NEXT_CHOICES = {
    "lmms-lab/llama3-llava-next-8b": "llava_llama_3",
    "lmms-lab/llava-next-72b": "qwen_1_5",
    "lmms-lab/llava-next-110b": "qwen_1_5",
    "lmms-lab/llava-onevision-qwen2-7b-ov": "qwen_1_5",
    "lmms-lab/llava-next-interleave-qwen-7b": "qwen_1_5",
    "lmms-lab/LLaVA-Video-7B-Qwen2": "qwen_1_5",
    "lmms-lab/LLaVA-NeXT-Video-7B-DPO": "vicuna_v1",
    "lmms-lab/LLaVA-NeXT-Video-34B-DPO": "mistral_direct",
    "lmms-lab/LLaVA-NeXT-Video-32B-Qwen": "qwen_1_5",
    "xtuner/llava-llama-3-8b-v1_1": "llava_llama_3",
}


@functools.lru_cache(maxsize=None)
def chat_template(name: str, image_text: str) -> ChatTemplate:
    return ChatTemplate(original_chat_template(name, image_text), f"original template {name!r}", {})


def render(name: str, messages, add_generation_prompt: bool = True, image_text: str = IMAGE_TEXT) -> str:
    template = chat_template(name, image_text)
    plain, _ = normalize_messages(messages)
    return template.render(plain, add_generation_prompt=add_generation_prompt).text


def recorded(name: str, case_id: str) -> str:
    info = REFERENCE["templates"][name]
    return REFERENCE["renderings"][info.get("alias_of", name)][case_id]


def test_every_template_of_both_repositories_and_no_other():
    assert set(TEMPLATE_NAMES) == set(REFERENCE["templates"])
    assert len(TEMPLATE_NAMES) == 28
    for name, info in REFERENCE["templates"].items():
        assert not info["fields_differ_between_repositories"], name
        assert list(original_template(name).repositories) == info["in"], name


@pytest.mark.parametrize("name", sorted(REFERENCE["templates"]))
def test_fields_are_the_originals(name):
    fields = REFERENCE["templates"][name]["fields"]
    ours = original_template(name)
    assert ours.style == fields["sep_style"].lower()
    assert ours.system_header + ours.system == fields["system"]
    assert list(ours.roles) == fields["roles"]
    assert (ours.sep, ours.sep2) == (fields["sep"], fields["sep2"])
    assert [list(m) for m in ours.presets] == fields["preset_messages"]


@pytest.mark.parametrize("name", sorted(REFERENCE["templates"]))
def test_renders_what_the_original_renders(name):
    checked = 0
    for case_id, case in CASES.items():
        expected = recorded(name, case_id)
        messages, generation, image_text = case["messages"], case["add_generation_prompt"], case["image_text"]
        has_system_text = messages[0]["role"] == "system" and messages[0]["content"][0]["text"]
        if expected.startswith("ERROR "):
            with pytest.raises(PromptError, match=REFUSALS[expected[len("ERROR "):]]):
                render(name, messages, generation, image_text)
        elif name == "gemma_instruct" and has_system_text:
            # the original drops a system text here; this module refuses it instead of losing it
            with pytest.raises(PromptError, match="no place for a system message"):
                render(name, messages, generation, image_text)
            assert expected == render(name, messages[1:], generation, image_text)
        elif name == "llava_llama_3" and not generation:
            # the original always asks the Llama-3 chat template for the generation prompt; without one it is left out
            assert expected.endswith(LLAMA_3_GENERATION_PROMPT)
            assert render(name, messages, generation, image_text) == expected[: -len(LLAMA_3_GENERATION_PROMPT)]
        else:
            assert render(name, messages, generation, image_text) == expected, case_id
        checked += 1
    assert checked == len(CASES) >= 20


def test_the_first_fixtures_one_and_two_turns():
    """tests/original/reference/templates.json (make_reference.py) rendered one and two turns by the same rule."""
    first = json.loads((REFERENCE_DIR / "templates.json").read_text())
    question = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
    two = [question, {"role": "assistant", "content": "A red circle."}, {"role": "user", "content": "And the colour?"}]
    for name, entry in first["templates"].items():
        assert render(name, [question]) == entry["one_turn"], name
        if entry["two_turns"].startswith("ERROR"):
            with pytest.raises(PromptError):
                render(name, two)
        else:
            assert render(name, two) == entry["two_turns"], name


def test_values_spelled_out():
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert render("llava_v1", question) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nHi? ASSISTANT:")
    assert render("mistral_instruct", question, image_text=IMAGE_TEXT_START_END) == (
        "[INST] <im_start><image><im_end>\nHi? [/INST]")
    assert render("qwen_1_5", [{"role": "system", "content": "Be brief."}] + question) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert render("llava_llama_3", question) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nHi?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_llama_3_rule_is_the_recorded_chat_template():
    """llava_llama_3 is meta-llama/Meta-Llama-3-8B-Instruct's chat template over the system message and the
    non-empty messages; run that template itself through our Jinja on the same messages."""
    llama_3 = ChatTemplate(REFERENCE["llama_3_chat_template"], "Meta-Llama-3-8B-Instruct",
                           {"bos_token": "<|begin_of_text|>"})
    conversation = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  Hi\n"},
                    {"role": "assistant", "content": "Hello. "}, {"role": "user", "content": "Bye"}]
    plain, _ = normalize_messages(conversation)
    expected = llama_3.render([{**m, "content": m["content"][0]["text"]} for m in plain]).text
    assert render("llava_llama_3", conversation) == expected


def test_images_stand_where_their_items_are():
    messages = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"},
                                             {"type": "text", "text": "B"}, {"type": "image"}]}]
    assert render("mpt", messages).count("<image>") == 2
    assert "user\nA<image>\nB<image>\n<|im_end|>" in render("mpt", messages)
    assert "user\nA<im_start><image><im_end>\nB" in render("mpt", messages, image_text=IMAGE_TEXT_START_END)


def test_the_placeholder_text_is_taken_literally():
    odd = '<image>"{{ x }}{% y %}\\n\'\n'
    out = render("llava_v0", [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
                 image_text=odd)
    assert "Human: " + odd + "Q###Assistant:" in out


@pytest.mark.parametrize("image_text", ["", "<image><image>\n", "image\n", None])
def test_placeholder_text_must_hold_one_image_token(image_text):
    with pytest.raises(ConversationTemplateError, match="exactly one <image>"):
        original_chat_template("llava_v1", image_text)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ConversationTemplateError) as error:
        original_chat_template("vicuna_v2")
    assert "'vicuna_v2'" in str(error.value)
    for name in ("llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_3", "qwen_1_5", "gemma_instruct"):
        assert name in str(error.value)
    with pytest.raises(ConversationTemplateError):
        stop_strings("nope")
    assert isinstance(error.value, PromptError)


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": "Hi"}], "message 0 is from the assistant"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from the user"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "system", "content": "t"}],
     "message 2 is a system message"),
    ([{"role": "tool", "content": "a"}], "message 0: role 'tool' is not one of system, user, assistant"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "ends with an assistant message"),
])
@pytest.mark.parametrize("name", ["llava_v1", "llava_llama_2", "qwen_1_5", "llava_llama_3", "plain"])
def test_conversations_the_templates_refuse(name, messages, problem):
    with pytest.raises(PromptError, match=problem):
        render(name, messages)


def test_without_generation_prompt_a_last_answer_is_fine():
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert render("llava_v1", messages, add_generation_prompt=False).endswith("USER: a ASSISTANT: b</s>")


def test_literal_text_spans_cover_the_messages_text():
    """The processor renders with render_marking_text to keep special-token text typed by a user literal."""
    template = ChatTemplate(original_chat_template("llava_llama_3"), "llava_llama_3", {})
    messages, _ = normalize_messages([{"role": "user", "content": [{"type": "image"},
                                                                   {"type": "text", "text": "  say </s> "}]}])
    text, spans = template.render_marking_text(messages)
    assert text == render("llava_llama_3", messages)
    assert [text[a:b] for a, b in spans] == ["say </s>"]


def test_stop_strings_are_the_cli_keywords():
    for name, info in REFERENCE["templates"].items():
        keyword = info["cli_stop"]["keyword"]
        if info["cli_stop"]["stops_on_text_without_it"]:
            # the original's "" keyword ends every answer after one token; it is left out
            assert keyword == "" and stop_strings(name) == [], name
        else:
            assert stop_strings(name) == [keyword], name
    assert stop_strings("llava_v0") == ["###"]
    assert stop_strings("llava_v1") == ["</s>"]


def test_model_name_and_template_as_the_original_cli_chooses():
    for path, choice in REFERENCE["run_llava_choice"].items():
        assert model_name_from_path(path) == choice["model_name"], path
        expected = NEXT_CHOICES.get(path, choice["template"])
        assert template_for_model_name(model_name_from_path(path)) == expected, path
    assert set(NEXT_CHOICES) <= set(REFERENCE["run_llava_choice"])
    first = json.loads((REFERENCE_DIR / "templates.json").read_text())
    for name, template in first["cli_rule_examples"].items():
        assert template_for_model_name(name) == template, name
    with pytest.raises(ConversationTemplateError, match="must be a string"):
        template_for_model_name(None)
