"""How long `llava-next serve` takes to be ready, and how long its first requests then take.

The server's own start (`ServerState.load()`: the model loaded, the KV space sized, and with `--compile` the decoding
step compiled and warmed up) is timed to the moment it would answer /health with 200. Then groups of greedy text
requests are submitted to its engine one group at a time, each group's time to its last token printed: one row, two
rows at different lengths, two at one length, three rows, one row again, and a prompt long enough for keys masked past
several blocks. With `--compile`, a group that meets a form of the decoding step not compiled yet waits for the
compiler; the same group run again does not. No HTTP: the engine as the server drives it, on a preset's random
checkpoint (benchmarks/checkpoints.py). The last line printed is JSON.

    python benchmarks/bench_serve_start.py --preset medium --quantize int4 --compile
    python benchmarks/bench_serve_start.py --preset medium --quantize int8 --compile --max-concurrent 8 --kv-memory 1GiB
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import build_checkpoint  # noqa: E402

GROUPS = [["Hi."], ["Hi.", "Hello there, how are you today?"], ["Hi.", "Hi."],
          ["Hi.", "Hello there, how are you today?", "A"], ["B"], ["a" * 300, "b"]]


def main() -> None:
    parser = argparse.ArgumentParser(description="Time a server's start and its first requests.")
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--cache", default="/tmp/llava-next-bench", help="where preset checkpoints are built")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8", "int4", "w8a8"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--max-concurrent", type=int, default=4)
    parser.add_argument("--kv-memory", default="512MiB")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    from llava_next.engine import Sequence
    from llava_next.prompt import IncrementalDetokenizer
    from llava_next.sampling_params import SamplingParams
    from llava_next.serve.app import ServeSettings, ServerState, parse_bytes

    directory = build_checkpoint(Path(args.cache), args.preset)
    state = ServerState(ServeSettings(model=str(directory), dtype=args.dtype, quantize=args.quantize,
                                      compile=args.compile, max_concurrent=args.max_concurrent,
                                      kv_memory=parse_bytes(args.kv_memory)))
    began = time.perf_counter()
    state.load()
    ready = time.perf_counter() - began
    if state.failure:
        raise SystemExit(f"the server did not start: {state.failure}")
    print(f"ready in {ready:.2f} s")
    tokenizer = state.pipe.processor.tokenizer
    groups = []
    try:
        for texts in GROUPS:
            seqs = [Sequence(tokenizer.encode(text), SamplingParams(max_new_tokens=args.new_tokens),
                             IncrementalDetokenizer(tokenizer)) for text in texts]
            began = time.perf_counter()
            state.engine.submit(seqs)
            while not all(seq.done for seq in seqs):
                time.sleep(0.005)
            seconds = time.perf_counter() - began
            groups.append({"prompt_tokens": [seq.prompt_tokens for seq in seqs], "seconds": seconds})
            print(f"{len(texts)} request(s), prompt tokens {groups[-1]['prompt_tokens']}: {seconds:.2f} s")
    finally:
        state.engine.shutdown()
    print(json.dumps({"preset": args.preset, "dtype": args.dtype, "quantize": args.quantize, "compile": args.compile,
                      "max_concurrent": args.max_concurrent, "kv_memory": args.kv_memory, "ready_s": ready,
                      "groups": groups}))


if __name__ == "__main__":
    main()
