"""Sampling, stopping and streaming."""

from __future__ import annotations

import pytest
import torch

from conftest import reference_model, reference_processor, smooth_image
from llava_next.engine import (
    GenerationError,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k_top_p,
)

CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]


def test_top_k_top_p_filters_equal_transformers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for k in (1, 5, 50):
        assert torch.equal(filter_top_k_top_p(logits, k, 1.0), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.999):
        assert torch.equal(filter_top_k_top_p(logits, 0, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(2, 30)
    history = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_sampling_with_penalty_and_filters_matches_transformers_greedy_path(tiny, load_pipeline):
    """With repetition penalty under greedy decoding the chosen tokens equal transformers' generate."""
    directory = tiny("vicuna")
    pipe = load_pipeline(directory)
    processor, model = reference_processor(directory), reference_model(directory)
    image = smooth_image(400, 300)
    prompt = pipe.processor.apply_chat_template(CHAT)
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=10, do_sample=False, repetition_penalty=1.5)
    ours = pipe.generate(CHAT, [image], max_new_tokens=10, repetition_penalty=1.5)
    assert ours.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.token_ids != pipe.generate(CHAT, [image], max_new_tokens=10).token_ids


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny, load_pipeline):
    pipe = load_pipeline(tiny("mistral"))
    image = smooth_image(300, 300)
    runs = [pipe.generate(CHAT, [image], max_new_tokens=12, temperature=1.5, seed=s).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_one_is_greedy(tiny, load_pipeline):
    pipe = load_pipeline(tiny("mistral"))
    image = smooth_image(300, 300)
    greedy = pipe.generate(CHAT, [image], max_new_tokens=8)
    sampled = pipe.generate(CHAT, [image], max_new_tokens=8, temperature=0.7, top_k=1, seed=3)
    assert sampled.token_ids == greedy.token_ids


def test_max_new_tokens_and_finish_reason(tiny, load_pipeline):
    pipe = load_pipeline(tiny("mistral"))
    result = pipe.generate(CHAT, [smooth_image(300, 300)], max_new_tokens=5)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    assert result.prompt_tokens == pipe.prepare(CHAT, [smooth_image(300, 300)])[0]["input_ids"].shape[1]


def test_a_generated_image_token_is_an_ordinary_token(tiny):
    # an undertrained model can sample the <image> id; decoding must go on, embedding it as transformers does
    import llava_next

    pipe = llava_next.load(tiny("vicuna"), progress=False)
    image_id = pipe.config.image_token_id
    head = pipe.model.lm_head

    class FavourImageToken(torch.nn.Module):
        weight = head.weight  # where the engine looks for the model's device and dtype

        def forward(self, hidden):
            logits = head(hidden)
            logits[..., image_id] += 1e4
            return logits

    pipe.model.lm_head = FavourImageToken()
    result = pipe.generate(CHAT, [smooth_image(300, 300)], max_new_tokens=3)
    assert result.token_ids == [image_id] * 3 and result.finish_reason == "length"


def test_stops_on_eos_from_generation_config(tiny, load_pipeline):
    pipe = load_pipeline(tiny("vicuna"))
    image = smooth_image(300, 300)
    free = pipe.generate(CHAT, [image], max_new_tokens=6)
    # make the 3rd generated token an end-of-sequence id for this engine only
    saved = pipe.engine.eos_token_ids
    pipe.engine.eos_token_ids = [free.token_ids[2]]
    try:
        stopped = pipe.generate(CHAT, [image], max_new_tokens=6)
    finally:
        pipe.engine.eos_token_ids = saved
    first = free.token_ids.index(free.token_ids[2])
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"


def test_llama3_stops_on_every_eos_id_of_its_generation_config(tiny, load_pipeline):
    pipe = load_pipeline(tiny("llama3"))
    tokenizer = pipe.processor.tokenizer
    assert pipe.engine.eos_token_ids == sorted([tokenizer.token_id("<|end_of_text|>"), tokenizer.token_id("<|eot_id|>")])


def test_stop_strings_cut_the_text_and_end_generation(tiny, load_pipeline):
    pipe = load_pipeline(tiny("v4_vicuna"))
    image = smooth_image(250, 400)
    free = pipe.generate(CHAT, [image], max_new_tokens=12)
    assert len(free.text) > 4
    stop = free.text[3:5]
    result = pipe.generate(CHAT, [image], max_new_tokens=12, stop=[stop])
    assert result.text == free.text[: free.text.index(stop)]
    assert result.finish_reason == "stop" and len(result.token_ids) < 12
    streamed = pipe.stream(CHAT, [image], max_new_tokens=12, stop=[stop])
    assert "".join(streamed) == result.text


@pytest.mark.parametrize("name", ["vicuna", "llama3", "yi"])
def test_stream_joins_to_the_generated_text(name, tiny, load_pipeline):
    pipe = load_pipeline(tiny(name))
    image = smooth_image(320, 240)
    result = pipe.generate(CHAT, [image], max_new_tokens=15, temperature=1.0, seed=5)
    stream = pipe.stream(CHAT, [image], max_new_tokens=15, temperature=1.0, seed=5)
    pieces = list(stream)
    assert "".join(pieces) == result.text
    assert stream.generation.token_ids == result.token_ids
    assert not torch.is_inference_mode_enabled()


def test_text_only_prompt(tiny, load_pipeline):
    pipe = load_pipeline(tiny("qwen2"))
    result = pipe.generate([{"role": "user", "content": "Hello there"}], max_new_tokens=4)
    assert len(result.token_ids) == 4
    raw = pipe.generate(pipe.processor.apply_chat_template([{"role": "user", "content": "Hello there"}]),
                        max_new_tokens=4)
    assert raw.token_ids == result.token_ids


@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(stop=[""]), "stop strings must be non-empty"),
])
def test_bad_sampling_settings_are_clear_errors(options, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(**options).validate()


def test_unknown_option_is_named(tiny, load_pipeline):
    pipe = load_pipeline(tiny("mistral"))
    with pytest.raises(TypeError, match="unknown generation option.*max_tokens"):
        pipe.generate("hi", max_tokens=3)


def test_batch_needs_one_image_list_per_prompt(tiny, load_pipeline):
    from llava_next.prompt import PromptError

    pipe = load_pipeline(tiny("mistral"))
    with pytest.raises(PromptError, match="one list of images per prompt"):
        pipe.generate(["<image> a", "<image> b"], [smooth_image(10, 10)])
