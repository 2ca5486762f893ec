"""Stop strings against a scripted model: the engine is given exactly the tokens a model would produce, so that
byte-fallback newlines, multi-byte characters split over tokens and stops across token boundaries can be tested
one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llava_next.engine import Engine, SamplingParams


class ScriptedModel(nn.Module):
    """Emits `script` one token per forward pass (greedy picks it), whatever the input."""

    def __init__(self, cfg, script: list[int]):
        super().__init__()
        self.cfg, self.script, self.calls = cfg, script, 0
        self.anchor = nn.Parameter(torch.zeros(1))

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, **_):
        logits = torch.zeros(input_ids.shape[0], 1, self.cfg.text.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


def byte(tokenizer, value: int) -> int:
    return tokenizer.token_id(f"<0x{value:02X}>")


@pytest.fixture
def run(tiny, load_pipeline):
    pipe = load_pipeline(tiny("vicuna"))  # sentencepiece-style BPE with byte fallback, as llama/mistral/Yi
    tok = pipe.processor.tokenizer
    eos = tok.eos_token_id

    def go(script, stops, max_new_tokens=20):
        engine = Engine(ScriptedModel(pipe.config, script + [eos]), tok, [eos])
        ids = torch.tensor([tok.encode("Hello")])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        params = SamplingParams(max_new_tokens=max_new_tokens, stop=stops)
        done = engine.generate(inputs, params)[0]
        stream = engine.stream(inputs, SamplingParams(max_new_tokens=max_new_tokens, stop=stops))
        engine.model.calls = 0
        pieces = list(stream)
        assert "".join(pieces) == done.text == stream.generation.text
        assert stream.generation.token_ids == done.token_ids
        return done

    go.tok = tok
    return go


def words(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_a_byte_fallback_newline_stops_on_its_own_token(run):
    tok = run.tok
    hi, newline = words(tok, "Hi"), byte(tok, 0x0A)
    assert tok.decode(hi + [newline]) == "Hi\n"
    result = run(hi + [newline] + words(tok, "there"), ["\n"])
    assert result.text == "Hi" and result.finish_reason == "stop"
    assert result.token_ids == hi + [newline]  # not one token more
    # and when EOS follows the newline, the newline never reaches the text either
    result = run(hi + [newline], ["\n"])
    assert result.text == "Hi" and result.token_ids == hi + [newline]


@pytest.mark.parametrize("char", ["\U0001F600", "\u4e2d", "\u00e9"])  # 4-, 3- and 2-byte UTF-8
def test_a_multi_byte_character_split_over_byte_tokens_stops_on_its_last_byte(run, char):
    tok = run.tok
    pieces = [byte(tok, b) for b in char.encode()]
    before = words(tok, "ok")
    result = run(before + pieces + words(tok, "after"), [char])
    assert result.text == "ok" and result.token_ids == before + pieces and result.finish_reason == "stop"
    # the same character not as a stop: it comes out whole
    assert run(before + pieces, []).text == "ok" + char


def test_several_stops_and_stops_across_token_boundaries(run):
    tok = run.tok
    script = words(tok, "abc def") + [byte(tok, 0x0A)] + words(tok, "ghi")
    full = run(script, []).text
    assert full == tok.decode(script) == "abc def\n ghi"  # sentencepiece marks the new word with a space
    for stops, expected in ((["c d"], "ab"), (["f\n g"], "abc de"), (["zzz", "\n g", "de"], "abc "),
                            (["i"], "abc def\n gh")):
        result = run(script, stops)
        assert result.text == expected and result.finish_reason == "stop", stops
        assert not any(s in result.text for s in stops)


def test_a_stop_completed_by_the_final_flush_still_stops(run):
    tok = run.tok
    # the last two bytes of a 3-byte character arrive at the end: only the final decode completes it
    pieces = [byte(tok, b) for b in "\u4e2d".encode()]
    result = run(words(tok, "x") + pieces, ["\u4e2d"], max_new_tokens=len(words(tok, "x")) + 3)
    assert result.text == "x" and result.finish_reason == "stop"
