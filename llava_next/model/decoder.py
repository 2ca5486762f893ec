"""One decoder for llama (vicuna, Yi, Llama-3), mistral and qwen2: they differ only in `TextConfig` fields.

Pre-norm transformer with RMSNorm, rotary positions, grouped-query attention and a SwiGLU MLP. Parameter names follow
transformers' LlamaModel so checkpoints map by prefix alone. The KV cache is not owned here: the generation engine
passes a `KVCache` in and this code writes into it at explicit positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import RopeConfig, TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # one call: the same floats as normalising, then scaling
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        # Normalise in float32 whatever the activations' dtype, then scale in theirs (as the reference does).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def embedding(rows: int, width: int) -> nn.Embedding:
    """nn.Embedding. On the meta device (a model built to be filled from a checkpoint) without its random init:
    that op has no C++ kernel there, and PyTorch's Python one imports torch._dynamo on first use, ~3 s of a load."""
    if torch.get_default_device().type == "meta":
        return nn.Embedding(rows, width, _weight=torch.empty(rows, width))
    return nn.Embedding(rows, width)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, device: str | None = None) -> torch.Tensor:
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D) rotated by the tables of `Decoder.rope_tables` (B, T, 1, D).

    The reference's x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1), in fewer operations:
    roll(x) = cat(x2, x1) times sin with its first half negated (`signed_sin`). (-a) * b and a * (-b) are the same
    float, so the result is too, bit for bit.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (layers, B, kv_heads, capacity, head_dim) each."""

    keys: torch.Tensor
    values: torch.Tensor

    @classmethod
    def allocate(cls, cfg: TextConfig, batch: int, capacity: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        # zeros: decoding reads slots past a sequence's length with weight 0 (decode_attention), 0 x NaN is NaN
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]


def fused_views(fused: nn.Linear, names: tuple[str, ...], widths: list[int]) -> dict[str, torch.Tensor]:
    """The row blocks of a fused projection under the names of the projections it replaces."""
    views = {}
    for kind in ("weight", "bias"):
        tensor = getattr(fused, kind)
        if tensor is not None:
            views.update({f"{name}.{kind}": part for name, part in zip(names, tensor.split(widths))})
    return views


# Rows decoding together read the cache in whole blocks of this many slots, masked past each row's length (the
# engine): the mask's and the keys' widths change once every 64 steps instead of at every step, which a compiled step
# would otherwise meet as a new layout.
KEY_BLOCK = 64


def whole_key_blocks(slots: int) -> int:
    """`slots` rounded up to whole KEY_BLOCKs."""
    return -(-slots // KEY_BLOCK) * KEY_BLOCK


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per sequence over the cache.

    q (B, 1, H, D); keys, values (B, KV, capacity, D), of which the first `length` slots count; mask (B, 1, 1, length)
    or None -> (B, 1, H * D). The H / KV query heads that share a kv head are the query rows of one attention over
    that head's keys: SDPA's fused kernel with nothing repeated. On the CPU, given as H heads of one query with
    `enable_gqa`, SDPA runs ~10x slower at 1.5k keys; two matmuls with the softmax between them (the form before
    this one) measured 1.1-4.4x slower in 15 of 16 cases of benchmarks/bench_decode_attention.py (BENCHMARKS.md).
    """
    b, _, heads, dim = q.shape
    kv_heads = keys.shape[1]
    # query head i uses kv head i // (H / KV): (B, 1, H, D) -> (B, KV, H / KV, D)
    q = q.view(b, kv_heads, heads // kv_heads, dim)
    # A slice of exactly `length` slots: padded to a longer span with a mask, the kernel's sums would change order
    # with the span (different floats for the same sequence in caches of different sizes).
    out = F.scaled_dot_product_attention(q, keys[:, :, :length], values[:, :, :length], attn_mask=mask)
    # reshape, not view: CUDA's flash and memory-efficient kernels return (B, KV, H / KV, D) whose memory is laid out
    # (B, H / KV, KV, D) (a view failed on an H200 in float32)
    return out.reshape(b, 1, heads * dim)


def write_kv(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, start: int) -> None:
    """Stores k, v (B, KV, T, D) at slots start .. start + T of one layer of the cache, in place."""
    t = k.shape[2]
    keys[layer, :, :, start : start + t] = k
    values[layer, :, :, start : start + t] = v


def write_kv_rows(keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                  slots: torch.Tensor) -> None:
    """Stores one token per row, k, v (B, KV, 1, D), row b's at slot slots[b] of one layer of the cache, in place."""
    rows = torch.arange(k.shape[0], device=k.device)
    keys[layer, rows, :, slots] = k[:, :, 0]
    values[layer, rows, :, slots] = v[:, :, 0]


# The same writes as operators that torch.compile keeps opaque: traced as plain indexing, a write into a graph input
# became a copy of the layer's whole cache every step (inductor did not reinplace it), which made compiled decoding
# on the CPU slower than eager. Declared through torch.library's low-level API, whose call costs what the indexing
# does (the @custom_op decorator adds ~20 us a call).
_library = torch.library.Library("llava_next", "DEF")
_library.define("write_kv(Tensor(a!) keys, Tensor(b!) values, Tensor k, Tensor v, int layer, SymInt start) -> ()")
_library.impl("write_kv", write_kv, "CompositeExplicitAutograd")
_library.define("write_kv_rows(Tensor(a!) keys, Tensor(b!) values, Tensor k, Tensor v, int layer, Tensor slots) -> ()")
_library.impl("write_kv_rows", write_kv_rows, "CompositeExplicitAutograd")


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, fused: bool = False):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.widths = [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim]
        self.fused = fused
        if fused:  # one matmul instead of three: the input is read once (checkpoint names stay q/k/v_proj)
            self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.widths), bias=cfg.qkv_bias)
        else:
            self.q_proj = nn.Linear(cfg.hidden_size, self.widths[0], bias=cfg.qkv_bias)
            self.k_proj = nn.Linear(cfg.hidden_size, self.widths[1], bias=cfg.qkv_bias)
            self.v_proj = nn.Linear(cfg.hidden_size, self.widths[2], bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        """Checkpoint name (within this module) -> the tensor holding it: row blocks of qkv_proj when fused."""
        return fused_views(self.qkv_proj, ("q_proj", "k_proj", "v_proj"), self.widths) if self.fused else {}

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, C) -> q (B, T, H, D), k and v (B, T, KV, D), q and k rotated."""
        b, t, _ = x.shape
        if self.fused:
            # Rotate q and k together, in their (B, T, heads, D) layout: one rope for all of their heads.
            qkv = self.qkv_proj(x)
            qk_width = self.widths[0] + self.widths[1]
            qk = apply_rope(qkv[..., :qk_width].view(b, t, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
            return q, k, qkv[..., qk_width:].view(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim), cos, sin)
        return q, k, self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int | torch.Tensor,
                is_causal: bool = False, queries: int = 0) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), or with `queries` the outputs of the last `queries` positions only: every
        position's keys and values are still computed and stored."""
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, T, D), the cache's layout
        if isinstance(start, torch.Tensor):  # one query per row, each written at its own slot (its length)
            if x.device.type == "cpu":
                torch.ops.llava_next.write_kv_rows(cache.keys, cache.values, k, v, self.layer, start)
            else:  # traced as plain indexing into the static KV space of CUDA graphs, the form measured on a GPU
                write_kv_rows(cache.keys, cache.values, k, v, self.layer, start)
            # the cache may be the whole KV space (static shapes): this batch's rows only
            keys, values, length = cache.keys[self.layer, :b], cache.values[self.layer, :b], mask.shape[-1]
        elif cache is not None:
            torch.ops.llava_next.write_kv(cache.keys, cache.values, k, v, self.layer, start)
            keys, values, length = cache.keys[self.layer], cache.values[self.layer], start + t
        else:
            keys, values, length = k, v, t
        if queries:
            q, t = q[:, -queries:], queries
            if mask is not None:
                mask = mask[:, :, -queries:]
            elif is_causal and queries > 1:  # causal from the bottom right: SDPA's is_causal aligns the top left
                mask = torch.ones(queries, length, dtype=torch.bool, device=q.device).tril(length - queries)
            is_causal = False  # (one last query sees every key)
        if t == 1:
            return self.o_proj(decode_attention(q, keys, values, length, mask))
        # Grouped-query attention: each kv head serves num_heads / num_kv_heads query heads, without copying.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, :length], values[:, :, :length],
                                             attn_mask=mask, is_causal=is_causal,
                                             enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig, fused: bool = False):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.fused = fused
        if fused:
            self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        else:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
            self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        if not self.fused:
            return {}
        return fused_views(self.gate_up_proj, ("gate_proj", "up_proj"), [self.intermediate_size] * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int, fused: bool = False):
        super().__init__()
        self.window = cfg.layer_window(layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer, fused)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, fused)

    def forward(self, x, cos, sin, masks, cache, start, is_causal=False, queries: int = 0) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, masks[self.window], cache, start, is_causal,
                                  queries)
        x = (x[:, -queries:] if queries else x) + attended
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: TextConfig, fused: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, fused) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # (a meta-device model computes it on the CPU, for the reason `embedding` gives; reset_rope moves it)
        device = "cpu" if torch.get_default_device().type == "meta" else None
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg.rope, cfg.head_dim, device), persistent=False)
        self.gradient_checkpointing = False

    def reset_rope(self) -> None:
        """Recompute the rotary table in float32 (after building on the meta device, or a cast to half precision)."""
        self.inv_freq = rope_inverse_frequencies(self.cfg.rope, self.cfg.head_dim).to(self.embed_tokens.weight.device)

    def checkpoint_views(self) -> dict[str, torch.Tensor]:
        """Checkpoint names of fused projections (q/k/v_proj, gate/up_proj) -> views into the fused weights."""
        views = {}
        for i, layer in enumerate(self.layers):
            for part in ("self_attn", "mlp"):
                for name, view in getattr(layer, part).checkpoint_views().items():
                    views[f"layers.{i}.{part}.{name}"] = view
        return views

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos and signed sin (B, T, 1, D) for `apply_rope`: the reference's tables, computed
        in float32 and then cast as it does, with the first half of sin negated."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.cfg.rope_table_dtype is not None:  # rounded as the original LLaVA code's tables are (TextConfig)
            table_dtype = getattr(torch, self.cfg.rope_table_dtype)
            cos, sin = cos.to(table_dtype).float(), sin.to(table_dtype).float()
        half = freqs.shape[-1]
        sign = torch.ones(2 * half, device=emb.device)
        sign[:half] = -1
        return cos.to(dtype)[:, :, None], (sin * sign).to(dtype)[:, :, None]

    def attention_masks(self, positions_in_cache: torch.Tensor, key_mask: torch.Tensor) -> dict:
        """Boolean masks (B, 1, T, S), True where a query may attend, one per distinct window size.

        `positions_in_cache` (T,) are the slots the queries occupy; `key_mask` (B, S) is False for padding slots.
        """
        keys = torch.arange(key_mask.shape[1], device=key_mask.device)
        distance = positions_in_cache[:, None] - keys[None, :]  # (T, S)
        masks = {}
        for window in {layer.window for layer in self.layers}:
            allowed = distance >= 0
            if window is not None:
                allowed = allowed & (distance < window)
            mask = allowed[None, None] & key_mask[:, None, None, :]
            # A query row with no visible key (a padding query) would give NaN; let it see itself instead.
            masks[window] = mask | (~mask.any(-1, keepdim=True) & (distance == 0)[None, None])
        return masks

    def row_masks(self, slots: torch.Tensor, key_mask: torch.Tensor) -> dict:
        """Masks (B, 1, 1, S) for one query per row at cache slot slots[b], one per distinct window size."""
        distance = slots[:, None] - torch.arange(key_mask.shape[1], device=key_mask.device)[None]  # (B, S)
        masks = {}
        for window in {layer.window for layer in self.layers}:
            allowed = key_mask & (distance >= 0)
            if window is not None:
                allowed = allowed & (distance < window)
            masks[window] = allowed[:, None, None, :]
        return masks

    def forward(
        self,
        embeds: torch.Tensor,  # (B, T, C)
        positions: torch.Tensor,  # (B, T) rotary positions
        key_mask: torch.Tensor | None,  # (B, S) with S = start + T: which cache slots hold real tokens; None: all
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,  # cache slot of the first query; (B,): each row's slot of its one query
        outputs: int = 0,  # the last positions whose hidden states are wanted (0: all)
    ) -> torch.Tensor:  # hidden states after the final norm: (B, T, C); (B, outputs, C) when 0 < outputs < T
        t = embeds.shape[1]
        cos, sin = self.rope_tables(positions, embeds.dtype)
        windows = {layer.window for layer in self.layers}
        if isinstance(start, torch.Tensor):
            # Rows of different lengths decoding together: row b's query sits at slot start[b] and sees the
            # slots before it; key_mask (B, S) spans the longest row.
            masks = self.row_masks(start, key_mask)
            x = embeds
            for layer in self.layers:
                x = layer(x, cos, sin, masks, cache, start)
            return self.norm(x)
        # Without padding, and with every window wider than the keys, attention needs no mask tensor: a prompt is
        # plain causal attention (SDPA's fast kernels), a single decoding query sees every key.
        unmasked = key_mask is None and all(w is None or w >= start + t for w in windows) and (start == 0 or t == 1)
        if unmasked:
            masks, is_causal = dict.fromkeys(windows), t > 1
        else:
            if key_mask is None:
                key_mask = torch.ones((embeds.shape[0], start + t), dtype=torch.bool, device=embeds.device)
            slots = torch.arange(start, start + t, device=embeds.device)
            masks, is_causal = self.attention_masks(slots, key_mask), False
        x = embeds
        for i, layer in enumerate(self.layers):
            # The last layer's attention output and MLP are needed at the wanted positions only (a prompt's last
            # token, for its first generated one), work transformers does and then drops: 7-15% of the float32
            # answer latency on the medium preset (12 layers), ~3% in bfloat16 (BENCHMARKS.md). Its keys and values
            # are stored for every position as before.
            queries = outputs if i == len(self.layers) - 1 and 0 < outputs < t else 0
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, masks, cache, start, is_causal, queries,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks, cache, start, is_causal, queries)
        return self.norm(x)
