"""Compiled decoding (`compile=True`, `--compile`) against the eager step, in one process on the same model.

bench_generate.py runs each mode in its own process, so on a shared machine two modes' figures also differ by
whatever else ran between them. Here one pipeline is loaded with compile=True and the engine's decoding step is
switched between the compiled and the eager model from one generation to the next (same weights, same KV space,
same inputs), rounds interleaved: the ratio is the compiler's alone. Two decodings per mode:

  one row     one image question, its answer decoded (the medium preset: ~1.5k tokens in the cache)
  two rows    two image questions of different lengths decoded together (each row at its own slot: the masked
              form a server runs)

Each figure is the median over the rounds of decoding tokens/s (two rows: steps/s, each step a token per row);
compile s is the first generation's time, compiling included, with inductor's on-disk cache as found.

int8 also times the compiled step with the int8 weights in the plain layout (PyTorch's kernel inside the graph)
beside the column blocks (the "compiled" column), and prints the layout the engine chose for itself by timing its
layers (engine.INT8_LAYOUT, "measure"): which of the two is faster depends on the processor. (w8a8's weights stay
plain: its steps multiply int8 rows with torch._int_mm.)

    python benchmarks/bench_compile.py --preset medium
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUESTION, image, messages  # noqa: E402
from checkpoints import build_checkpoint  # noqa: E402

SECOND_QUESTION = "What colours and shapes are in this picture, from the left to the right, in detail?"


def decode_rates(pipe, prompts, images, new_tokens: int) -> float:
    """Decoding tokens/s of one generation; with several rows, steps/s once the last row is prefilled (generate
    prefills every prompt before the first step, so the shortest decode_seconds is the time they decode together)."""
    gens = pipe.generate(prompts, images, max_new_tokens=new_tokens + 1)
    gens = gens if isinstance(gens, list) else [gens]
    return new_tokens / min(g.decode_seconds for g in gens)


def run_mode(directory: Path, mode: str, args) -> dict:
    import llava_next
    from llava_next.engine import lay_out_int8_weights

    quantize = mode if mode in ("int8", "int4", "w8a8") else None
    pipe = llava_next.load(directory, dtype="bfloat16" if quantize else mode, progress=False, quantize=quantize,
                           compile=True, image_cache_bytes=0, prefix_cache=False)
    pipe.engine.eos_token_ids = []  # decode exactly the tokens asked for
    one = (messages(QUESTION), [image()])
    second_image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (420, 300, 3), dtype=np.uint8))
    two = ([messages(QUESTION), messages(SECOND_QUESTION)], [[image()], [second_image]])
    engine_blocks, layout_seconds = pipe.engine.int8_blocks, pipe.engine.int8_layout_seconds
    start = time.perf_counter()
    decode_rates(pipe, *one, 2)
    compile_s = time.perf_counter() - start
    decode_rates(pipe, *two, 2)  # the masked form is a second graph
    compiled = pipe.engine.decode_step
    if compiled is pipe.model:
        raise SystemExit("torch.compile fell back to eager decoding (no C++ compiler?): nothing to compare")
    # (step, its decoding function, whether the int8 weights are in column blocks): each step on the int8 layout it
    # runs with, column blocks compiled and PyTorch's kernel's layout eagerly; int8 also times the compiled step
    # on the plain layout (PyTorch's kernel inside the graph, what a server's many-row steps run), since which of the
    # two is faster depends on the processor
    steps = [("eager", pipe.model, False), ("compiled", compiled, True)]
    if quantize == "int8":
        steps.append(("compiled, plain", compiled, False))
        for blocked in (True, False):  # each layout's graphs compiled before the rounds, whichever the engine chose
            lay_out_int8_weights(pipe.model, blocked=blocked)
            decode_rates(pipe, *one, 2)
            decode_rates(pipe, *two, 2)
    rates = {(form, step): [] for form in ("one row", "two rows") for step, _, _ in steps}
    for _ in range(args.rounds):
        for step, decode_step, blocked in steps:
            pipe.engine.decode_step = decode_step
            lay_out_int8_weights(pipe.model, blocked=blocked)
            rates["one row", step].append(decode_rates(pipe, *one, args.new_tokens))
            rates["two rows", step].append(decode_rates(pipe, *two, args.new_tokens))
    result = {"compile_s": compile_s}
    if quantize == "int8":  # the layout the engine chose for its compiled steps, and its timings
        result["engine's int8 layout"] = "column blocks" if engine_blocks else "plain"
        result["engine's int8 layout timings (ms)"] = {k: round(v * 1e3, 2) for k, v in layout_seconds.items()}
    for (form, step), values in rates.items():
        result[f"{form}: {step}"] = statistics.median(values)
        result[f"{form}: {step} (all)"] = [round(v, 1) for v in values]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--modes", default="bfloat16,int8,int4,w8a8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache", default="/tmp/llava-next-bench")
    args = parser.parse_args()
    directory = build_checkpoint(Path(args.cache), args.preset)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(directory, mode, args)
        print(mode, json.dumps(results[mode]), flush=True)
    print("\n| mode | compile (s) | one row: eager | compiled | ratio | compiled, plain int8 | two rows: eager | "
          "compiled | ratio | compiled, plain int8 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, r in results.items():
        cells = [f"{r['compile_s']:.0f}"]
        for form in ("one row", "two rows"):
            eager, compiled = r[f"{form}: eager"], r[f"{form}: compiled"]
            plain = r.get(f"{form}: compiled, plain")
            cells += [f"{eager:.1f}", f"{compiled:.1f}", f"{compiled / eager:.2f}x",
                      "" if plain is None else f"{plain:.1f}"]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    print(f"\n(tokens/s, two rows: steps/s; median of {args.rounds} interleaved rounds, {args.new_tokens} new tokens)")


if __name__ == "__main__":
    main()
