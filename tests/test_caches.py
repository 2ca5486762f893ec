"""The engine's caches (image features by content, the last prefix's KV cache) never change an answer."""

from __future__ import annotations

import pytest
import torch

import llava_next
from conftest import random_image, smooth_image
from llava_next.caches import ImageFeatureCache, image_key, token_identities


def fresh(directory, **options):
    return llava_next.load(directory, dtype="float32", progress=False, **options)


def chat(n_images: int, text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


@pytest.mark.parametrize("name", ["vicuna", "llava15", "mistral_window"])
def test_a_conversation_with_caches_answers_as_cold_runs_do(name, tiny):
    cached = fresh(tiny(name))
    cold = fresh(tiny(name), image_cache_bytes=0, prefix_cache=False)
    image = smooth_image(300, 200, seed=3)
    conversation = cached.conversation()
    history, images = [], []
    for text, new_images in (("Describe it.", [image]), ("And the colour?", []),
                             ("Compare with this one.", [random_image(90, 400, seed=8)])):
        answer = conversation.ask(text, images=new_images, max_new_tokens=8)
        history += [{"role": "user", "content": [{"type": "image"}] * len(new_images) + [{"type": "text", "text": text}]}]
        images += new_images
        expected = cold.generate(history, images, max_new_tokens=8)
        assert answer.token_ids == expected.token_ids
        assert answer.text == expected.text
        history.append({"role": "assistant", "content": expected.text})
    stats = cached.cache_stats()
    # the first turn found nothing saved (a miss); each follow-up reused the turns before it
    assert stats["prefix"]["misses"] == 1 and stats["prefix"]["hits"] == 2 and stats["prefix"]["reused_tokens"] > 0
    assert stats["image_features"]["hits"] >= 1  # the first image again in turns 2 and 3
    assert cold.cache_stats()["prefix"]["hits"] == 0 and cold.cache_stats()["image_features"]["entries"] == 0


def test_reused_prefix_gives_the_logits_of_a_full_pass(tiny):
    pipe = fresh(tiny("vicuna"))
    image = smooth_image(500, 316, seed=1)
    first = pipe.generate(chat(1, "What is it?"), [image], max_new_tokens=5)
    follow = chat(1, "What is it?") + [{"role": "assistant", "content": first.text},
                                       {"role": "user", "content": "Why?"}]
    inputs, _ = pipe.prepare(follow, [image])
    with torch.no_grad():
        full = pipe.model(**inputs, logits_to_keep=1)[:, -1]
    # the engine's first token after reusing the prefix is the argmax of the same logits
    result = pipe.generate(follow, [image], max_new_tokens=1)
    assert pipe.cache_stats()["prefix"]["hits"] >= 1
    assert result.token_ids == [int(full.argmax())]


def test_a_prompt_that_shares_only_the_bos_token_with_the_saved_prefix_is_a_miss(tiny):
    pipe = fresh(tiny("vicuna"))
    pipe.generate(chat(1, "What is it?"), [smooth_image(300, 200)], max_new_tokens=3)
    stats = pipe.cache_stats()["prefix"]
    assert (stats["hits"], stats["misses"], stats["reused_tokens"], stats["entries"]) == (0, 1, 0, 1)
    # a raw prompt: BOS, then nothing the chat template's prompt began with
    raw = pipe.prepare("Tell me a story.")[0]["input_ids"][0]
    templated = pipe.prepare(chat(1, "What is it?"), [smooth_image(300, 200)])[0]["input_ids"][0]
    assert raw[0] == templated[0] and raw[1] != templated[1]
    pipe.generate("Tell me a story.", max_new_tokens=3)
    stats = pipe.cache_stats()["prefix"]
    assert (stats["hits"], stats["misses"], stats["reused_tokens"]) == (0, 2, 0)
    pipe.generate("Tell me a story. Once", max_new_tokens=3)  # (its start was saved by the request before)
    stats = pipe.cache_stats()["prefix"]
    assert stats["hits"] == 1 and stats["misses"] == 2 and stats["reused_tokens"] > 1


def test_a_different_image_at_the_same_place_is_never_served_from_the_cache(tiny):
    pipe = fresh(tiny("vicuna"))
    cold = fresh(tiny("vicuna"), image_cache_bytes=0, prefix_cache=False)
    a = smooth_image(300, 200, seed=3)
    b = a.copy()
    b.putpixel((10, 10), (0, 0, 0) if a.getpixel((10, 10)) != (0, 0, 0) else (255, 255, 255))
    for image in (a, b, a):
        assert pipe.generate(chat(1, "Describe it."), [image], max_new_tokens=6).token_ids == \
            cold.generate(chat(1, "Describe it."), [image], max_new_tokens=6).token_ids
    stats = pipe.cache_stats()["image_features"]
    assert stats["misses"] == 2 and stats["hits"] == 1 and stats["entries"] == 2


def test_image_keys_depend_on_every_pixel_shape_and_size():
    tiles = torch.zeros(3, 3, 8, 8)
    other = tiles.clone()
    other[2, 1, 7, 7] = 1e-6
    assert image_key(tiles, (10, 20)) != image_key(other, (10, 20))
    assert image_key(tiles, (10, 20)) != image_key(tiles, (20, 10))
    assert image_key(tiles, (10, 20)) != image_key(tiles.reshape(3, 3, 4, 16), (10, 20))
    assert image_key(tiles, (10, 20)) == image_key(tiles.clone(), (10, 20))


def test_placeholders_of_different_images_are_different_tokens():
    ids = [1, 9, 9, 9, 2, 9, 9, 3]
    one = token_identities(ids, 9, [b"a", b"b"], [3, 2])
    assert one[:4] == [1, (b"a", 0), (b"a", 1), (b"a", 2)] and one[5:7] == [(b"b", 0), (b"b", 1)]
    other = token_identities(ids, 9, [b"a", b"c"], [3, 2])
    assert one[:5] == other[:5] and one[5] != other[5]


def test_the_feature_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = ImageFeatureCache(max_bytes=3 * 400)
    for key in (b"a", b"b", b"c"):
        cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"d", torch.zeros(100))
    assert cache.get(b"b") is None and cache.get(b"a") is not None and cache.bytes == 1200
    cache.put(b"huge", torch.zeros(1000))  # larger than the whole cache: not kept
    assert cache.get(b"huge") is None and len(cache.entries) == 3


