"""Speed and memory of image-question answering: llava_next against transformers, same weights, same inputs.

One question about one 500x316 image (1512 image tokens under the published pinpoints) on a random checkpoint of a
preset (benchmarks/checkpoints.py). Every (implementation, mode) runs in its own process, so that load time and peak
memory are its own, and the runs are interleaved: round 1 runs every configuration once, then round 2, ...; each
figure is the median over the rounds. Per run, after a warm-up answer:

  preprocess_s     processor: chat template, tokenizer, image decoding-free preprocessing (tiles, normalisation)
  first_token_s    answer latency: preprocessing + vision tower + prompt prefill + the first token
  decode_tok_s     greedy tokens per second after the first token, timed inside generation (EOS ignored), so
                   prefill noise never enters it
  decode_gb_s      weight bytes read per decoded token (decoder + lm_head, as stored) x tokens per second
  load_s           load() / from_pretrained until the model is ready (transformers maps the files and reads the
                   pages on first use, during the first answer; we read every byte during load). On a CPU our
                   first two loads on a machine (float32, bfloat16, compiled int8) also time the decoding layers'
                   kernels or layouts (~1 s on medium); later loads, later rounds included, recall the choice
                   (layout_cache.py). On a machine's first run the median of three rounds is then a load that
                   measured: five rounds, or a run before, give a recalled one
  load_peak_mib    peak resident memory during loading, above the process's memory before it
  peak_rss_mib     the process's peak resident memory, loading included
  model_mib        bytes of the model's parameters and buffers

Modes: ours in float32, bfloat16, int8, int4, w8a8 (weight-only int8/int4, int8 weights and activations), each
optionally with `+compile` (the decoding step through torch.compile; CUDA graphs on a GPU);
transformers in float32 and bfloat16 (sdpa attention). `--followup` adds the multi-turn figure: the first token of
a second question about the same image, cold (the whole conversation again, as `generate` with the full history
does) and through a conversation that reuses the image features and the shared prefix's KV cache.

The last line printed is JSON with every number and the ratios against transformers in the same dtype
(transformers' time / ours, ours' tokens/s / theirs: above 1 means we are faster).

    python benchmarks/bench_generate.py --preset medium --rounds 3
    python benchmarks/bench_generate.py --preset mistral-7b --modes bfloat16,int8,int4,w8a8 --reference bfloat16 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import PRESETS, build_checkpoint  # noqa: E402

QUESTION = "What is shown in this image?"
FOLLOWUP = "And what colour is it mostly?"
OUR_MODES = ["float32", "bfloat16", "int8", "int4", "w8a8"]
REFERENCE_MODES = ["float32", "bfloat16"]


def image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (316, 500, 3), dtype=np.uint8))


def messages(*turns: str, answers: tuple[str, ...] = ()) -> list[dict]:
    out = []
    for i, text in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]
        out.append({"role": "user", "content": content})
        if i < len(answers):
            out.append({"role": "assistant", "content": [{"type": "text", "text": answers[i]}]})
    return out


def memory_bandwidth_gb_s(device: str = "cpu", repeats: int = 5) -> float:
    """Read bandwidth of the device's memory as torch sees it: the best of a few sums over 1 GiB."""
    import torch

    x = torch.ones(2**28, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        x.sum().item()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def storage_key(t) -> int:
    """What identifies a tensor's memory: its data pointer, or for a oneDNN blocked tensor (packed bfloat16
    weights, which have no plain storage) the tensor itself."""
    return id(t) if t.is_mkldnn else t.data_ptr()


def held_tensors(model):
    """(name, tensor) for every tensor the model holds: parameters, buffers, and the int4 kernels' layouts (kept
    outside the state, as `packed`). A tensor a step does not read when its kernel layout exists (a CUDA int4 layer
    keeps its nibbles for prompts) comes with read=False."""
    import torch

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        packed = getattr(module, "packed", None)
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            yield prefix + name, t, not (isinstance(packed, torch.Tensor) and name == "weight")
        if isinstance(packed, torch.Tensor):
            yield prefix + "packed", packed, True


def decoder_bytes(model, prefix_decoder: str, prefix_head: str, embed: str) -> int:
    """Bytes of weights one decoding step reads: every decoder tensor and the lm_head, not the embedding table."""
    total, seen = 0, set()
    for name, t, read in held_tensors(model):
        if not (name.startswith(prefix_decoder) or name.startswith(prefix_head)) or embed in name or "inv_freq" in name:
            continue
        if not read or storage_key(t) in seen:
            continue
        seen.add(storage_key(t))
        total += t.numel() * t.element_size()
    return total


def proc_status_mib(field: str) -> float | None:
    """A memory figure of /proc/self/status (Linux), in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def rss_mib() -> float:
    """The process's resident memory now."""
    return proc_status_mib("VmRSS") or 0.0


def peak_rss_mib() -> float:
    """The process's peak resident memory since it started this program. Not ru_maxrss: Linux carries that across
    fork and exec, so every run started by a parent that had grown (building the preset's checkpoint on first use)
    reported the parent's peak."""
    peak = proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_bytes(model) -> int:
    seen, total = set(), 0
    for _, t, _ in held_tensors(model):
        if storage_key(t) not in seen:
            seen.add(storage_key(t))
            total += t.numel() * t.element_size()
    return total


# -- one run: ours -----------------------------------------------------------------------------------------------


def run_ours(directory: Path, mode: str, args) -> dict:
    import torch

    import llava_next

    base, _, compiled = mode.partition("+")
    quantize = base if base in ("int8", "int4", "w8a8") else None
    dtype = base if base in ("float32", "bfloat16") else "bfloat16"
    before = rss_mib()
    start = time.perf_counter()
    pipe = llava_next.load(directory, dtype=dtype, device=args.device, progress=False, quantize=quantize,
                           compile=compiled == "compile")
    load_s = time.perf_counter() - start
    load_peak_mib = peak_rss_mib() - before
    pipe.engine.eos_token_ids = []  # decode exactly the tokens asked for
    img = image()
    conversation = messages(QUESTION)

    def answer(n):
        return pipe.generate(conversation, [img], max_new_tokens=n)

    answer(2)  # warm-up
    start = time.perf_counter()
    pipe.prepare(conversation, [img])
    preprocess_s = time.perf_counter() - start
    pipe.clear_caches()
    start = time.perf_counter()
    answer(1)
    first_token_s = time.perf_counter() - start
    pipe.clear_caches()
    gen = answer(args.new_tokens + 1)
    decode_tok_s = args.new_tokens / gen.decode_seconds
    result = dict(load_s=load_s, preprocess_s=preprocess_s, first_token_s=first_token_s, decode_tok_s=decode_tok_s,
                  decode_gb_s=decoder_bytes(pipe.model, "language_model.", "lm_head.", "embed_tokens") * decode_tok_s / 1e9,
                  model_mib=model_bytes(pipe.model) / 2**20, load_peak_mib=load_peak_mib)
    if args.followup:
        pipe.clear_caches()
        first = pipe.generate(conversation, [img], max_new_tokens=args.new_tokens)
        both = messages(QUESTION, FOLLOWUP, answers=(first.text,))
        pipe.clear_caches()
        start = time.perf_counter()
        pipe.generate(both, [img], max_new_tokens=1)
        result["followup_cold_s"] = time.perf_counter() - start
        pipe.clear_caches()
        chat = pipe.conversation()
        chat.ask(QUESTION, images=[img], max_new_tokens=args.new_tokens)
        start = time.perf_counter()
        chat.ask(FOLLOWUP, max_new_tokens=1)
        result["followup_cached_s"] = time.perf_counter() - start
        result["cache_stats"] = pipe.cache_stats()
    del torch
    return result


# -- one run: transformers ---------------------------------------------------------------------------------------


def run_transformers(directory: Path, mode: str, args) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[mode]
    before = rss_mib()
    start = time.perf_counter()
    processor = AutoProcessor.from_pretrained(directory)
    model = LlavaNextForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    load_s = time.perf_counter() - start
    load_peak_mib = peak_rss_mib() - before
    img = image()
    conversation = messages(QUESTION)

    class Stamps(LogitsProcessor):
        """Called once per generated token, right after the forward pass that produced its logits."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            if scores.is_cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            return scores

    def inputs(conv):
        prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
        batch = processor(text=prompt, images=[img], return_tensors="pt").to(args.device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    def answer(n, conv=conversation):
        stamps = Stamps()
        with torch.inference_mode():
            out = model.generate(**inputs(conv), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 logits_processor=LogitsProcessorList([stamps]))
        return out, stamps.times

    answer(2)
    start = time.perf_counter()
    inputs(conversation)
    preprocess_s = time.perf_counter() - start
    start = time.perf_counter()
    answer(1)
    first_token_s = time.perf_counter() - start
    _, stamps = answer(args.new_tokens + 1)
    decode_tok_s = args.new_tokens / (stamps[-1] - stamps[0])
    result = dict(load_s=load_s, preprocess_s=preprocess_s, first_token_s=first_token_s, decode_tok_s=decode_tok_s,
                  decode_gb_s=decoder_bytes(model, "model.language_model.", "lm_head.", "embed_tokens") * decode_tok_s / 1e9,
                  model_mib=model_bytes(model) / 2**20, load_peak_mib=load_peak_mib)
    if args.followup:
        out, _ = answer(args.new_tokens)
        prompt_len = inputs(conversation)["input_ids"].shape[1]
        text = processor.decode(out[0, prompt_len:], skip_special_tokens=True)
        both = messages(QUESTION, FOLLOWUP, answers=(text,))
        start = time.perf_counter()
        answer(1, both)
        result["followup_cold_s"] = time.perf_counter() - start
    return result


# -- driver ------------------------------------------------------------------------------------------------------


def run_one(impl: str, mode: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--run", f"{impl}:{mode}", *sys.argv[1:]],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict]) -> dict:
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    out = {}
    for key, value in good[0].items():
        if isinstance(value, (int, float)):
            out[key] = statistics.median(r[key] for r in good)
        else:
            out[key] = value
    out["runs"] = len(good)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--modes", default=",".join(OUR_MODES), help="ours: " + ", ".join(OUR_MODES))
    parser.add_argument("--reference", default=",".join(REFERENCE_MODES), help="transformers' dtypes ('' for none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="each figure is the median over this many rounds")
    parser.add_argument("--followup", action="store_true", help="also time a follow-up question, cold and cached")
    parser.add_argument("--cache", default=os.environ.get("LLAVA_NEXT_BENCH_CACHE", "/tmp/llava-next-bench"))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.cache) / args.preset
    if args.run:
        impl, mode = args.run.split(":")
        result = (run_ours if impl == "ours" else run_transformers)(directory, mode, args)
        result["peak_rss_mib"] = peak_rss_mib()
        if args.device.startswith("cuda"):
            import torch

            result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return
    build_checkpoint(Path(args.cache), args.preset)
    configs = [("ours", m) for m in args.modes.split(",") if m] + \
              [("transformers", m) for m in args.reference.split(",") if m]
    runs: dict[str, list[dict]] = {f"{i}:{m}": [] for i, m in configs}
    for r in range(args.rounds):
        for impl, mode in configs:
            result = run_one(impl, mode, args)
            runs[f"{impl}:{mode}"].append(result)
            print(f"round {r + 1} {impl:12} {mode:9} {json.dumps(result)}", file=sys.stderr, flush=True)
    results = {key: median_of(value) for key, value in runs.items()}

    import torch
    import transformers

    bandwidth = memory_bandwidth_gb_s(args.device)
    print(f"\n{args.preset}, {args.device}, {torch.get_num_threads()} threads, median of {args.rounds} interleaved "
          f"rounds; memory read bandwidth {bandwidth:.1f} GB/s")
    cols = ["preprocess_s", "first_token_s", "decode_tok_s", "decode_gb_s", "load_s", "peak_rss_mib", "model_mib"]
    if args.device.startswith("cuda"):
        cols.append("gpu_peak_mib")
    print(f"{'':24}" + "".join(f"{c:>15}" for c in cols))
    for key, r in results.items():
        if "error" in r:
            print(f"{key:24} error: {r['error']}")
            continue
        print(f"{key:24}" + "".join(f"{r[c]:15.3f}" if r[c] < 100 else f"{r[c]:15.0f}" for c in cols))
    ratios = {}
    for key, r in results.items():
        impl, mode = key.split(":")
        against = mode.partition("+")[0] if mode.partition("+")[0] in REFERENCE_MODES else "bfloat16"
        ref = results.get(f"transformers:{against}")
        if impl != "ours" or not ref or "error" in r or "error" in ref:
            continue
        ratios[key] = {"first_token": ref["first_token_s"] / r["first_token_s"],
                       "decode": r["decode_tok_s"] / ref["decode_tok_s"],
                       "preprocess": ref["preprocess_s"] / r["preprocess_s"],
                       "load": ref["load_s"] / r["load_s"],
                       "peak_memory": ref["peak_rss_mib"] / r["peak_rss_mib"],
                       "against": f"transformers:{against}"}
        if "gpu_peak_mib" in r and "gpu_peak_mib" in ref:
            ratios[key]["gpu_memory"] = ref["gpu_peak_mib"] / r["gpu_peak_mib"]
        if r.get("followup_cached_s"):
            ratios[key]["followup_cached_vs_cold"] = r["followup_cold_s"] / r["followup_cached_s"]
    print("\nratios (transformers' time / ours; our tokens/s / theirs):")
    for key, ratio in ratios.items():
        print(f"  {key:18} vs {ratio['against']:22} " + "  ".join(f"{k} {v:.2f}" for k, v in ratio.items()
                                                                    if k != "against"))
    summary = {"preset": args.preset, "device": args.device, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "image_tokens": 1512, "torch": torch.__version__, "transformers": transformers.__version__,
               "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
               "memory_bandwidth_gb_s": bandwidth, "results": results, "ratios": ratios}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
