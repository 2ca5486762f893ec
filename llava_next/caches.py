"""The generation engine's caches: image features by content, and the KV caches of finished requests' prefixes.

Both exist so that a question asked again about the same image, or the next turn of a conversation, does not redo
work whose result is already known. Neither may ever change an answer: image features are keyed by a cryptographic
hash of exactly what the vision tower would see (the preprocessed tiles, their shape and dtype, and the image's
size, which decides the packing), never by a file name; a prefix is reused only for the token ids that are equal.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .model.decoder import KVCache


def image_key(tiles: torch.Tensor, image_size: tuple[int, int] | None) -> bytes:
    """blake2b of one image's preprocessed tiles (values, shape, dtype) and its original (height, width)."""
    digest = hashlib.blake2b(digest_size=32)
    digest.update(repr((tuple(tiles.shape), str(tiles.dtype), image_size)).encode())
    digest.update(tiles.detach().contiguous().cpu().numpy().tobytes())
    return digest.digest()


def token_identities(token_ids: list[int], image_token_id: int, image_keys: list[bytes],
                     image_lengths: list[int]) -> list:
    """The prompt as the model sees it: token ids, with each image placeholder replaced by (its image's key, its row).

    Two prompts' KV caches agree exactly as far as these agree: the same placeholder id stands for different
    features when the images differ, so ids alone would let one image's cache answer for another.
    """
    out: list = list(token_ids)
    image, row = 0, 0
    for i, token in enumerate(token_ids):
        if token != image_token_id or image >= len(image_keys):
            continue
        out[i] = (image_keys[image], row)
        row += 1
        if row == image_lengths[image]:
            image, row = image + 1, 0
    return out


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}


class ImageFeatureCache:
    """Least-recently-used map from image_key to the image's packed features, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.stats = CacheStats()

    def get(self, key: bytes) -> torch.Tensor | None:
        features = self.entries.get(key)
        if features is None:
            self.stats.misses += 1
            return None
        self.entries.move_to_end(key)
        self.stats.hits += 1
        return features

    def put(self, key: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def as_dict(self) -> dict[str, int]:
        return {**self.stats.as_dict(), "entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes}


@dataclass
class SavedPrefix:
    """The KV cache of a finished request (one row): valid for the first len(tokens) slots."""

    tokens: list  # token_identities of what went through the model
    cache: KVCache
    prompt_length: int | None = None  # how many of the tokens were the request's prompt (None: all)


def shared_length(a: list, b: list, limit: int) -> int:
    """How many leading entries a and b share, at most `limit` (and at most either's length). Compared a chunk at a
    time (list equality runs in C), then the chunk that differs halved down to the first difference: a server's
    prefix cache compares every admitted prompt with each of its entries."""
    limit = min(limit, len(a), len(b))
    n, step = 0, 512
    while n < limit:
        end = min(n + step, limit)
        if a[n:end] == b[n:end]:
            n = end
            continue
        while end - n > 1:  # (a[n:end] differs somewhere: keep the half where it first does)
            middle = (n + end) // 2
            if a[n:middle] == b[n:middle]:
                n = middle
            else:
                end = middle
        return n
    return n


class PrefixCache:
    """Finished requests' KV caches, offered to a request that starts the same way (the next turn of a conversation).

    Bounded in bytes, least recently used first out: the newest entry is always kept, older ones while all of them
    fit in `max_bytes` (0, the default: the newest only, one conversation at a time, as a notebook or `chat` needs;
    a server keeps several conversations' turns). An entry whose whole prompt a newer one shares (the turn before,
    in the same conversation, whose answer the next prompt holds as the template renders it) is dropped when the
    newer one is saved: it would serve only what the newer one does, and the old answer's own tokens."""

    def __init__(self, enabled: bool = True, max_bytes: int = 0):
        self.enabled, self.max_bytes = enabled, max_bytes
        self.entries: list[SavedPrefix] = []  # least recently used first
        self.bytes = self.saved_tokens = 0  # (of the entries, kept as they change: read by every /metrics scrape)
        self.stats = CacheStats()
        self.reused_tokens = 0

    @staticmethod
    def nbytes(entry: SavedPrefix) -> int:
        return 2 * entry.cache.keys.numel() * entry.cache.keys.element_size()

    def match(self, tokens: list) -> SavedPrefix | None:
        """The saved prefix that shares the most of `tokens` (token_identities), as far as it does, if at all; at
        least the last prompt token is always recomputed, since its logits are needed."""
        if not self.enabled:
            return None
        best, n = None, 0
        for entry in self.entries:
            shared = shared_length(entry.tokens, tokens, len(tokens) - 1)
            if shared > n:
                best, n = entry, shared
        if n <= 1:  # (nothing saved, or only the first token, a BOS that every prompt starts with: nothing to reuse)
            self.stats.misses += 1
            return None
        self.entries.remove(best)
        self.entries.append(best)
        self.stats.hits += 1
        self.reused_tokens += n
        return SavedPrefix(best.tokens[:n], best.cache)

    def save(self, tokens: list, cache: KVCache, prompt_length: int | None = None) -> None:
        if not self.enabled:
            return
        tokens = list(tokens)

        def superseded(entry: SavedPrefix) -> bool:
            prompt = len(entry.tokens) if entry.prompt_length is None else entry.prompt_length
            return shared_length(entry.tokens, tokens, prompt) == prompt

        kept = [e for e in self.entries if not superseded(e)]
        kept.append(SavedPrefix(tokens, cache, prompt_length))
        total = sum(map(self.nbytes, kept))
        while len(kept) > 1 and total > self.max_bytes:
            total -= self.nbytes(kept.pop(0))
        self.entries, self.bytes, self.saved_tokens = kept, total, sum(len(e.tokens) for e in kept)

    def clear(self) -> None:
        self.entries, self.bytes, self.saved_tokens = [], 0, 0

    def as_dict(self) -> dict[str, int]:
        return {**self.stats.as_dict(), "reused_tokens": self.reused_tokens, "entries": len(self.entries),
                "saved_tokens": self.saved_tokens, "bytes": self.bytes, "max_bytes": self.max_bytes}
