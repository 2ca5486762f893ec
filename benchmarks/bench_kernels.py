"""What bounds a decoding step on the CPU: each matmul kernel streaming one token through a preset's decoder weights.

A decoding step multiplies one row by every decoder matrix and the lm_head. This times exactly that, kernel by
kernel, on random weights of a preset's shapes (benchmarks/checkpoints.py), cycling through all layers so that the
weights come from memory as in a real step, not from the cache. Per kernel: milliseconds per token for the matmuls
alone (no attention, norms or Python around them) and the weight bytes read per second, beside the machine's read
bandwidth. Kernels, each at its mode's bytes per weight:

  bfloat16        oneDNN on the weight reordered into its blocked layout (what `FastLinear` runs where the engine
                  measured the blocked layout faster, as on an AMD EPYC)
  bfloat16 plain  torch.mv on the weight as loaded (what it runs where the plain layout measured faster, as on an
                  Intel Xeon with AMX)
  int8            torch._weight_int8pack_mm: int8 weights, bfloat16 row (the int8 mode)
  int8 x int8     torch._int_mm on an int8 row (what w8a8 runs to decode, as its prompts do)
  int4            torch._weight_int4pack_mm_for_cpu, groups of 128 (the int4 mode)
  int8 blocks     the int8 weights in column blocks through inductor's loop (llava_next.quantize.
                  blocked_int8_matmul, what a compiled CPU step runs; one compiled graph over all the matrices)

`--step-rows` times the int8 layers' forms at several rows (a decoding step of many requests; a prompt at ~1.5k):
plain (PyTorch's kernel up to 64 rows, dequantized above), in column blocks compiled, in column blocks eagerly
(dequantized), and w8a8's integer form (torch._int_mm on rows quantized to int8); what sets quantize.BLOCKED_ROWS and
DECODE_ROWS, and what the blocks cost a prompt.

`--prompt-rows` adds what a prompt's matmul costs on the preset's gate/up matrix at those row counts: the
package's int8 and int4 layers (`llava_next.quantize`, as they run: weight-only kernels up to a few rows, int4's
kernel up to INT4_KERNEL_ROWS, above that the weights dequantized a slice at a time), the int4 kernel alone,
bfloat16 as the floor, and the w8a8 layer (torch._int_mm on int8 rows).

    python benchmarks/bench_kernels.py --preset medium
    python benchmarks/bench_kernels.py --preset medium --step-rows 1,2,4,6,8,16,1512
    python benchmarks/bench_kernels.py --preset mistral-7b --layers 8   # 8 of its 32 layers: 1.6 GB in bf16
    python benchmarks/bench_kernels.py --preset mistral-7b --layers 0 --prompt-rows 16,64,256,512,1512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import memory_bandwidth_gb_s  # noqa: E402
from checkpoints import PRESETS, VOCAB_SIZE  # noqa: E402


def decoder_shapes(preset: str) -> tuple[list[tuple[int, int]], tuple[int, int], int]:
    """(out, in) of one layer's fused matrices (qkv, o, gate/up, down), the lm_head's, and the layer count."""
    text = PRESETS[preset]["text"]
    width, inner = text["hidden_size"], text["intermediate_size"]
    head_dim = width // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head_dim
    layer = [(width + 2 * kv, width), (width, width), (2 * inner, width), (width, inner)]
    return layer, (VOCAB_SIZE, width), text["num_hidden_layers"]


def kernels(matrices: list[tuple[int, int]]) -> dict:
    """{kernel: (a function running one token through every matrix, bytes of weights it reads)}."""
    generator = torch.Generator().manual_seed(0)
    rows = {k: torch.randn(1, k, generator=generator).bfloat16() for _, k in matrices}
    int8_rows = {k: torch.randint(-127, 128, (1, k), dtype=torch.int8, generator=generator) for _, k in matrices}
    bf16_plain = [torch.randn(n, k, generator=generator).bfloat16() for n, k in matrices]
    bf16 = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in bf16_plain]
    int8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator), torch.rand(n).bfloat16())
            for n, k in matrices]
    int4 = [(torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32,
                                                                     generator=generator), 1),
             torch.rand(k // 128, n, 2).bfloat16()) for n, k in matrices]
    weights = sum(n * k for n, k in matrices)

    def run_bf16():
        for w, (_, k) in zip(bf16, matrices):
            torch.ops.mkldnn._linear_pointwise(rows[k], w, None, "none", [], "")

    def run_bf16_plain():
        for w, (_, k) in zip(bf16_plain, matrices):
            torch.mv(w, rows[k][0])

    def run_int8():
        for (w, s), (_, k) in zip(int8, matrices):
            torch._weight_int8pack_mm(rows[k], w, s)

    def run_int8_int8():
        for (w, _), (_, k) in zip(int8, matrices):
            torch._int_mm(int8_rows[k], w.t())

    def run_int4():
        for (w, sz), (_, k) in zip(int4, matrices):
            torch._weight_int4pack_mm_for_cpu(rows[k], w, 128, sz)

    run_int8_blocks = int8_forms(matrices, int8, rows)["column blocks, compiled"]
    return {"bfloat16": (run_bf16, 2 * weights), "bfloat16 plain": (run_bf16_plain, 2 * weights),
            "int8": (run_int8, weights),
            "int8 x int8": (run_int8_int8, weights), "int4": (run_int4, weights // 2),
            "int8 blocks": (run_int8_blocks, weights)}


def int8_forms(matrices: list[tuple[int, int]], int8: list[tuple[torch.Tensor, torch.Tensor]],
               rows: dict[int, torch.Tensor]) -> dict:
    """{form: a function multiplying `rows` (by input width) by every int8 matrix}, as the package's int8 layers run
    them: plain (PyTorch's kernel up to INT8_KERNEL_ROWS rows, dequantized a slice at a time above), in column blocks
    through one compiled graph (blocked_int8_matmul, whatever the rows; left out above INT8_KERNEL_ROWS, a pass over
    the weights per row), in column blocks eagerly (dequantized a slice at a time), and as w8a8's integer form
    (W8A8Linear.int8_rows_matmul: each row quantized, torch._int_mm), which w8a8 runs for one row where the engine
    measures it faster and for more than DECODE_ROWS."""
    from llava_next.quantize import INT8_KERNEL_ROWS, Int8Linear, W8A8Linear, blocked_int8_matmul

    plain, blocked, w8a8 = [], [], []
    for (n, k), (w, s) in zip(matrices, int8):
        for layers, kind in ((plain, Int8Linear), (blocked, Int8Linear), (w8a8, W8A8Linear)):
            layer = kind(k, n, False, torch.bfloat16, "meta")
            layer.weight, layer.scales = w, s
            layers.append(layer)
        blocked[-1].block_columns()
    forms = {"int8 layer": lambda: [layer(rows[layer.in_features]) for layer in plain],
             "column blocks, compiled": torch.compile(
                 lambda: [blocked_int8_matmul(rows[layer.in_features], layer.weight, layer.scales) for layer in blocked],
                 dynamic=True),
             "column blocks, eager": lambda: [layer(rows[layer.in_features]) for layer in blocked],
             "int8 rows, _int_mm": lambda: [layer.int8_rows_matmul(rows[layer.in_features]) for layer in w8a8]}
    if next(iter(rows.values())).shape[0] > INT8_KERNEL_ROWS:
        del forms["column blocks, compiled"]
    return forms


def step_matmuls(matrices: list[tuple[int, int]], row_counts: list[int], repeats: int) -> dict:
    """Milliseconds of a decoding step's int8 matmuls at each row count, per form."""
    generator = torch.Generator().manual_seed(0)
    int8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator), torch.rand(n).bfloat16())
            for n, k in matrices]
    results = {}
    with torch.inference_mode():
        for count in row_counts:
            rows = {k: torch.randn(count, k, generator=generator).bfloat16() for _, k in matrices}
            forms = int8_forms(matrices, int8, rows)
            results[count] = {name: median_seconds(fn, repeats) * 1e3 for name, fn in forms.items()}
            print(f"  {count:3d} rows  " + "  ".join(f"{name} {ms:7.1f} ms" for name, ms in results[count].items()))
    return results


