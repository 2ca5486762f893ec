"""The generation engine: KV cache, sampling, stopping, batched and streaming generation.

The model is stateless; this engine owns the cache. One prefill pass over the whole (left-padded) batch, then one
token per row per step, each row stopping on its own. Per step the only Python work is bookkeeping of the rows
still running; everything that can be computed once (EOS ids, the cache, the penalty mask) is computed once.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .caches import ImageFeatureCache, PrefixCache, image_key, token_identities
from .errors import LlavaError
from .model.decoder import KVCache
from .model.llava import LlavaModel, positions_from_mask
from .prompt import IncrementalDetokenizer, Tokenizer


class GenerationError(LlavaError, ValueError):
    """Generation settings that cannot work."""


# Temperatures this small are greedy: dividing float32 logits by them would overflow to infinity.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy (argmax); the other knobs then only shape the distribution."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the output
    seed: int | None = None
    stop: Sequence[str] = ()  # stop when the output contains one of these; it is not included in the text

    def validate(self) -> "SamplingParams":
        def number(name: str, integer: bool = False) -> float:
            value = getattr(self, name)
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                kind = "an integer" if integer else "a finite number"
                raise GenerationError(f"{name} must be {kind}, got {value!r}")
            return value

        if number("max_new_tokens", integer=True) < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if number("temperature") < 0:
            raise GenerationError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if number("top_k", integer=True) < 0:
            raise GenerationError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < number("top_p") <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if number("repetition_penalty") <= 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise GenerationError(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise GenerationError("stop strings must be non-empty strings")
        return self


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the new tokens only, the EOS token included when generation ended on it
    finish_reason: str  # "stop": an EOS token or a stop string; "length": max_new_tokens or the context window
    prompt_tokens: int
    prefill_seconds: float = 0.0  # from the request's start to its first token (images, prompt, first sample)
    decode_seconds: float = 0.0  # from the first token to the last

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens seen before: positive logits divided by the penalty, negative ones multiplied (CTRL's rule)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits outside the top k, or outside the smallest set whose probability reaches top_p, set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cumulative <= 1 - top_p
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                rng: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=rng).squeeze(-1)


@dataclass
class _Row:
    """Output state of one prompt of the batch."""

    detok: IncrementalDetokenizer
    stops: Sequence[str]
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of detok.text already handed out
    searched: int = 0  # characters of detok.text already searched for stop strings
    done: bool = False
    finish_reason: str = "length"
    stop_at: int | None = None  # where a stop string begins in detok.text
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.detok.text if self.stop_at is None else self.detok.text[: self.stop_at]

    def generation(self) -> Generation:
        return Generation(self.text, self.token_ids, self.finish_reason, self.prompt_tokens, self.prefill_seconds,
                          self.decode_seconds)

    def safe_text_end(self) -> int:
        """How far the text can be handed out without possibly emitting the beginning of a stop string."""
        if self.done:
            return len(self.text)
        hold = max((len(s) - 1 for s in self.stops), default=0)
        return max(self.emitted, min(len(self.detok.text) - hold, self.detok.settled_length))


class Engine:
    """Runs requests on the model. It owns the KV space and the caches: image features by content, and the KV
    cache of the last single-sequence request, which the next request reuses for the token ids it shares (the next
    turn of a conversation). Neither cache changes an answer; both are off unless asked for."""

    def __init__(self, model: LlavaModel, tokenizer: Tokenizer, eos_token_ids: Sequence[int],
                 image_cache_bytes: int = 0, prefix_cache: bool = False, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        self.prefix_cache = PrefixCache(enabled=prefix_cache)
        self.decode_step = model
        if compile:
            # One decoding step through torch.compile: CUDA graphs on a GPU ("reduce-overhead"), inductor's C++
            # kernels on a CPU. The cache length is dynamic, so it compiles once, not once per position.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.decode_step = torch.compile(model, dynamic=True, mode=mode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _decode(self, *args, **kwargs) -> torch.Tensor:
        if self.decode_step is self.model:
            return self.model(*args, **kwargs)
        try:
            return self.decode_step(*args, **kwargs)
        except Exception as e:  # torch.compile needs a working C++ (or CUDA) toolchain: run eagerly without one
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "decoding eagerly instead")
            self.decode_step = self.model
            return self.model(*args, **kwargs)

    def clear_caches(self) -> None:
        self.image_cache.clear()
        self.prefix_cache.clear()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        return {"image_features": self.image_cache.as_dict(), "prefix": self.prefix_cache.as_dict()}

    def _image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                        keyed: bool) -> tuple[list[torch.Tensor], list[bytes]]:
        """Each image's packed features, from the cache where its tiles were seen before, the misses in one call;
        and, when asked for or when the cache is on, each image's content key."""
        model, device = self.model, self.device
        use_cache = self.image_cache.max_bytes > 0
        keys: list[bytes] = []
        if use_cache or keyed:
            counts = model.tile_counts(image_sizes, pixel_values.shape[0])
            sizes = image_sizes.tolist() if image_sizes is not None else [None] * len(counts)
            keys = [image_key(pixel_values[i, :n] if model.cfg.is_anyres else pixel_values[i], tuple(sizes[i] or ()))
                    for i, n in enumerate(counts)]
        if not use_cache:
            sizes_on_device = image_sizes.to(device) if image_sizes is not None else None
            return model.image_features(pixel_values.to(device), sizes_on_device), keys
        features: list[torch.Tensor | None] = [self.image_cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(features) if f is None]
        if missing:
            index = torch.tensor(missing)
            computed = model.image_features(pixel_values[index].to(device),
                                            image_sizes[index].to(device) if image_sizes is not None else None)
            for i, f in zip(missing, computed):
                features[i] = f
                self.image_cache.put(keys[i], f)
        return features, keys

    def _steps(self, inputs: dict[str, torch.Tensor], params: SamplingParams, rows: list[_Row]) -> Iterator[None]:
        """Runs prefill and decoding, updating `rows` and yielding after every step."""
        began = time.perf_counter()
        model, device = self.model, self.device
        input_ids = inputs["input_ids"].to(device)
        mask = inputs["attention_mask"].to(device).bool()
        batch, prompt_len = input_ids.shape
        window = model.cfg.text.max_position_embeddings
        max_new = min(params.max_new_tokens, window - int(mask.sum(-1).max()))
        if max_new < 1:
            raise GenerationError(f"the prompt ({int(mask.sum(-1).max())} tokens) fills the model's context window "
                                  f"({window} tokens): there is no room for an answer; shorten it")
        cache = KVCache.allocate(model.cfg.text, batch, prompt_len + max_new, model.dtype, device)
        # Which cache slots hold real tokens, kept only when some row is padded: without padding, attention runs
        # without a mask tensor (plain causal kernels for the prompt, nothing to mask for one decoding query).
        key_mask = None
        if not bool(mask.all()):
            key_mask = torch.zeros((batch, prompt_len + max_new), dtype=torch.bool, device=device)
            key_mask[:, :prompt_len] = mask
        positions = positions_from_mask(mask)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros((batch, model.cfg.text.vocab_size), dtype=torch.bool, device=device)
            seen.scatter_(1, input_ids.masked_fill(~mask, 0), mask)
        rng = None
        if params.seed is not None:
            rng = torch.Generator(device=device).manual_seed(params.seed)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=device)
        # The prefix a previous request left in the KV cache is copied in, not recomputed (one unpadded row only).
        single = batch == 1 and bool(mask.all()) and self.prefix_cache.enabled
        pixel_values = inputs.get("pixel_values")
        features, keys = None, []
        if pixel_values is not None:
            features, keys = self._image_features(pixel_values, inputs.get("image_sizes"), keyed=single)
        identities = None
        if single:
            identities = token_identities(input_ids[0].tolist(), model.cfg.image_token_id, keys,
                                      [f.shape[0] for f in features or []])
        reused = self.prefix_cache.match(identities) if identities is not None else None
        start = 0
        if reused is not None:
            start = len(reused.tokens)
            cache.keys[:, :, :, :start] = reused.cache.keys[:, :, :, :start]
            cache.values[:, :, :, :start] = reused.cache.values[:, :, :, :start]
            if features is not None:  # only the placeholders after the prefix still need their feature rows
                skip = int((input_ids[0, :start] == model.cfg.image_token_id).sum())
                features = [torch.cat(features)[skip:]]
        logits = model(
            input_ids[:, start:], mask[:, start:], image_features=features if features is not None else None,
            cache=cache, start=start, positions=positions[:, start:],
            key_mask=key_mask[:, :prompt_len] if key_mask is not None else None,
            logits_to_keep=1,
        )
        next_positions = positions[:, -1:] + 1
        first_token_at = None
        for step in range(max_new):
            tokens = choose_next(logits[:, -1], params, seen, rng)
            is_eos = torch.isin(tokens, eos).tolist()
            if first_token_at is None:
                first_token_at = time.perf_counter()
            for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                if row.done:
                    continue
                row.token_ids.append(token)
                if is_eos[i]:
                    row.done, row.finish_reason = True, "stop"
                    continue
                row.detok.add(token)
                if row.stops:
                    self._check_stop(row)
            if step == max_new - 1 or all(row.done for row in rows):
                for row in rows:  # timed once, at the end: no per-token work for it
                    row.prefill_seconds = first_token_at - began
                    row.decode_seconds = time.perf_counter() - first_token_at
                if identities is not None:
                    # every token but the last chosen one has been through the model: their keys are in the cache
                    self.prefix_cache.save(identities + rows[0].token_ids[:-1], cache)
                yield
                return
            yield
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            slot = prompt_len + step
            if key_mask is not None:
                key_mask[:, slot] = True
            logits = self._decode(tokens[:, None], cache=cache, start=slot, positions=next_positions,
                                  key_mask=key_mask[:, : slot + 1] if key_mask is not None else None,
                                  logits_to_keep=1)
            next_positions = next_positions + 1

    @staticmethod
    def _finish(row: _Row) -> None:
        """The end of a row: the detokenizer's last held-back characters, which may complete a stop string."""
        if row.stop_at is None:
            row.detok.flush()
            if row.stops:
                row.searched = 0  # the flush may have rewritten the text's end: search it whole
                Engine._check_stop(row)
        row.done = True

    @staticmethod
    def _check_stop(row: _Row) -> None:
        # Only the new end of the text can hold a stop string that was not there before (and the unsettled end,
        # which clean-up may have rewritten since the last search).
        start = max(0, row.searched - row.detok.unsettled - max(len(s) for s in row.stops) + 1)
        row.searched = len(row.detok.text)
        found = [i for i in (row.detok.text.find(s, start) for s in row.stops) if i >= 0]
        if found:
            row.stop_at = min(found)
            row.done, row.finish_reason = True, "stop"

    def _rows(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> list[_Row]:
        lengths = inputs["attention_mask"].sum(-1).tolist()
        return [_Row(IncrementalDetokenizer(self.tokenizer), tuple(params.stop), int(n)) for n in lengths]

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> list[Generation]:
        params.validate()
        rows = self._rows(inputs, params)
        for _ in self._steps(inputs, params, rows):
            pass
        for row in rows:
            self._finish(row)
        return [row.generation() for row in rows]

    def stream(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> "TextStream":
        """Text pieces of a single prompt as they are generated; joined, they equal `generate(...)`'s text."""
        params.validate()
        if inputs["input_ids"].shape[0] != 1:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        return TextStream(self, inputs, params)

    @staticmethod
    def _take(row: _Row) -> str:
        end = row.safe_text_end()
        piece = row.text[row.emitted : end]
        row.emitted = max(row.emitted, end)
        return piece


class TextStream:
    """An iterator of text pieces; once exhausted, `generation` holds the whole result (finish reason included)."""

    def __init__(self, engine: Engine, inputs: dict[str, torch.Tensor], params: SamplingParams):
        self._rows = engine._rows(inputs, params)
        self._steps = engine._steps(inputs, params, self._rows)
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        row = self._rows[0]
        while True:
            # Inference mode per step: a generator suspended inside the context would leak it into the caller.
            with torch.inference_mode():
                finished = next(self._steps, StopIteration) is StopIteration
            if finished:
                break
            piece = Engine._take(row)
            if piece:
                yield piece
        Engine._finish(row)
        piece = Engine._take(row)
        if piece:
            yield piece
        self.generation = row.generation()
