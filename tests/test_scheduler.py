"""Continuous batching: sequences that join and leave a running batch, prefilled in chunks between decoding steps,
each with its own sampling settings, answer exactly as they do alone (float32 tiny checkpoints)."""

from __future__ import annotations

import threading

import pytest
import torch

import llava_next
from conftest import smooth_image
from llava_next.engine import BackgroundEngine, EngineBusy, SamplingParams, Scheduler

QUESTIONS = ["What is in the picture?", "Describe the colours and the shapes you can see in detail.", "Why?"]


def fresh(directory, **options):
    return llava_next.load(directory, dtype="float32", progress=False, **options)


def sequence(pipe, question: str, image=None, **sampling):
    messages = [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]}]
    inputs, _ = pipe.prepare(messages, [image] if image else [])
    return pipe.engine.sequences(inputs, SamplingParams(**sampling))[0]


def solo(pipe, question: str, image=None, **sampling):
    messages = [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]}]
    return pipe.generate(messages, [image] if image else [], **sampling)


@pytest.mark.parametrize("name", ["vicuna", "mistral_window", "llava15", "qwen2"])
def test_sequences_joining_a_running_batch_answer_as_they_do_alone(name, tiny):
    pipe = fresh(tiny(name), prefix_cache=False)
    image = smooth_image(300, 200, seed=4)
    jobs = [(QUESTIONS[0], image, 40), (QUESTIONS[1], None, 60), (QUESTIONS[2], image, 25), (QUESTIONS[1], image, 50)]
    expected = [solo(pipe, q, im, max_new_tokens=n) for q, im, n in jobs]
    # three rows for four sequences, prompts prefilled in chunks of 64 tokens between decoding steps: they join at
    # different steps, and leave at different steps (different lengths), so rows are reused and moved
    scheduler = Scheduler(pipe.engine, slots=3, capacity=2048, prefill_chunk=64)
    seqs = [sequence(pipe, q, im, max_new_tokens=n) for q, im, n in jobs]
    scheduler.add(seqs[0])
    steps, joined, most_running, interleaved = 0, 1, 0, 0
    with torch.inference_mode():
        while not scheduler.idle:
            interleaved += bool(scheduler.prefilling and scheduler.running)
            scheduler.step()
            steps += 1
            most_running = max(most_running, len(scheduler.running))
            if joined < len(seqs) and steps % 4 == 0:  # the others arrive while the first is decoding
                scheduler.add(seqs[joined])
                joined += 1
    assert most_running >= 2 and interleaved >= 3  # they really ran together, prefill chunks between decode steps
    for seq, want in zip(seqs, expected):
        got = seq.generation()
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
    assert [s.slot for s in seqs] == [-1] * 4  # every row freed


def test_each_sequence_samples_with_its_own_settings_in_a_shared_batch(tiny):
    pipe = fresh(tiny("vicuna"))
    sampled = dict(max_new_tokens=10, temperature=1.0, top_k=20, seed=123)
    penalised = dict(max_new_tokens=10, repetition_penalty=1.5)
    greedy = dict(max_new_tokens=10)
    expected = [solo(pipe, QUESTIONS[i], None, **s) for i, s in enumerate((sampled, penalised, greedy))]
    seqs = [sequence(pipe, QUESTIONS[i], None, **s) for i, s in enumerate((sampled, penalised, greedy))]
    scheduler = Scheduler(pipe.engine, slots=3, capacity=512)
    for seq in seqs:
        scheduler.add(seq)
    with torch.inference_mode():
        while not scheduler.idle:
            scheduler.step()
    assert [s.generation().token_ids for s in seqs] == [e.token_ids for e in expected]
    assert expected[0].token_ids != expected[2].token_ids  # sampling did sample


def test_a_cancelled_sequence_leaves_at_the_next_step_and_frees_its_row(tiny):
    pipe = fresh(tiny("vicuna"), prefix_cache=False)
    want = solo(pipe, QUESTIONS[1], None, max_new_tokens=12)
    scheduler = Scheduler(pipe.engine, slots=2, capacity=512)
    doomed, kept, late = (sequence(pipe, q, None, max_new_tokens=12) for q in (QUESTIONS[0], QUESTIONS[1], QUESTIONS[1]))
    for seq in (doomed, kept, late):
        scheduler.add(seq)
    with torch.inference_mode():
        scheduler.step()
        scheduler.step()
        assert late in scheduler.waiting  # no row for it yet
        doomed.cancelled = True
        scheduler.step()
        assert doomed.done and doomed.finish_reason == "cancelled" and doomed.slot == -1
        assert late in scheduler.running  # it took the freed row at once
        while not scheduler.idle:
            scheduler.step()
    assert kept.generation().token_ids == want.token_ids == late.generation().token_ids


def test_logprobs_are_the_models_distribution(tiny):
    pipe = fresh(tiny("vicuna"))
    image = smooth_image(200, 300, seed=2)
    result = solo(pipe, "What is it?", image, max_new_tokens=3, logprobs=4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    inputs, _ = pipe.prepare(messages, [image])
    with torch.no_grad():
        logits = pipe.model(**inputs, logits_to_keep=1)[0, -1]
    expected = logits.log_softmax(-1)
    first = result.logprobs[0]
    assert first.token_id == result.token_ids[0] == int(expected.argmax())
    assert first.logprob == pytest.approx(float(expected.max()), abs=1e-4)
    assert [t for t, _ in first.top] == expected.topk(4).indices.tolist()
    assert len(result.logprobs) == 3 and all(len(lp.top) == 4 for lp in result.logprobs)


def test_the_background_engine_serves_threads_and_refuses_when_its_queue_is_full(tiny):
    pipe = fresh(tiny("vicuna"), prefix_cache=False)
    expected = {q: solo(pipe, q, None, max_new_tokens=6).token_ids for q in QUESTIONS}
    engine = BackgroundEngine(pipe.engine, slots=2, capacity=512, prefill_chunk=5, max_waiting=6)
    finished = threading.Event()
    results: dict[int, list[int]] = {}
    lock = threading.Lock()

    def listener(seq):
        if seq.done:
            with lock:
                results[id(seq)] = seq.token_ids
                if len(results) == 6:
                    finished.set()

    seqs = [sequence(pipe, QUESTIONS[i % 3], None, max_new_tokens=6) for i in range(6)]
    for seq in seqs:
        seq.listener = listener
    try:
        engine.submit(seqs[:4])
        with pytest.raises(EngineBusy, match="queue is full"):  # 2 to 4 of them still waiting: 5 more do not fit
            engine.submit([sequence(pipe, "x", None) for _ in range(5)])
        engine.submit(seqs[4:])
        assert finished.wait(60)
    finally:
        engine.shutdown()
    assert [results[id(s)] for s in seqs] == [expected[QUESTIONS[i % 3]] for i in range(6)]
    with pytest.raises(EngineBusy, match="shutting down"):
        engine.submit([sequence(pipe, "x", None)])
