"""The two forms of a compiled int8 decoding step on a GPU, at several rows: what sets quantize.CUDA_SUMMED_ROWS.

A compiled CUDA step multiplies its rows by the int8 weights in one of two forms (llava_next.quantize.Int8Linear):

  summed       summed_int8_matmul: a float32 sum along each int8 weight row, which inductor fuses with the int8
               conversion; it reads every weight byte once per row (CUDA_SUMMED_ROWS rows or fewer)
  16-bit copy  copied_int8_matmul: F.linear on the weights converted to the rows' dtype, scaled; compiled, inductor
               writes the 16-bit copy and the matmul reads it back, 5 bytes moved per weight whatever the rows (more
               rows)

The bound of 4 rows was reasoned from those bytes, not measured. This times both forms, compiled as the engine
compiles a step (dynamic shapes; CUDA graphs on a GPU), over a preset's decoder matrices and lm_head (random int8
weights of their shapes, cycled through so that they come from memory), and prints milliseconds per step and the
int8 bytes read per second. `--coordinate-descent` adds both forms compiled with inductor's coordinate descent
tuning, which the engine does not enable (it may tune the sum's reduction; untried). Before timing, each form's
output is checked against the dequantized weights.

    python benchmarks/bench_int8_step.py --device cuda --rows 1,2,3,4,6,8 --coordinate-descent
    python benchmarks/bench_int8_step.py --device cpu --preset small --layers 1 --rows 1,2   # the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_generate import memory_bandwidth_gb_s  # noqa: E402
from bench_kernels import decoder_shapes, median_seconds  # noqa: E402


def compiled_step(form, weights: list[tuple[torch.Tensor, torch.Tensor]], device: str, coordinate_descent: bool):
    """One compiled graph multiplying each input row block by every matrix, as a compiled decoding step does."""
    options = {"coordinate_descent_tuning": True} if coordinate_descent else {}
    if device == "cuda":
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" (the engine's) turns on

    def step(rows: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [form(rows[w.shape[1]], w, s) for w, s in weights]

    return torch.compile(step, dynamic=True, options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (and the lm_head) to run")
    parser.add_argument("--rows", default="1,2,3,4,6,8")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--coordinate-descent", action="store_true")
    args = parser.parse_args()
    from llava_next.quantize import copied_int8_matmul, summed_int8_matmul

    dtype = getattr(torch, args.dtype)
    layer, head, _ = decoder_shapes(args.preset)
    matrices = layer * args.layers + [head]
    generator = torch.Generator().manual_seed(0)
    weights = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator).to(args.device),
                (torch.rand(n, generator=generator) / 100).to(dtype).to(args.device)) for n, k in matrices]
    int8_bytes = sum(n * k for n, k in matrices)
    bandwidth = memory_bandwidth_gb_s(args.device)
    print(f"{args.preset}: {args.layers} layers + lm_head, {int8_bytes / 2**20:.0f} MiB of int8 weights, "
          f"{args.dtype} rows on {args.device}; memory read bandwidth {bandwidth:.0f} GB/s")
    forms = {"summed": summed_int8_matmul, "16-bit copy": copied_int8_matmul}
    steps = {name: compiled_step(form, weights, args.device, False) for name, form in forms.items()}
    if args.coordinate_descent:
        steps |= {f"{name}, coordinate descent": compiled_step(form, weights, args.device, True)
                  for name, form in forms.items()}
    results = {}
    widths = {k for _, k in matrices}

    def finished(outputs):  # timed to the GPU's end of the work, not its launch
        if args.device == "cuda":
            torch.cuda.synchronize()
        return outputs

    with torch.inference_mode():
        for count in [int(r) for r in args.rows.split(",")]:
            rows = {k: torch.randn(count, k, generator=generator).to(dtype).to(args.device) for k in widths}
            expected = [(rows[w.shape[1]].float() @ (w.float() * s.float()[:, None]).t()) for w, s in weights[:4]]
            results[count] = {}
            for name, step in steps.items():
                outputs = step(rows)[:4]
                for out, want in zip(outputs, expected):  # a wrong form is not timed
                    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
                ms = median_seconds(lambda: finished(step(rows)), args.repeats) * 1e3
                results[count][name] = {"ms": ms, "gb_s": int8_bytes / ms / 1e6}
            print(f"  {count:2d} rows  " + "  ".join(f"{name} {r['ms']:7.3f} ms ({r['gb_s']:5.0f} GB/s)"
                                                    for name, r in results[count].items()), flush=True)
    print(json.dumps({"preset": args.preset, "layers": args.layers, "device": args.device, "dtype": args.dtype,
                      "bandwidth_gb_s": bandwidth, "int8_bytes": int8_bytes, "results": results}))


if __name__ == "__main__":
    main()
