"""Our outputs against transformers' on the same tiny checkpoints: inputs, logits, greedy tokens, batching."""

from __future__ import annotations

import pytest
import torch

from conftest import SPECS, random_image, reference_model, reference_processor, reference_prompt, smooth_image
from tiny_checkpoints import FAMILIES

ALL = list(SPECS)
QUESTION = "What is shown in this image?"


def chat(n_images: int = 1, text: str = QUESTION):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize("name", ALL)
def test_inputs_logits_and_greedy_tokens_match_transformers(name, tiny, load_pipeline):
    directory = tiny(name)
    pipe = load_pipeline(directory)
    processor = reference_processor(directory)
    model = reference_model(directory)
    images = [smooth_image(500, 316, seed=1), random_image(97, 730, seed=2)]
    messages = chat(2)

    prompt = pipe.processor.apply_chat_template(messages)
    assert prompt == reference_prompt(processor, messages, FAMILIES[SPECS[name]["family"]]["template"])
    ours = pipe.processor(prompt, images)
    theirs = processor(text=prompt, images=images, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    if "image_sizes" in theirs:
        assert torch.equal(ours["image_sizes"], theirs["image_sizes"])

    with torch.no_grad():
        logits = pipe.model(**ours)
        reference = model(**theirs).logits
    assert logits.shape == reference.shape
    assert relative_error(logits, reference) < 1e-4

    generated = pipe.generate(messages, images, max_new_tokens=8)
    expected = model.generate(**theirs, max_new_tokens=8, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    assert generated.token_ids == expected.tolist()
    assert generated.text == processor.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["vicuna", "mistral_window", "qwen2", "llava15", "v4_llama3"])
def test_batched_generation_equals_single_runs(name, tiny, load_pipeline):
    pipe = load_pipeline(tiny(name))
    prompts = [chat(1, "Describe it."), chat(2, "Which is bigger?"), [{"role": "user", "content": "Just text here."}]]
    images = [[smooth_image(300, 200, seed=3)], [random_image(40, 900, seed=4), smooth_image(1000, 1000, seed=5)], []]
    batch = pipe.generate(prompts, images, max_new_tokens=6)
    for prompt, ims, result in zip(prompts, images, batch):
        single = pipe.generate(prompt, ims, max_new_tokens=6)
        assert result.token_ids == single.token_ids
        assert result.text == single.text

    # and the logits themselves agree, padding or not
    inputs, _ = pipe.prepare(prompts, images)
    with torch.no_grad():
        batched_logits = pipe.model(**inputs, logits_to_keep=1)
        for i, (prompt, ims) in enumerate(zip(prompts, images)):
            single_inputs, _ = pipe.prepare(prompt, ims)
            single_logits = pipe.model(**single_inputs, logits_to_keep=1)
            assert relative_error(batched_logits[i], single_logits[0]) < 1e-4


@pytest.mark.parametrize("name", ["mistral_window", "llama3"])
def test_batched_logits_match_transformers_with_left_padding(name, tiny, load_pipeline):
    directory = tiny(name)
    pipe = load_pipeline(directory)
    processor = reference_processor(directory)
    processor.tokenizer.padding_side = "left"
    model = reference_model(directory)
    texts = [pipe.processor.apply_chat_template(chat(1, "A longer question about the picture, please?")),
             pipe.processor.apply_chat_template(chat(1, "Short?"))]
    images = [smooth_image(640, 480, seed=6), random_image(200, 50, seed=7)]
    ours = pipe.processor(texts, images)
    theirs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    with torch.no_grad():
        logits = pipe.model(**ours)
        reference = model(**theirs).logits
    real = ours["attention_mask"].bool()
    assert relative_error(logits[real], reference[real]) < 1e-4


@pytest.mark.parametrize("name", ["vicuna", "mistral_window", "qwen2_window"])
def test_cached_decoding_equals_uncached(name, tiny, load_pipeline):
    """Each token's logits from the KV-cached engine equal a full forward pass over the sequence so far."""
    pipe = load_pipeline(tiny(name))
    image = smooth_image(400, 300, seed=8)
    result = pipe.generate(chat(1), [image], max_new_tokens=5)
    inputs, _ = pipe.prepare(chat(1), [image])
    ids = inputs["input_ids"]
    for token in result.token_ids:
        with torch.no_grad():
            logits = pipe.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                                image_sizes=inputs["image_sizes"], logits_to_keep=1)
        assert logits[0, -1].argmax().item() == token
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_sliding_window_changes_the_output(tiny, load_pipeline):
    """The windowed checkpoint really attends to fewer positions: without the window its logits differ."""
    pipe = load_pipeline(tiny("mistral_window"))
    inputs, _ = pipe.prepare(chat(1), [smooth_image(500, 316)])
    decoder = pipe.model.language_model
    with torch.no_grad():
        windowed = pipe.model(**inputs, logits_to_keep=1)
        saved = [layer.window for layer in decoder.layers]
        for layer in decoder.layers:
            layer.window = None
        try:
            full = pipe.model(**inputs, logits_to_keep=1)
        finally:
            for layer, window in zip(decoder.layers, saved):
                layer.window = window
    assert saved == [200, 200]
    assert relative_error(windowed, full) > 1e-3


