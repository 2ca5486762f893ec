"""One decoding step's attention, one layer: `llava_next.model.decoder.decode_attention` over a KV cache that grows by
one key per call, as it does while decoding (a fixed length would time a warm kernel cache no step sees).

Shapes of the medium and mistral-7b presets' decoders (kv heads, query heads, head dim) at a few cache lengths, in
bfloat16 and float32; microseconds per call, the median of --rounds runs. It imports whatever llava_next is on
the path, so the same command times another commit's implementation:

    python benchmarks/bench_decode_attention.py
    PYTHONPATH=<checkout of another commit> python benchmarks/bench_decode_attention.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from llava_next.model.decoder import decode_attention

SHAPES = {"medium": (4, 16, 64), "mistral-7b": (8, 32, 128)}  # kv heads, query heads, head dim


def time_growing(dtype: torch.dtype, kv_heads: int, heads: int, dim: int, first: int, calls: int) -> float:
    """Microseconds per call over `calls` calls, the cache length growing from `first` by one each call."""
    keys = torch.randn(1, kv_heads, first + calls + 1, dim).to(dtype)
    values = torch.randn(1, kv_heads, first + calls + 1, dim).to(dtype)
    q = torch.randn(1, 1, heads, dim).to(dtype)
    with torch.inference_mode():
        start = time.perf_counter()
        for length in range(first, first + calls):
            decode_attention(q, keys, values, length, None)
        return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="60,1500", help="cache lengths the growing runs start at")
    parser.add_argument("--calls", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        for preset, (kv_heads, heads, dim) in SHAPES.items():
            for first in map(int, args.lengths.split(",")):
                key = f"{str(dtype).removeprefix('torch.')} {preset} {first} keys"
                time_growing(dtype, kv_heads, heads, dim, first, 20)  # warm-up
                times = [time_growing(dtype, kv_heads, heads, dim, first + r * args.calls, args.calls)
                         for r in range(args.rounds)]
                results[key] = statistics.median(times)
                print(f"{key:36} {results[key]:8.0f} us", flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "us_per_call": results}))


if __name__ == "__main__":
    main()