def test_batches_use_the_feature_cache_and_match_uncached_results(tiny):
    pipe = fresh(tiny("qwen2"))
    cold = fresh(tiny("qwen2"), image_cache_bytes=0, prefix_cache=False)
    image = smooth_image(640, 480, seed=2)
    prompts = [chat(1, "Describe it."), chat(1, "Is it red?")]
    expected = cold.generate(prompts, [[image], [image]], max_new_tokens=5)
    for _ in range(2):
        got = pipe.generate(prompts, [[image], [image]], max_new_tokens=5)
        assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert pipe.cache_stats()["image_features"]["hits"] >= 2


def test_the_prefix_stops_where_the_images_differ(tiny):
    pipe = fresh(tiny("vicuna"), image_cache_bytes=0)
    cold = fresh(tiny("vicuna"), image_cache_bytes=0, prefix_cache=False)
    prompt = chat(1, "Describe it.")
    pipe.generate(prompt, [smooth_image(300, 200, seed=3)], max_new_tokens=4)
    other = random_image(300, 200, seed=9)  # same size: the same placeholder ids, other features
    got = pipe.generate(prompt, [other], max_new_tokens=4)
    assert got.token_ids == cold.generate(prompt, [other], max_new_tokens=4).token_ids
    inputs, _ = pipe.prepare(prompt, [other])
    first_placeholder = inputs["input_ids"][0].tolist().index(pipe.config.image_token_id)
    assert pipe.cache_stats()["prefix"]["reused_tokens"] == first_placeholder


def saved_kv(tokens: int):
    from llava_next.model.decoder import KVCache

    # (layers, rows, kv heads, tokens, head dim): the rows a scheduler clones when a sequence finishes
    return KVCache(torch.randn(2, 1, 1, tokens, 4), torch.randn(2, 1, 1, tokens, 4))