def test_multi_turn_conversation_with_images_in_two_turns(tiny, load_pipeline):
    directory = tiny("vicuna")
    pipe = load_pipeline(directory)
    processor = reference_processor(directory)
    model = reference_model(directory)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    ]
    images = [smooth_image(336, 336, seed=9), smooth_image(1344, 336, seed=10)]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(text=prompt, images=images, return_tensors="pt")
    expected = model.generate(**theirs, max_new_tokens=6, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    assert pipe.generate(messages, images, max_new_tokens=6).token_ids == expected.tolist()


def test_inline_images_in_messages_equal_separate_images(tiny, load_pipeline, tmp_path):
    pipe = load_pipeline(tiny("mistral"))
    image = smooth_image(300, 500, seed=11)
    path = tmp_path / "picture.png"
    image.save(path)
    separate = pipe.generate(chat(1), [image], max_new_tokens=4)
    inline = pipe.generate([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                         {"type": "text", "text": QUESTION}]}], max_new_tokens=4)
    assert inline.token_ids == separate.token_ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(dtype, tiny):
    import llava_next

    directory = tiny("vicuna")
    full = llava_next.load(directory, progress=False)
    half = llava_next.load(directory, dtype=dtype, progress=False)
    assert half.model.lm_head.weight.dtype == dtype
    assert half.model.language_model.inv_freq.dtype == torch.float32
    inputs, _ = full.prepare(chat(1), [smooth_image(300, 300)])
    with torch.no_grad():
        a = full.model(**inputs, logits_to_keep=1)
        b = half.model(**inputs, logits_to_keep=1).float()
    assert relative_error(b, a) < 0.05
    assert len(half.generate(chat(1), [smooth_image(300, 300)], max_new_tokens=3).token_ids) == 3


@pytest.mark.parametrize("name", ["vicuna", "mistral"])
def test_an_image_placeholder_typed_in_a_message_takes_an_image_as_in_transformers(name, tiny, load_pipeline):
    directory = tiny(name)
    pipe = load_pipeline(directory)
    processor = reference_processor(directory)
    model = reference_model(directory)
    messages = [{"role": "user", "content": [{"type": "text", "text": "<image>\nWhat is this, and <image>?"}]}]
    images = [smooth_image(300, 200, seed=6), random_image(64, 90, seed=7)]
    prompt = reference_prompt(processor, messages, FAMILIES[SPECS[name]["family"]]["template"])
    theirs = processor(text=prompt, images=images, return_tensors="pt")
    ours, _ = pipe.prepare(messages, images)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    expected = model.generate(**theirs, max_new_tokens=6, do_sample=False)[0, theirs["input_ids"].shape[1]:]
    assert pipe.generate(messages, images, max_new_tokens=6).token_ids == expected.tolist()
