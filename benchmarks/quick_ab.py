"""A quick A/B of two checkouts on the medium preset: answer latency (best of 2 after a warm-up) and decode
tokens/s (32 greedy tokens, timed inside generation). Run it once per checkout, alternating:

    PYTHONPATH=/path/to/old-checkout python benchmarks/quick_ab.py int8
    python benchmarks/quick_ab.py int8

Coarser than bench_generate.py (no transformers, one process per figure): for a first look, not for the tables.
"""

import sys
import time

import numpy as np
from PIL import Image

import llava_next

mode = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
cache = sys.argv[2] if len(sys.argv) > 2 else "/tmp/llava-next-bench/medium"
pipe = llava_next.load(cache, dtype="bfloat16", progress=False, quantize=None if mode == "bfloat16" else mode,
                       image_cache_bytes=0, prefix_cache=False)
image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (316, 500, 3), dtype=np.uint8))
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
pipe.generate(messages, [image], max_new_tokens=2)
firsts = []
for _ in range(2):
    start = time.perf_counter()
    pipe.generate(messages, [image], max_new_tokens=1)
    firsts.append(time.perf_counter() - start)
pipe.engine.eos_token_ids = []
answer = pipe.generate(messages, [image], max_new_tokens=33)
print(f"{llava_next.__file__} {mode}: answer latency {min(firsts):.3f} s, decode {32 / answer.decode_seconds:.1f} tok/s")