def prompt_matmuls(preset: str, row_counts: list[int], repeats: int) -> dict:
    """Milliseconds of one prompt-sized matmul on the preset's gate/up matrix, per row count and form."""
    from torch import nn

    from llava_next.quantize import Int4Linear, Int8Linear, W8A8Linear

    layer, _, _ = decoder_shapes(preset)
    out_features, in_features = layer[2]
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=False).bfloat16()
    int8, int4 = Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 128)
    w8a8 = W8A8Linear.from_linear(linear)
    results = {}
    with torch.inference_mode():
        for rows in row_counts:
            x = torch.randn(rows, in_features).bfloat16()
            forms = {"bfloat16": lambda: linear(x), "int8 layer": lambda: int8(x), "int4 layer": lambda: int4(x),
                     "int4 kernel": lambda: torch._weight_int4pack_mm_for_cpu(x, int4.packed, 128,
                                                                             int4.scales_and_zeros),
                     "w8a8 layer": lambda: w8a8(x)}
            results[rows] = {name: median_seconds(fn, repeats) * 1e3 for name, fn in forms.items()}
            print(f"  {rows:5d} rows  " + "  ".join(f"{name} {ms:8.1f} ms" for name, ms in results[rows].items()))
    return results


def median_seconds(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="medium")
    parser.add_argument("--layers", type=int, help="decoder layers to run (default: all of the preset's)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--step-rows", help="also time the int8 forms at decoding steps of these rows, e.g. 1,2,4,8")
    parser.add_argument("--prompt-rows", help="also time prompt-sized matmuls at these row counts, e.g. 16,256,1512")
    args = parser.parse_args()
    layer, head, count = decoder_shapes(args.preset)
    count = count if args.layers is None else args.layers
    matrices = layer * count + [head]
    bandwidth = memory_bandwidth_gb_s("cpu")
    print(f"{args.preset}: {count} layers + lm_head, one token, {torch.get_num_threads()} threads; "
          f"memory read bandwidth {bandwidth:.1f} GB/s")
    results = {}
    for name, (fn, nbytes) in (kernels(matrices).items() if count else ()):
        seconds = median_seconds(fn, args.repeats)
        results[name] = {"ms_per_token": seconds * 1e3, "gb_s": nbytes / seconds / 1e9, "mib": nbytes / 2**20}
        print(f"  {name:14s} {seconds * 1e3:8.2f} ms/token  {nbytes / seconds / 1e9:6.1f} GB/s "
              f"({100 * nbytes / seconds / 1e9 / bandwidth:.0f}% of the bandwidth)  {nbytes / 2**20:8.0f} MiB")
    prompts = {}
    if args.prompt_rows:
        print(f"a prompt's matmul on the {'x'.join(map(str, decoder_shapes(args.preset)[0][2]))} gate/up matrix "
              f"(median of {max(3, args.repeats // 5)}):")
        prompts = prompt_matmuls(args.preset, [int(r) for r in args.prompt_rows.split(",")], max(3, args.repeats // 5))
    steps = {}
    if args.step_rows and count:
        print(f"a decoding step's int8 matmuls at several rows (median of {max(3, args.repeats // 3)}):")
        steps = step_matmuls(matrices, [int(r) for r in args.step_rows.split(",")], max(3, args.repeats // 3))
    print(json.dumps({"preset": args.preset, "layers": count, "bandwidth_gb_s": bandwidth, "results": results,
                      "step_matmul_ms": steps, "prompt_matmul_ms": prompts}))


if __name__ == "__main__":
    main()