def test_the_prefix_cache_keeps_several_conversations_within_its_bytes_least_recently_used_out():
    from llava_next.caches import PrefixCache

    bytes_per_token = 2 * 2 * 4 * 4  # keys and values, 2 layers, head dim 4, float32
    first, second, third = [1, 10, 11, 12], [1, 20, 21, 22, 23], [1, 30, 31]
    # the default keeps the newest only: one conversation at a time
    cache = PrefixCache()
    cache.save(first, saved_kv(len(first)))
    cache.save(second, saved_kv(len(second)))
    assert cache.match(first + [13, 14]) is None and cache.as_dict()["entries"] == 1
    # with room for two, both conversations' next turns find their own turn, the one that shares the most
    cache = PrefixCache(max_bytes=(len(first) + len(second)) * bytes_per_token)
    first_kv, second_kv = saved_kv(len(first)), saved_kv(len(second))
    cache.save(first, first_kv)
    cache.save(second, second_kv)
    got = cache.match(second + [24])
    assert got.tokens == second and got.cache is second_kv
    got = cache.match(first[:3] + [99, 100])  # (shares three tokens: served as far as it shares)
    assert got.tokens == first[:3] and got.cache is first_kv
    assert cache.as_dict() | {"max_bytes": 0} == {"hits": 2, "misses": 0, "reused_tokens": 8, "entries": 2,
                                                  "saved_tokens": 9, "bytes": 9 * bytes_per_token, "max_bytes": 0}
    # a third conversation pushes out the least recently used one (the second: the first was matched after it)
    cache.save(third, saved_kv(len(third)))
    assert [e.tokens for e in cache.entries] == [first, third]
    assert cache.match(second + [24]) is None and cache.match(first + [5]).tokens == first
    # a conversation's next turn replaces its turn before, which it extends (it serves all that one did)
    longer = first + [13]  # (kept alongside the first, the three would not fit: the third would go instead)
    cache.save(longer, saved_kv(len(longer)))
    assert [e.tokens for e in cache.entries] == [third, longer]
    # the engine says how much of an entry was the prompt: the next turn holds that prompt whole, but the answer as
    # the template renders it, which may tokenize differently; it still replaces the turn before, and an entry
    # that shares only part of its prompt (another conversation under the same system prompt) stays
    cache = PrefixCache(max_bytes=2**20)
    cache.save([1, 5, 6, 40, 41], saved_kv(5), prompt_length=3)  # (prompt 1 5 6, answer 40 41)
    cache.save([1, 5, 7, 50], saved_kv(4), prompt_length=3)
    cache.save([1, 5, 6, 40, 42, 43, 60], saved_kv(7), prompt_length=6)
    assert [e.tokens for e in cache.entries] == [[1, 5, 7, 50], [1, 5, 6, 40, 42, 43, 60]]
    # a new entry shorter than an older one's prompt (that prompt asked again, answered in one token) supersedes
    # nothing, and fails nothing
    cache.save([1, 5], saved_kv(2), prompt_length=1)
    assert [e.tokens for e in cache.entries] == [[1, 5, 7, 50], [1, 5, 6, 40, 42, 43, 60], [1, 5]]
    # one entry larger than the whole budget is still kept, alone (the newest always is)
    cache.max_bytes = 10 * bytes_per_token
    cache.save([2] * 64, saved_kv(64))
    assert [e.tokens for e in cache.entries] == [[2] * 64]
    assert cache.as_dict()["bytes"] == 64 * bytes_per_token and cache.as_dict()["saved_tokens"] == 64
    cache.clear()
    assert cache.as_dict()["entries"] == 0 and cache.match(first) is None


