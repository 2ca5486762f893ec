"""The generation engine: KV space, scheduling, sampling, stopping; batched, streamed and served generation.

The model is stateless; this engine owns the cache. A `Scheduler` runs many sequences at once in one preallocated KV
space of `slots` rows: each sequence is prefilled in its own row (whole, or in chunks between decoding steps when
other sequences are streaming), then joins the running batch, which takes one token per sequence per step; sequences
join and leave between steps (continuous batching). `generate()` and `stream()` are a scheduler run to completion;
the server keeps one running on a thread of its own (`BackgroundEngine`). A batch is just sequences submitted
together, and since no row is ever padded, a prompt's answer does not depend on what it ran beside.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
import typing
from typing import Callable, Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import layout_cache
from .caches import ImageFeatureCache, PrefixCache, image_key, token_identities
from .errors import LlavaError, LlavaWarning
from .memory import keep_freed_memory, release_free_memory
from .model.decoder import KVCache, whole_key_blocks
from .model.llava import ImageTokenMismatch, LlavaModel
from .prompt import IncrementalDetokenizer, Tokenizer
from .quantize import (block_int8_columns, decoding_bf16_layers, decoding_int8_layers, decoding_w8a8_layers,
                       bf16_stand_ins, float32_fast_linears, lay_out_bf16_weights, runs_in_decoding, time_bf16_layouts,
                       time_float32_kernels, time_int8_layouts, time_w8a8_one_row)
from .sampling_params import GenerationError, SamplingParams


# Temperatures this small are greedy: dividing float32 logits by them would overflow to infinity.
GREEDY_BELOW = 1e-5
KV_BUCKET = 256  # static decoding rounds the KV space up to this many tokens, so requests share one shape


@dataclass
class Generation:
    text: str
    token_ids: list[int]  # the new tokens only, the EOS token included when generation ended on it
    finish_reason: str  # "stop": an EOS token or a stop string; "length": max_new_tokens or the context window
    prompt_tokens: int
    prefill_seconds: float = 0.0  # from the request's start to its first token (images, prompt, first sample)
    decode_seconds: float = 0.0  # from the first token to the last
    logprobs: list["TokenLogprob"] | None = None  # one per new token, when asked for

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
class TokenLogprob:
    token_id: int
    logprob: float  # of the model's distribution, before temperature, penalties and filtering
    top: list[tuple[int, float]]  # the most likely (token id, logprob) at this step, most likely first


class Sequence:
    """One answer being generated: its prompt, sampling settings, place in the KV space, and output so far.

    The scheduler's thread is the only one that changes it, except `cancelled`, which any thread may set.
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, detok: IncrementalDetokenizer,
                 features: list[torch.Tensor] | None = None, image_keys: typing.Sequence[bytes] = (),
                 images: tuple[torch.Tensor, torch.Tensor | None] | None = None, seed: int | None = None,
                 listener: Callable[["Sequence"], None] | None = None):
        self.prompt_ids = prompt_ids
        self.params = params
        self.detok = detok
        self.stops = tuple(params.stop)
        self.features = features  # one (k, C) tensor per image, or None until `images` went through the tower
        self.image_keys = list(image_keys)
        self.images = images  # (pixel_values, image_sizes) of this prompt's images, not yet through the tower
        self.feature_rows: torch.Tensor | None = None  # the features of all images, one row per placeholder, in order
        self.rows_used = 0  # of feature_rows, those already through the model (prefill chunks, a reused prefix)
        self.seed = params.seed if seed is None else seed
        self.listener = listener  # called on the scheduler's thread after every step that changed this sequence
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.emitted = 0  # characters of detok.text already handed out
        self.searched = 0  # characters of detok.text already searched for stop strings
        self.done = False
        self.finish_reason = "length"  # "stop", "length", "cancelled" or "error" (see `error`)
        self.error: Exception | None = None
        self.stop_at: int | None = None  # where a stop string begins in detok.text
        self.cancelled = False
        self.slot = -1  # the KV row it occupies while admitted
        self.length = 0  # tokens whose keys and values are in the cache
        self.max_new = params.max_new_tokens
        self.rng: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # (V,) tokens the repetition penalty applies to
        self.identities: list | None = None  # the prompt as the prefix cache compares it
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def text(self) -> str:
        return self.detok.text if self.stop_at is None else self.detok.text[: self.stop_at]

    def generation(self) -> Generation:
        first = self.first_token_at or self.finished_at or self.submitted_at
        return Generation(self.text, self.token_ids, self.finish_reason, self.prompt_tokens,
                          first - self.submitted_at, (self.finished_at or first) - first, self.logprobs)

    def take_text(self) -> str:
        """The text not handed out yet, as far as it is final: held back are the detokenizer's unsettled end and,
        while running, whatever could be the beginning of a stop string."""
        if self.done:
            end = len(self.text)
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self.emitted, min(len(self.detok.text) - hold, self.detok.settled_length))
        piece = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return piece

    def add_token(self, token: int, is_eos: bool) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.token_ids.append(token)
        if is_eos:
            self.done, self.finish_reason = True, "stop"
            return
        self.detok.add(token)
        if self.stops:
            self._check_stop()
        if not self.done and len(self.token_ids) >= self.max_new:
            self.done = True

    def finish(self, reason: str | None = None) -> None:
        """The end: the detokenizer's last held-back characters, which may complete a stop string."""
        if reason is not None:
            self.finish_reason = reason
        if self.stop_at is None:
            self.detok.flush()
            if self.stops:
                self.searched = 0  # the flush may have rewritten the text's end: search it whole
                self._check_stop()
        self.done = True
        self.finished_at = time.perf_counter()

    def _check_stop(self) -> None:
        # Only the new end of the text can hold a stop string that was not there before (and the unsettled end,
        # which clean-up may have rewritten since the last search).
        start = max(0, self.searched - self.detok.unsettled - max(len(s) for s in self.stops) + 1)
        self.searched = len(self.detok.text)
        found = [i for i in (self.detok.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stop_at = min(found)
            self.done, self.finish_reason = True, "stop"


class Scheduler:
    """Continuous batching in one KV space of `slots` rows of `capacity` tokens.

    Each step: sequences that were cancelled leave; waiting ones take free rows (their images through the tower,
    their prefix copied from the prefix cache); prefill runs, whole, or, while others are decoding, at most
    `prefill_chunk` prompt tokens of the oldest prefilling sequences (so a long prompt does not freeze their
    streams, and several short ones join in one step); then
    one decoding step over every running sequence, each at its own length and with its own sampling settings.
    Running sequences occupy rows 0..n-1, so the decoding step works on a view of the KV space, never a copy; a
    sequence that leaves is replaced by the last one (one row copied).
    """

    def __init__(self, engine: "Engine", slots: int, capacity: int, prefill_chunk: int | None = None,
                 isolate_errors: bool = False):
        self.engine = engine
        self.slots, self.capacity, self.prefill_chunk = slots, capacity, prefill_chunk
        # isolate_errors: a failure while prefilling fails that sequence only (a server); otherwise it is raised
        self.isolate_errors = isolate_errors
        # w8a8 layers multiply a single row in the engine's chosen form only where no other row can ever run beside
        # it: with more slots, weight-only, as 2..DECODE_ROWS rows are, so that a sequence's numbers do not depend on
        # when its neighbours come and go (quantize.W8A8Linear). Each scheduler sets it for its own steps.
        engine.single_rows_alone(slots == 1)
        # Zeros, not empty: rows of different lengths decode together, and a shorter row's attention weights are 0
        # on the longer rows' slots, which must hold numbers (0 x NaN from uninitialised memory is NaN). It also
        # takes the memory now rather than under load.
        self.cache = engine.kv_space(slots, capacity)
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.eos = frozenset(engine.eos_token_ids)

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    @property
    def kv_bytes(self) -> int:
        return 2 * self.cache.keys.numel() * self.cache.keys.element_size()

    def limit_new_tokens(self, seq: Sequence) -> None:
        """Fits the sequence's answer into the context window and a KV row, or refuses a prompt that leaves no room."""
        window = self.engine.model.cfg.text.max_position_embeddings
        room = min(window, self.capacity) - seq.prompt_tokens
        if room < 1:
            where = (f"the model's context window ({window} tokens)" if window <= self.capacity else
                     f"the KV space of one sequence ({self.capacity} tokens; raise the KV memory to allow longer "
                     "prompts)")
            raise GenerationError(f"the prompt ({seq.prompt_tokens} tokens) fills {where}: there is no room for an "
                                  "answer; shorten it")
        seq.max_new = min(seq.params.max_new_tokens, room)

    def add(self, seq: Sequence) -> None:
        self.limit_new_tokens(seq)
        self.waiting.append(seq)

    def step(self) -> list[Sequence]:
        """One round of scheduling; returns the sequences that changed (new text, finished), after calling their
        listeners."""
        changed: list[Sequence] = []
        self._drop_cancelled(changed)
        self._admit(changed)
        # Without chunking, every admitted prompt now (generate()). With it, at most `prefill_chunk` prompt tokens
        # per step while others decode, oldest first: several short prompts, or one chunk of a long one.
        budget = self.prefill_chunk
        for seq in list(self.prefilling):
            if budget is not None and budget <= 0:
                break
            before = seq.length
            self._guarded(self._prefill, seq, changed, budget)
            if budget is not None:
                budget -= max(0, seq.length - before)
        self._compact()
        if self.running:
            try:
                self._decode(changed)
            except Exception as e:  # noqa: BLE001 - a failed step fails every sequence in it, never the server
                if not self.isolate_errors:
                    raise
                for seq in list(self.running):
                    self._fail(seq, e, changed)
        self._compact()
        for seq in changed:
            if seq.listener is not None:
                seq.listener(seq)
        return changed

    # -- admission and leaving ---------------------------------------------------------------------------------------

    def _guarded(self, work: Callable, seq: Sequence, changed: list[Sequence], *args) -> None:
        try:
            work(seq, changed, *args)
        except Exception as e:  # noqa: BLE001
            if not self.isolate_errors:
                raise
            self._fail(seq, e, changed)

    def _fail(self, seq: Sequence, error: Exception, changed: list[Sequence]) -> None:
        seq.error = error
        self._leave(seq, "error", changed)

    def _drop_cancelled(self, changed: list[Sequence]) -> None:
        for seq in [s for s in (*self.waiting, *self.prefilling, *self.running) if s.cancelled]:
            self._leave(seq, "cancelled", changed)

    def _admit(self, changed: list[Sequence]) -> None:
        while self.waiting and len(self.running) + len(self.prefilling) < self.slots:
            seq = self.waiting.popleft()
            seq.slot = len(self.running) + len(self.prefilling)
            self.prefilling.append(seq)
            self._guarded(self._start, seq, changed)

    def _start(self, seq: Sequence, changed: list[Sequence]) -> None:
        engine, model = self.engine, self.engine.model
        prefix = engine.prefix_cache
        if seq.images is not None:
            pixel_values, image_sizes = seq.images
            seq.features, seq.image_keys = engine.image_features(pixel_values, image_sizes, keyed=prefix.enabled)
            seq.images = None
        placeholders = seq.prompt_ids.count(model.cfg.image_token_id)
        features = sum(f.shape[0] for f in seq.features or [])
        if placeholders != features:
            raise ImageTokenMismatch(f"the input has {placeholders} image placeholder tokens but the images give "
                                     f"{features} features; build inputs with the processor, which expands each "
                                     "<image> to its image's exact token count")
        seq.feature_rows = torch.cat(seq.features) if seq.features else None  # once, not per prefill chunk
        if seq.seed is not None:
            seq.rng = torch.Generator(device=engine.device).manual_seed(seq.seed)
        if seq.params.repetition_penalty != 1.0:
            seq.seen = torch.zeros(model.cfg.text.vocab_size, dtype=torch.bool, device=engine.device)
            seq.seen[torch.tensor(seq.prompt_ids, device=engine.device)] = True
        if prefix.enabled:
            seq.identities = token_identities(seq.prompt_ids, model.cfg.image_token_id, seq.image_keys,
                                              [f.shape[0] for f in seq.features or []])
            reused = prefix.match(seq.identities)
            if reused is not None:  # the prefix a previous request left is copied in, not recomputed
                seq.length = len(reused.tokens)
                self.cache.keys[:, seq.slot, :, : seq.length] = reused.cache.keys[:, 0, :, : seq.length]
                self.cache.values[:, seq.slot, :, : seq.length] = reused.cache.values[:, 0, :, : seq.length]
                seq.rows_used = seq.prompt_ids[: seq.length].count(model.cfg.image_token_id)

    def _leave(self, seq: Sequence, reason: str | None, changed: list[Sequence]) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.running:  # the last running sequence takes its place (see _compact)
            i = self.running.index(seq)
            self.running[i] = self.running[-1]
            self.running.pop()
        prefix = self.engine.prefix_cache
        if reason is None and prefix.enabled and seq.identities is not None and seq.length > 0:
            # every token but the last chosen one has been through the model: their keys are in the cache
            rows = slice(seq.slot, seq.slot + 1)
            try:
                prefix.save(seq.identities + seq.token_ids[:-1],
                            KVCache(self.cache.keys[:, rows, :, : seq.length].clone(),
                                    self.cache.values[:, rows, :, : seq.length].clone()), len(seq.identities))
            except Exception as e:  # noqa: BLE001 - (out of memory for the copy, say) the answer is done: it stands
                warnings.warn(f"the prefix cache could not keep a finished request ({type(e).__name__}: {e}); "
                              "later turns of its conversation will be computed again", LlavaWarning)
        seq.slot = -1
        seq.finish(reason)
        if seq not in changed:
            changed.append(seq)

    def _compact(self) -> None:
        """Moves sequences down into freed rows: running first (rows 0..n-1), then prefilling. A row is only ever
        copied into one that is free or whose sequence has already moved (order and slots only decrease)."""
        for i, seq in enumerate((*self.running, *self.prefilling)):
            if seq.slot != i:
                self.cache.keys[:, i, :, : seq.length] = self.cache.keys[:, seq.slot, :, : seq.length]
                self.cache.values[:, i, :, : seq.length] = self.cache.values[:, seq.slot, :, : seq.length]
                seq.slot = i

    # -- the model ---------------------------------------------------------------------------------------------------

    def _prefill(self, seq: Sequence, changed: list[Sequence], budget: int | None) -> None:
        model, device = self.engine.model, self.engine.device
        begin, total = seq.length, seq.prompt_tokens
        end = total if budget is None or not self.running else min(total, begin + budget)
        ids = seq.prompt_ids[begin:end]
        features = None
        placeholders = ids.count(model.cfg.image_token_id) if seq.feature_rows is not None else 0
        if placeholders:  # the feature rows of this chunk's placeholders
            features = [seq.feature_rows[seq.rows_used : seq.rows_used + placeholders]]
            seq.rows_used += placeholders
        rows = slice(seq.slot, seq.slot + 1)
        logits = self.engine.forward(torch.tensor([ids], device=device), image_features=features,
                                     cache=KVCache(self.cache.keys[:, rows], self.cache.values[:, rows]), start=begin,
                                     positions=torch.arange(begin, end, device=device)[None], logits_to_keep=1)
        seq.length = end
        if end < total:
            return
        self.prefilling.remove(seq)
        self.running.append(seq)
        seq.features = seq.feature_rows = None  # in the cache now
        self._accept([seq], logits[:, -1], changed)

    def _decode(self, changed: list[Sequence]) -> None:
        running, device = self.running, self.engine.device
        n = len(running)
        tokens = torch.tensor([[s.token_ids[-1]] for s in running], device=device)
        lengths = [s.length for s in running]
        positions = torch.tensor(lengths, device=device)[:, None]  # no padding: a token's position is its slot
        cache = KVCache(self.cache.keys[:, :n], self.cache.values[:, :n])
        if self.engine.static_decode:  # the same shapes at every step: the whole KV space, masked
            start, cache = positions[:, 0], self.cache
            key_mask = torch.arange(self.cache.capacity, device=device)[None] <= positions  # (n, capacity)
        elif len(set(lengths)) == 1:  # all at one slot: the plain path, no mask
            start, key_mask = lengths[0], None
        else:
            start = positions[:, 0]
            # keys in whole KEY_BLOCKs, masked past each row's length: the same layout for 64 steps at a time, which
            # a compiled step would otherwise be compiled again for
            seen = min(whole_key_blocks(max(lengths) + 1), self.cache.capacity)
            key_mask = torch.arange(seen, device=device)[None] <= positions  # (n, S)
        logits = self.engine.decode(tokens, cache=cache, start=start, positions=positions, key_mask=key_mask,
                                    logits_to_keep=1)
        for seq in running:
            seq.length += 1
        self._accept(list(running), logits[:, -1], changed)

    def _accept(self, seqs: list[Sequence], logits: torch.Tensor, changed: list[Sequence]) -> None:
        """Chooses each sequence's next token from its logits (n, V) with its own settings, and records it."""
        logits = logits.float()
        tokens = logits.argmax(-1).tolist()  # greedy rows without a penalty are done with this
        for i, seq in enumerate(seqs):
            params = seq.params
            if params.temperature >= GREEDY_BELOW or seq.seen is not None:
                seen = seq.seen[None] if seq.seen is not None else None
                tokens[i] = int(choose_next(logits[i : i + 1], params, seen, seq.rng)[0])
            if seq.seen is not None:
                seq.seen[tokens[i]] = True
            if seq.logprobs is not None:
                logprobs = logits[i].log_softmax(-1)
                top = logprobs.topk(params.logprobs) if params.logprobs else None
                seq.logprobs.append(TokenLogprob(tokens[i], float(logprobs[tokens[i]]),
                                                 list(zip(top.indices.tolist(), top.values.tolist())) if top else []))
            seq.add_token(tokens[i], tokens[i] in self.eos)
            if not seq.done and seq.length >= self.capacity:
                seq.done = True  # the row is full (limit_new_tokens keeps this from happening)
            if seq.done:
                self._leave(seq, None, changed)
            elif seq not in changed:
                changed.append(seq)


# The attention kernels for keys whose number changes from call to call: every prompt and every eager decoding step.
# On Hopper and Blackwell GPUs with a cuDNN newer than 9.15 (PyTorch's CUDA 13 builds) PyTorch prefers cuDNN's
# attention, which builds an execution plan for each new key length (TORCH_CUDNN_SDPA_AVOID_RECOMPILE is opt-in). On
# an H200 (torch 2.11+cu130) eager decoding, one key more at every step, ran at 13-16 tokens/s on the medium preset
# and at 7B alike (64-73 ms a step whatever the size; transformers' the same), where CUDA graphs (one shape) ran at
# 300 and 100. Flash attention builds no plan. (Not yet measured on a GPU with this setting.) A compiled step keeps
# PyTorch's choice, and so does the vision tower (one crop length) except in lmms-eval's scoring, which runs the
# whole model in one call. The settings are process-wide: another thread's attention meanwhile runs under them too,
# which changes its kernel, not what it computes.
VARYING_LENGTH_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def varying_length_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """Where the decoder's attention runs on `device` when its key length varies (above); a no-op on the CPU."""
    return sdpa_kernel(VARYING_LENGTH_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


COMPILED_GRAPHS_LIMIT = 64  # compiled pipelines in one process, ~1-3 graphs each (see Engine.__init__)


def mark_model_sizes_static(cache: KVCache) -> None:
    """Marks a KV cache's sizes that are the model's own (layers, kv heads, head size), which never change, static
    for torch.compile. Left dynamic, a compiled step takes each for any other size equal to it when compiled (duck
    sizing) and fixes both: a batch of as many rows as the model has layers or kv heads, or keys masked as wide as its
    head size (64 on the medium preset), each compiled once more, measured with TORCH_LOGS=recompiles."""
    for kv in (cache.keys, cache.values):
        for tensor in (kv, kv._base) if kv._base is not None else (kv,):  # (a slice, and the space it is of)
            torch._dynamo.mark_static(tensor, (0, 2, 4))


def mark_weights_static(model: torch.nn.Module) -> None:
    """Quantized weights are buffers or plain attributes (Int4Linear.packed), which a step compiled with dynamic=True
    would give symbolic sizes; one equal to an activation's size (1536 rows of a projection, a mask 1536 keys wide)
    is merged with it and specialised, and the step compiled again at the next length. Weights never change size."""
    for module in model.modules():
        for tensor in [*module.buffers(recurse=False), *vars(module).values()]:
            if isinstance(tensor, torch.Tensor):
                torch._dynamo.mark_static(tensor)


# The int8 layout a compiled CPU step multiplies one row in: "measure" (a compiled engine times both on its own
# weights, quantize.time_int8_layouts, and keeps the faster; the timings are remembered for this processor, PyTorch,
# thread count and these layer shapes, layout_cache.py), "remeasure" (timed again, and remembered), "blocks" or
# "plain". From the environment, for users who know their processor's answer and would skip the time it takes to
# measure (~1 s on the medium preset, ~7 s at 7B).
INT8_LAYOUT = os.environ.get("LLAVA_NEXT_INT8_LAYOUT", "measure")
INT8_LAYOUTS = ("measure", "remeasure", "blocks", "plain")


# why a compiled CPU engine's int8 weights are plain where its steps carry many rows (Engine.expect_many_rows)
MANY_ROWS_INT8_LAYOUT = "plain for steps of many rows"

# The blocks are kept only when they are clearly faster for one row: in a tie (the noise of a shared machine, or
# weights that fit in the cache) the plain layout wins, being the faster one for steps of two rows and more (1.4-1.6x
# on the medium preset on an Intel Xeon, BENCHMARKS.md) and for eager calls, which dequantize the blocks.
INT8_BLOCKS_MIN_SPEEDUP = 1.05


def int8_layout_for_compiled_steps(model: torch.nn.Module) -> tuple[bool, dict[str, float], str | None]:
    """(whether a compiled CPU step should hold the int8 weights in column blocks, the timings that decided it, and
    how it was decided; None for a model without int8 layers that could take blocks)."""
    check_setting("LLAVA_NEXT_INT8_LAYOUT", INT8_LAYOUT, INT8_LAYOUTS, "int8 layout")
    layers = decoding_int8_layers(model)
    if not layers:
        return False, {}, None
    # (a timing that fails, most likely because the blocks' loop did not compile without a C++ compiler, leaves them
    # plain: the step's own compile will say so; the caller lays every layer out plain, any in blocks included)
    times, reason = layout_timings(
        INT8_LAYOUT, "LLAVA_NEXT_INT8_LAYOUT", f"int8 decoding layers, compiled, {layers[0].scales.dtype} rows",
        layer_shapes(layers), ("column blocks", "plain"), lambda: time_int8_layouts(model),
        f"column blocks are kept when more than {INT8_BLOCKS_MIN_SPEEDUP}x as fast for one row")
    if INT8_LAYOUT in ("blocks", "plain"):
        return INT8_LAYOUT == "blocks", times, reason
    return bool(times) and times["column blocks"] * INT8_BLOCKS_MIN_SPEEDUP < times["plain"], times, reason


def check_setting(variable: str, setting: str, allowed: tuple[str, ...], what: str) -> None:
    """An environment setting of a measured choice that is not one of `allowed` is refused by name, before any load
    work depends on it."""
    if setting not in allowed:
        raise LlavaError(f"{variable}={setting!r} is not one of {', '.join(allowed)}: unset it to let the engine "
                         f"measure which {what} is faster here")


def check_cpu_settings() -> None:
    """Every measured choice's environment setting checked at once: load() calls this before reading any weight, so
    a mistyped setting is refused at the start of a load instead of when the engine is built after it (each choice
    checks its own again where it is made, for callers that make it directly)."""
    check_setting("LLAVA_NEXT_BF16_LAYOUT", BF16_LAYOUT, BF16_LAYOUTS, "bfloat16 layout")
    check_setting("LLAVA_NEXT_FLOAT32_KERNEL", FLOAT32_KERNEL, FLOAT32_KERNELS, "float32 kernel")
    check_setting("LLAVA_NEXT_W8A8_ONE_ROW", W8A8_ONE_ROW, W8A8_ONE_ROW_FORMS, "w8a8 form for one row")
    check_setting("LLAVA_NEXT_INT8_LAYOUT", INT8_LAYOUT, INT8_LAYOUTS, "int8 layout")


def is_trusted(remembered: dict | None) -> bool:
    """Whether a remembered timing (layout_cache.recall) decides without timing again."""
    return remembered is not None and remembered["measurements"] >= layout_cache.MEASUREMENTS_TO_TRUST


def layer_shapes(layers: list[torch.nn.Module]) -> list[tuple[int, int]]:
    return [(m.out_features, m.in_features) for m in layers]


def layout_timings(setting: str, variable: str, what: str, shapes: list[tuple[int, int]], layouts: tuple[str, str],
                   measure: Callable[[], dict[str, float]], rule: str) -> tuple[dict[str, float], str]:
    """(the timings of `layouts` that a choice between them is made by, how they were had): none where the
    environment's `setting` fixes the choice; remembered for this processor and layers of these (out, in) `shapes`
    (layout_cache.py) once measured by MEASUREMENTS_TO_TRUST loads, unless `setting` is "remeasure" (which starts the
    count again); else measured, each layout's time the faster of this and the remembered measurements, and
    remembered; none, and why, when measuring fails."""
    if setting not in ("measure", "remeasure"):
        return {}, f"set by {variable}={setting}"

    def trusted(remembered: dict | None) -> tuple[dict[str, float], str] | None:
        if not is_trusted(remembered):
            return None
        return remembered["seconds"], (f"measured here on {remembered['date']}, remembered in "
                                       f"{layout_cache.cache_file()} ({variable}=remeasure times it again); {rule}")

    try:
        key = layout_cache.key(what, shapes)
        # (a trusted timing needs no lock; the lock is for measuring, and for the recall that decides whether to)
        if setting == "measure" and (found := trusted(layout_cache.recall(key, layouts))):
            return found
        with layout_cache.measuring() as lock:
            remembered = layout_cache.recall(key, layouts) if setting == "measure" else None
            if found := trusted(remembered):  # (another process measured while this one waited)
                return found
            times = measure()
            if set(times) != set(layouts) or not all(map(layout_cache.is_seconds, times.values())):
                raise ValueError(f"the timing gave {times}, not seconds for each of {', '.join(layouts)}")
            if setting == "measure" and lock != "locked":
                # (without the lock, another process may have remembered its timing meanwhile: kept, not overwritten)
                remembered = layout_cache.recall(key, layouts)
            if remembered is None:
                measurements = 1
            else:
                times = {layout: min(times[layout], remembered["seconds"][layout]) for layout in layouts}
                measurements = min(remembered["measurements"] + 1, layout_cache.MEASUREMENTS_TO_TRUST)
            layout_cache.remember(key, times, measurements)
    except Exception as e:
        return {}, f"not measured: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    how = f"measured by load {measurements} of the {layout_cache.MEASUREMENTS_TO_TRUST} that time it"
    if measurements > 1:
        how += ", each layout's time the faster of this load's and the remembered one"
    if lock == "not waited":
        how += (f" (without waiting longer than {layout_cache.LOCK_WAIT_SECONDS:g} s for another process measuring "
                "at the same time, which makes both timings slower)")
    return times, f"{how}; {rule}"


# The layout a CPU engine holds its bfloat16 decoding layers' weights in: "measure" (both timed before loading on
# stand-ins of the decoding layers' shapes, on the model's own weights for a model converted after loading,
# quantize.time_bf16_layouts, by the first two loads on which this processor, PyTorch and thread count meet these
# layer shapes; the timings are remembered, layout_cache.py), "remeasure" (timed again, and remembered),
# "blocked" (oneDNN's reordered layout) or "plain" (as loaded; torch.mv for one row). From the environment, as
# INT8_LAYOUT.
BF16_LAYOUT = os.environ.get("LLAVA_NEXT_BF16_LAYOUT", "measure")
BF16_LAYOUTS = ("measure", "remeasure", "blocked", "plain")
# The blocked layout replaces the loaded (plain) one only when clearly faster: reordering a 7B model's weights takes
# ~8 s, and a tie within the machine's noise is no reason to pay it.
BF16_BLOCKED_MIN_SPEEDUP = 1.05


# what the layout cache calls these layers' timings, before loading and after alike
BF16_TIMINGS_NAME = "bfloat16 decoding layers"


def bf16_layout_from_timings(times: dict[str, float]) -> str:
    return "blocked" if times and times["blocked"] * BF16_BLOCKED_MIN_SPEEDUP < times["plain"] else "plain"


def bf16_layout_choice(shapes: list[tuple[int, int]], measure: Callable[[], dict[str, float]]
                       ) -> tuple[str | None, dict[str, float], str | None]:
    """(the layout for bfloat16 decoding layers of these (out, in) shapes, the timings that decided it, how it was
    decided), `measure` timing the two layouts where nothing fixes or remembers the choice; (None, {}, None) without
    such layers."""
    check_setting("LLAVA_NEXT_BF16_LAYOUT", BF16_LAYOUT, BF16_LAYOUTS, "bfloat16 layout")
    if not shapes:
        return None, {}, None
    # (a timing that fails, most likely oneDNN refusing its reorder, leaves the layers plain, as loaded)
    times, reason = layout_timings(BF16_LAYOUT, "LLAVA_NEXT_BF16_LAYOUT", BF16_TIMINGS_NAME, shapes,
                                   ("blocked", "plain"), measure,
                                   f"the blocked layout is taken when more than {BF16_BLOCKED_MIN_SPEEDUP}x as fast "
                                   "for one row")
    layout = BF16_LAYOUT if BF16_LAYOUT in ("blocked", "plain") else bf16_layout_from_timings(times)
    return layout, times, reason


def bf16_layout_before_loading(shapes: list[tuple[int, int]]) -> tuple[str | None, dict[str, float], str | None]:
    """bf16_layout_choice for a model's bfloat16 decoding layers of these shapes (quantize.decoding_bf16_shapes)
    before their weights are loaded, where it must be timed on stand-ins of their shapes (quantize.bf16_stand_ins,
    handed back before loading starts: they hold at most LAYOUT_PROBE_BYTES and one layer more, under the loaded
    model's size). Loading then lays each layer out as it is read. Reordered after loading instead, one layer at a
    time, a layer was held in both layouts beside the whole model (the medium preset's 62.6 MiB lm_head: a load peak
    of 1.21x the model instead of 1.06x, BENCHMARKS.md)."""
    try:
        return bf16_layout_choice(shapes, lambda: time_bf16_layouts(bf16_stand_ins(shapes)))
    finally:
        release_free_memory()


def bf16_layout_for_decoding(model: torch.nn.Module, decided: tuple[str | None, dict[str, float], str | None] | None
                             = None) -> tuple[str | None, dict[str, float], str | None]:
    """Lays a CPU model's bfloat16 decoding layers (loaded plain, or already laid out as bf16_layout_before_loading
    chose: `decided`) out in the layout they multiply one row fastest in; returns (the layout, the timings that
    decided it, how it was decided), or (None, {}, None) for a model without such layers. Without `decided` (a model
    converted after loading, as an adapter's merge is) the layouts are timed on the model's own layers."""
    layers = decoding_bf16_layers(model)
    if not layers:
        return None, {}, None
    if decided is None:
        decided = bf16_layout_choice(layer_shapes(layers), lambda: time_bf16_layouts(layers))
    lay_out_bf16_weights(layers, packed=decided[0] == "blocked")  # (handing each replaced weight back as it goes)
    return decided


# The kernel a CPU engine's float32 linears multiply in: "measure" (both timed on the model's own decoding layers,
# quantize.time_float32_kernels, by the first two loads that meet them on this processor; remembered, layout_cache.py),
# "remeasure", "onednn" or "pytorch" (F.linear). From the environment, as BF16_LAYOUT.
FLOAT32_KERNEL = os.environ.get("LLAVA_NEXT_FLOAT32_KERNEL", "measure")
FLOAT32_KERNELS = ("measure", "remeasure", "onednn", "pytorch")


def float32_kernel_for_linears(model: torch.nn.Module) -> tuple[str | None, dict[str, float], str | None]:
    """Sets every float32 FastLinear of a CPU model (the vision tower's too) to the kernel that multiplies one row
    through its decoding layers faster; returns ("onednn" or "pytorch", the timings, how it was decided), or
    (None, {}, None) for a model without float32 decoding layers."""
    check_setting("LLAVA_NEXT_FLOAT32_KERNEL", FLOAT32_KERNEL, FLOAT32_KERNELS, "float32 kernel")
    linears = float32_fast_linears(model)
    decoding = [layer for name, layer in linears if runs_in_decoding(name)]
    if not decoding:
        return None, {}, None
    times, reason = layout_timings(FLOAT32_KERNEL, "LLAVA_NEXT_FLOAT32_KERNEL", "float32 linears",
                                   layer_shapes(decoding),
                                   ("oneDNN", "PyTorch"), lambda: time_float32_kernels(model),
                                   "the faster for one row is taken (oneDNN in a tie)")
    if FLOAT32_KERNEL in ("onednn", "pytorch"):
        kernel = FLOAT32_KERNEL
    elif not times:  # the timing failed, most likely in oneDNN's kernel (F.linear is PyTorch's own): PyTorch's
        kernel = "pytorch"
    else:
        kernel = "pytorch" if times["PyTorch"] < times["oneDNN"] else "onednn"
    for _, layer in linears:
        layer.onednn = kernel == "onednn"
    return kernel, times, reason


# How a CPU engine's w8a8 layers multiply a decoding step's single row: "measure" (both forms timed on the model's
# own decoding layers, quantize.time_w8a8_one_row, by the first two loads that meet them on this processor;
# remembered, layout_cache.py), "remeasure", "int8 rows" (quantized, torch._int_mm) or "weight-only" (int8's kernel).
# From the environment, as BF16_LAYOUT.
W8A8_ONE_ROW = os.environ.get("LLAVA_NEXT_W8A8_ONE_ROW", "measure")
W8A8_ONE_ROW_FORMS = ("measure", "remeasure", "int8 rows", "weight-only")


def w8a8_one_row_form(model: torch.nn.Module) -> tuple[str | None, dict[str, float], str | None]:
    """Sets a CPU model's w8a8 layers to the form that multiplies one row through its decoding layers faster;
    returns ("int8 rows" or "weight-only", the timings, how it was decided), or (None, {}, None) for a model without
    w8a8 decoding layers. The two forms' numbers differ as w8a8's from int8's do (the row rounded to int8 or not)."""
    check_setting("LLAVA_NEXT_W8A8_ONE_ROW", W8A8_ONE_ROW, W8A8_ONE_ROW_FORMS, "w8a8 form for one row")
    layers = decoding_w8a8_layers(model)
    if not layers:
        return None, {}, None
    times, reason = layout_timings(W8A8_ONE_ROW, "LLAVA_NEXT_W8A8_ONE_ROW", "w8a8 decoding layers, one row",
                                   layer_shapes(layers),
                                   ("int8 rows", "weight-only"), lambda: time_w8a8_one_row(model),
                                   "the faster for one row is taken (weight-only in a tie)")
    if W8A8_ONE_ROW in ("int8 rows", "weight-only"):
        form = W8A8_ONE_ROW
    else:  # (a failed timing leaves the weight-only kernel, the form w8a8 decoded in before it was timed)
        form = "int8 rows" if times and times["int8 rows"] < times["weight-only"] else "weight-only"
    for layer in layers:
        layer.one_row_int8 = form == "int8 rows"
    return form, times, reason


def lay_out_int8_weights(model: torch.nn.Module, blocked: bool) -> None:
    """Puts the CPU int8 layers' weights in column blocks (compiled steps of few rows) or in the plain layout (steps
    of many rows, eager calls), marking the new tensors static for the compiled step (mark_weights_static)."""
    if block_int8_columns(model, blocked=blocked):
        mark_weights_static(model)


class Engine:
    """Runs requests on the model. It owns the caches: image features by content, and the KV caches of finished
    sequences (the newest, and older ones within prefix_cache_bytes), which a later one reuses for the token ids it
    shares with one of them (the next turn of a conversation). Neither cache changes an answer; both are off unless
    asked for."""

    def __init__(self, model: LlavaModel, tokenizer: Tokenizer, eos_token_ids: typing.Sequence[int],
                 image_cache_bytes: int = 0, prefix_cache: bool = False, prefix_cache_bytes: int = 0,
                 compile: bool = False,
                 bf16_layout: tuple[str | None, dict[str, float], str | None] | None = None):
        """`bf16_layout`: the choice loading made for the bfloat16 decoding layers and laid them out in
        (bf16_layout_before_loading); None: the engine chooses (bf16_layout_for_decoding)."""
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.image_cache = ImageFeatureCache(image_cache_bytes)
        self.prefix_cache = PrefixCache(enabled=prefix_cache, max_bytes=prefix_cache_bytes)
        self.decode_step = model
        self.int8_blocks = False  # (whether the CPU int8 layers' weights are in column blocks, for compiled steps)
        self.int8_layout_seconds: dict[str, float] = {}
        self.int8_layout_reason: str | None = None  # how a compiled CPU engine with int8 layers chose their layout
        # (the layout of a CPU model's bfloat16 decoding layers, the timings and how it was chosen)
        self.bf16_layout: str | None = None
        self.bf16_layout_seconds: dict[str, float] = {}
        self.bf16_layout_reason: str | None = None
        # (the kernel of a CPU model's float32 linears, the timings and how it was chosen)
        self.float32_kernel: str | None = None
        self.float32_kernel_seconds: dict[str, float] = {}
        self.float32_kernel_reason: str | None = None
        # (how a CPU model's w8a8 layers multiply one decoding row, the timings and how it was chosen)
        self.w8a8_one_row: str | None = None
        self.w8a8_one_row_seconds: dict[str, float] = {}
        self.w8a8_one_row_reason: str | None = None
        self.w8a8_one_row_layers: list[torch.nn.Module] = []  # (those that multiply one row in int8, where alone)
        # Static decoding: every step has the same shapes (the whole KV space, a mask over all of it) and the KV
        # space keeps its address from one request to the next, which a CUDA graph needs to be replayed.
        self.static_decode = False
        self._kv_space: KVCache | None = None
        if self.device.type == "cpu":
            keep_freed_memory()  # a prompt's activations reused, not page-faulted in again (memory.py)
            self.bf16_layout, self.bf16_layout_seconds, self.bf16_layout_reason = (
                bf16_layout_for_decoding(model, bf16_layout))
            self.float32_kernel, self.float32_kernel_seconds, self.float32_kernel_reason = (
                float32_kernel_for_linears(model))
            self.w8a8_one_row, self.w8a8_one_row_seconds, self.w8a8_one_row_reason = w8a8_one_row_form(model)
            if self.w8a8_one_row == "int8 rows":
                self.w8a8_one_row_layers = decoding_w8a8_layers(model)
        if compile:
            self.compile_decoding()

    def compile_decoding(self, many_rows: bool = False) -> None:
        """Runs each decoding step through torch.compile from now on (before the first request: a CUDA engine's KV
        space is then static). `many_rows`: the steps will mostly carry many rows (a server's concurrent requests),
        so a CPU engine's int8 weights stay plain for PyTorch's kernel (expect_many_rows), neither timed nor laid out
        in column blocks first. A no-op on an engine that compiles already."""
        if self.decode_step is not self.model:
            return
        model = self.model
        # One decoding step through torch.compile: CUDA graphs on a GPU ("reduce-overhead"), inductor's C++
        # kernels on a CPU. Sizes are dynamic, so it compiles once, not once per position or batch size.
        # Every engine's graphs are entries of the same function (LlavaModel.forward), which PyTorch stops
        # compiling after recompile_limit entries (8) and runs eagerly from then on, for every model in the
        # process: the ninth compiled pipeline of a notebook or an evaluation script would decode eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_LIMIT)
        if self.device.type == "cuda":
            # Static decoding: every step has the same shapes (the whole KV space, a mask over all of it) and the KV
            # space keeps its address from one request to the next, which a CUDA graph needs to be replayed.
            self.static_decode = True
            self.decode_step = torch.compile(model, dynamic=True, mode="reduce-overhead")
        else:
            # int8 steps of one row in column blocks (quantize.blocked_int8_matmul) where that is the faster
            # layout on this processor (~1.5x PyTorch's kernel on some, slower on others; w8a8's _int_mm is
            # faster than either)
            if many_rows:
                self.int8_blocks, self.int8_layout_seconds = False, {}
                self.int8_layout_reason = MANY_ROWS_INT8_LAYOUT if decoding_int8_layers(model) else None
            else:
                self.int8_blocks, self.int8_layout_seconds, self.int8_layout_reason = (
                    int8_layout_for_compiled_steps(model))
            block_int8_columns(model, blocked=self.int8_blocks)
            mark_weights_static(model)
            # emulate_precision_casts: fused 16-bit arithmetic rounded after each operation as eager rounds it,
            # so the compiled step's logits are the eager step's bit for bit (measured: no slower; int8 layers in
            # column blocks excepted, whose eager calls dequantize them to 16 bits). The float
            # linears are FastLinear's oneDNN calls, kept opaque (quantize.py), or float32's F.linear where the
            # engine chose PyTorch's kernel. (Inductor's `freezing`, weights
            # as graph constants, was on before they were: measured without it, same speed and memory.)
            self.decode_step = torch.compile(model, dynamic=True, options={"emulate_precision_casts": True})

    @property
    def device(self) -> torch.device:
        return self.model.device

    def expect_many_rows(self) -> None:
        """Decoding steps will mostly carry many rows (a server's concurrent requests): compiled CPU steps then
        multiply int8 weights with PyTorch's kernel, which reads the plain weights once for all the rows, instead of
        the column-blocked form, which is faster for one row but reads them once per row."""
        if self.decode_step is not self.model:
            self._plain_int8_weights(MANY_ROWS_INT8_LAYOUT)

    def single_rows_alone(self, alone: bool) -> None:
        """Whether a decoding step's single row is a sequence alone (a scheduler of one slot): w8a8 layers then
        multiply it in the form the engine chose for one row, and otherwise weight-only, as a few rows."""
        for layer in self.w8a8_one_row_layers:
            layer.one_row_int8 = alone

    def _plain_int8_weights(self, reason: str) -> None:
        if self.int8_blocks:  # (already plain: the reason it was chosen stands)
            self.int8_layout_reason = reason
        lay_out_int8_weights(self.model, blocked=False)
        self.int8_blocks = False

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The model, eagerly: a prompt, or a decoding step that is not compiled."""
        with varying_length_attention(self.device):
            return self.model(*args, **kwargs)

    def decode(self, *args, **kwargs) -> torch.Tensor:
        if self.decode_step is self.model:
            return self.forward(*args, **kwargs)
        if kwargs.get("cache") is not None:  # (a slice of the KV space each step: a new tensor, without marks)
            mark_model_sizes_static(kwargs["cache"])  # (here: an eager engine never imports torch._dynamo)
        try:
            return self.decode_step(*args, **kwargs)
        except Exception as e:  # torch.compile needs a working C++ (or CUDA) toolchain: run eagerly without one
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "decoding eagerly instead")
            self.decode_step = self.model
            self._plain_int8_weights("plain: decoding eagerly")  # (eagerly, PyTorch's int8 kernel is the fast one)
            return self.forward(*args, **kwargs)

    def kv_space(self, slots: int, capacity: int) -> KVCache:
        """Zeroed keys and values for `slots` rows of `capacity` tokens. With static decoding the space is kept
        and reused while it is large enough (capacity rounded up to KV_BUCKET tokens), so its address is stable."""
        text = self.model.cfg.text
        if self.static_decode:
            capacity = -(-capacity // KV_BUCKET) * KV_BUCKET
            space = self._kv_space
            if space is not None and space.keys.shape[1] == slots and space.keys.shape[3] == capacity:
                space.keys.zero_()
                space.values.zero_()
                return space
            self._kv_space = None  # the old space goes before the new one is taken
        elif self.decode_step is not self.model:
            # A compiled CPU step reads slices of the cache (whole KEY_BLOCKs for rows of different lengths); a space
            # one slot longer than its last block is never read whole, so the step's layouts stay those it was
            # compiled for (one graph, not two).
            capacity = whole_key_blocks(capacity) + 1
        shape = (text.num_layers, slots, text.num_kv_heads, capacity, text.head_dim)
        space = KVCache(torch.zeros(shape, dtype=self.model.dtype, device=self.device),
                        torch.zeros(shape, dtype=self.model.dtype, device=self.device))
        if self.static_decode:
            for t in (space.keys, space.values):  # written in place by the graph, never copied into it
                torch._dynamo.mark_static_address(t, guard=False)
            self._kv_space = space
        return space

    def clear_caches(self) -> None:
        self.image_cache.clear()
        self.prefix_cache.clear()

    def cache_stats(self) -> dict[str, dict[str, int]]:
        return {"image_features": self.image_cache.as_dict(), "prefix": self.prefix_cache.as_dict()}

    def kv_bytes_per_token(self) -> int:
        text = self.model.cfg.text
        return 2 * text.num_layers * text.num_kv_heads * text.head_dim * self.model.dtype.itemsize

    def image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
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

    def sequences(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> list[Sequence]:
        """A (padded) batch from the processor -> one sequence per row, padding removed, each with the features
        of its own images (all images go through the tower in one call)."""
        params.validate()
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        prompts = [row[keep].tolist() for row, keep in zip(ids, mask)]
        features: list[torch.Tensor] = []
        keys: list[bytes] = []
        if inputs.get("pixel_values") is not None:
            features, keys = self.image_features(inputs["pixel_values"], inputs.get("image_sizes"),
                                                 keyed=self.prefix_cache.enabled)
        seqs, image = [], 0
        for prompt in prompts:
            wanted, first = prompt.count(self.model.cfg.image_token_id), image
            while wanted > 0 and image < len(features):  # this row's images: as many as its placeholders take
                wanted -= features[image].shape[0]
                image += 1
            seqs.append(Sequence(prompt, params, IncrementalDetokenizer(self.tokenizer),
                                 features[first:image] or None, keys[first:image]))
        if image < len(features):
            seqs[-1].features = (seqs[-1].features or []) + features[image:]  # too many: the count check says so
        return seqs

    def scheduler(self, seqs: list[Sequence]) -> Scheduler:
        """A scheduler with a row for each of `seqs`, just long enough for the longest, with them added."""
        window = self.model.cfg.text.max_position_embeddings
        for seq in seqs:
            if seq.prompt_tokens >= window:
                raise GenerationError(f"the prompt ({seq.prompt_tokens} tokens) fills the model's context window "
                                      f"({window} tokens): there is no room for an answer; shorten it")
        capacity = max(min(window, s.prompt_tokens + s.params.max_new_tokens) for s in seqs)
        scheduler = Scheduler(self, len(seqs), capacity)
        for seq in seqs:
            scheduler.add(seq)
        return scheduler

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> list[Generation]:
        seqs = self.sequences(inputs, params)
        scheduler = self.scheduler(seqs)
        while not scheduler.idle:
            scheduler.step()
        return [seq.generation() for seq in seqs]

    def stream(self, inputs: dict[str, torch.Tensor], params: SamplingParams) -> "TextStream":
        """Text pieces of a single prompt as they are generated; joined, they equal `generate(...)`'s text."""
        if inputs["input_ids"].shape[0] != 1:
            raise GenerationError("stream() takes one prompt; use generate() for a batch")
        with torch.inference_mode():
            seqs = self.sequences(inputs, params)
            return TextStream(seqs[0], self.scheduler(seqs))


class TextStream:
    """An iterator of text pieces; once exhausted, `generation` holds the whole result (finish reason included)."""

    def __init__(self, seq: Sequence, scheduler: Scheduler):
        self._seq, self._scheduler = seq, scheduler
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        while not self._scheduler.idle:
            # Inference mode per step: a generator suspended inside the context would leak it into the caller.
            with torch.inference_mode():
                self._scheduler.step()
            piece = self._seq.take_text()
            if piece:
                yield piece
        self.generation = self._seq.generation()


class EngineBusy(GenerationError):
    """The waiting queue is full, or the engine is shutting down: try again later."""


class BackgroundEngine:
    """A scheduler on a thread of its own, for a server. Any thread submits sequences and may cancel them; each
    sequence's listener is called on the engine's thread after every step that changed it (new text, the end)."""

    def __init__(self, engine: Engine, slots: int, capacity: int, prefill_chunk: int | None = 256,
                 max_waiting: int = 64):
        self.engine = engine
        if slots > 1:
            engine.expect_many_rows()
        self.scheduler = Scheduler(engine, slots, capacity, prefill_chunk, isolate_errors=True)
        self.max_waiting = max_waiting
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="llava-next-engine", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running) + len(self.scheduler.prefilling)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queues all of `seqs` or none: EngineBusy when the queue is full, GenerationError when one cannot fit."""
        self._enqueue(seqs, bounded=True)

    def _enqueue(self, seqs: list[Sequence], bounded: bool) -> None:
        for seq in seqs:
            seq.params.validate()
            self.scheduler.limit_new_tokens(seq)
        with self._wake:
            if self._stopping:
                raise EngineBusy("the server is shutting down")
            if bounded and self.waiting + len(seqs) > self.max_waiting:
                raise EngineBusy(f"the queue is full ({self.max_waiting} requests waiting)")
            self._inbox.extend(seqs)
            self._wake.notify()

    # The forms of a decoding step that a server meets, each compiled as a graph of its own (torch.compile
    # specialises on them; TORCH_LOGS=recompiles): one row; rows at one length (a request's n choices); rows at
    # different lengths, whose keys are masked in whole KEY_BLOCKs. (Graphs for two rows serve any number of rows and
    # any mask width, the model's own sizes being marked static: mark_model_sizes_static.)
    # (prompt lengths, one tuple a group of rows; the longer first: the first prompt is prefilled whole, so that the
    # second joins it at a different length even with the smallest prefill chunks)
    WARM_UP_PROMPTS = ((3,), (3, 3), (40, 3))
    WARM_UP_TOKENS = 4

    def warm_up(self) -> float:
        """Runs short greedy sequences of each WARM_UP_PROMPTS group through the engine, so that a compiled decoding
        step is compiled before a server's first requests would wait for it (3-27 s a form on the medium preset on
        a 2-core CPU); returns the seconds it took. They ignore end-of-sequence tokens, so that each one decodes.
        The prefix cache is off meanwhile: nothing of them is kept or counted. Call before submitting anything else;
        raises LlavaError when the engine's thread stopped meanwhile. (On a GPU, CUDA graphs are also recorded for
        each number of rows when first met: a short pause, not a compile.)"""
        scheduler, engine, prefix = self.scheduler, self.engine, self.engine.prefix_cache
        token = engine.tokenizer.encode("a", add_special_tokens=False)[0]
        eos, scheduler.eos = scheduler.eos, frozenset()
        enabled, prefix.enabled = prefix.enabled, False  # (text only: the image cache is not asked either)
        began = time.perf_counter()
        try:
            for lengths in self.WARM_UP_PROMPTS:
                if len(lengths) > scheduler.slots or max(lengths) + self.WARM_UP_TOKENS > scheduler.capacity:
                    continue  # (a server that cannot meet this form)
                seqs = [Sequence([token] * length, SamplingParams(max_new_tokens=self.WARM_UP_TOKENS),
                                 IncrementalDetokenizer(engine.tokenizer)) for length in lengths]
                try:
                    self._enqueue(seqs, bounded=False)  # (nothing else is queued yet: past a queue limit of 1 too)
                except GenerationError as e:  # (longer than the model's context window)
                    warnings.warn(f"not compiled before serving, rows of lengths {lengths}: {e}", LlavaWarning)
                    continue
                # (finished_at, not done: a sequence is done before it leaves its row)
                while any(seq.finished_at is None for seq in seqs) and self._thread.is_alive():
                    time.sleep(0.01)
                for seq in seqs:
                    if seq.error is not None:
                        warnings.warn(f"a warm-up request failed ({type(seq.error).__name__}: {seq.error})",
                                      LlavaWarning)
            if not self._thread.is_alive():
                raise LlavaError("the engine's thread stopped while compiling the decoding step")
        finally:
            scheduler.eos, prefix.enabled = eos, enabled
        return time.perf_counter() - began

    def cancel(self, seqs: list[Sequence]) -> None:
        """Frees their KV rows at the next step."""
        for seq in seqs:
            seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._wake:
                if not self._inbox and scheduler.idle and not self._stopping:
                    release_free_memory()  # the work is done: give what the allocator holds free back to the system
                while not self._inbox and scheduler.idle and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._inbox and scheduler.idle:
                    return
                scheduler.waiting.extend(self._inbox)
                self._inbox.clear()
            with torch.inference_mode():
                scheduler.step()
            self.steps += 1

    def shutdown(self, cancel: bool = False, timeout: float | None = None) -> None:
        """Stops taking requests; finishes those in flight (or cancels them), then the thread ends."""
        with self._wake:
            self._stopping = True
            if cancel:
                for seq in (*self._inbox, *self.scheduler.waiting, *self.scheduler.prefilling, *self.scheduler.running):
                    seq.cancelled = True
            self._wake.notify()
        self._thread.join(timeout)