def test_two_conversations_interleaved_reuse_their_own_prefixes_and_answer_as_cold_runs_do(tiny):
    cold = fresh(tiny("vicuna"), image_cache_bytes=0, prefix_cache=False)
    images = [smooth_image(300, 200, seed=4), random_image(200, 300, seed=5)]
    reused = {}
    for prefix_cache_bytes in (2**30, 0):
        pipe = fresh(tiny("vicuna"), prefix_cache_bytes=prefix_cache_bytes, image_cache_bytes=0)
        conversations = [pipe.conversation() for _ in images]
        for turn, text in enumerate(("Describe it.", "And the colour?", "Anything else?")):
            for conversation, image in zip(conversations, images):
                answer = conversation.ask(text, images=[image] if turn == 0 else [], max_new_tokens=6)
                asked = conversation.messages[:-1]  # (the conversation so far, without this answer)
                assert answer.token_ids == cold.generate(asked, conversation.images, max_new_tokens=6).token_ids
        stats = pipe.cache_stats()["prefix"]
        # only the very first turn found nothing (the second conversation's first turn shares the template's
        # system prompt with it)
        assert stats["hits"] == 5 and stats["misses"] == 1 and stats["entries"] == (2 if prefix_cache_bytes else 1)
        reused[prefix_cache_bytes] = stats["reused_tokens"]
    # with room for both, each follow-up found its own conversation's turn before, images included, although the
    # other conversation finished a turn in between; with the newest only, it found the other's system prompt
    assert reused[2**30] > reused[0] + 4 * 10


@pytest.mark.parametrize("a, b, limit, expected", [
    ([1, 2, 3], [1, 2, 3], 3, 3), ([1, 2, 3], [1, 2, 4], 3, 2), ([1, 2, 3], [9], 5, 0), ([1, 2, 3], [1, 2], 9, 2),
    ([], [1], 1, 0), (list(range(2000)), list(range(1300)) + [-1] + list(range(1301, 2000)), 2000, 1300),
    (list(range(2000)), list(range(2000)), 1999, 1999), (list(range(1024)), list(range(1023)) + [7], 1024, 1023),
])
def test_shared_length_is_the_first_difference_within_the_limit(a, b, limit, expected):
    from llava_next.caches import shared_length

    assert shared_length(a, b, limit) == shared_length(b, a, limit) == expected
    for cut in range(0, min(len(a), len(b)) + 1, 97):  # against counting one by one
        one_by_one = next((i for i in range(min(cut, len(a), len(b))) if a[i] != b[i]), min(cut, len(a), len(b)))
        assert shared_length(a, b, cut) == one_by_one


def test_a_prompt_asked_again_after_its_conversation_went_on_is_answered_as_a_cold_run(tiny):
    # (saving its one-token answer once compared past the new entry's end: an IndexError that failed the request)
    pipe = fresh(tiny("vicuna"), prefix_cache_bytes=2**30)
    cold = fresh(tiny("vicuna"), image_cache_bytes=0, prefix_cache=False)
    image = smooth_image(300, 200, seed=6)
    conversation = pipe.conversation()
    conversation.ask("Describe it.", images=[image], max_new_tokens=4)
    conversation.ask("And the colour?", max_new_tokens=4)
    again = pipe.generate(chat(1, "Describe it."), [image], max_new_tokens=1)
    assert again.token_ids == cold.generate(chat(1, "Describe it."), [image], max_new_tokens=1).token_ids
    assert pipe.cache_stats()["prefix"]["entries"] == 2


def test_a_prefix_cache_that_cannot_keep_a_finished_request_warns_and_the_answer_stands(tiny, monkeypatch):
    from llava_next.caches import PrefixCache
    from llava_next.errors import LlavaWarning

    pipe = fresh(tiny("vicuna"))
    expected = fresh(tiny("vicuna"), prefix_cache=False).generate(chat(1, "Hi."), [smooth_image(300, 200)],
                                                                  max_new_tokens=4)

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PrefixCache, "save", out_of_memory)
    with pytest.warns(LlavaWarning, match="the prefix cache could not keep a finished request .RuntimeError: out of "
                                          "memory.; later turns of its conversation will be computed again"):
        got = pipe.generate(chat(1, "Hi."), [smooth_image(300, 200)], max_new_tokens=4)
    assert got.token_ids == expected.token_ids and got.finish_reason == expected.finish_reason
