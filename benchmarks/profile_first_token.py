"""Where the answer latency (preprocessing to the first token) goes: ours by stage, against transformers' total.

bench_generate.py says how long the first token takes; this says why. On a GPU a mid-size model's first token is
bound by launching kernels and by host work, not by arithmetic, so besides the stages (each timed with the device
synchronised on both sides: preprocessing, the vision tower and packing, the prompt's prefill, the first token's
sampling) it counts the kernels launched and the host-device synchronisations in one answer, for both.

    python benchmarks/profile_first_token.py --preset medium --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import QUESTION, image, messages  # noqa: E402
from checkpoints import PRESETS, build_checkpoint  # noqa: E402


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_counts(run, device: str, top: int) -> str:
    """Kernel launches, synchronisations and the host's costliest operations in one call of `run`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.key_averages()
    counts = collections.Counter()
    for e in events:
        if "LaunchKernel" in e.key or "cudaGraphLaunch" in e.key:
            counts["kernel launches"] += e.count
        if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "cudaMemcpy"):
            counts[e.key] += e.count
    lines = [f"  {k}: {v}" for k, v in sorted(counts.items())]
    lines.append(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))
    return "\n".join(lines)


def report(name: str, answer, args) -> None:
    """Times `answer` (which returns its own seconds) after two warm-ups, then profiles one call."""
    for _ in range(2):
        answer()
    totals = [answer() for _ in range(args.repeats)]
    print(f"{name} {args.dtype}: first token {statistics.median(totals) * 1e3:.1f} ms "
          f"(median of {args.repeats}: {', '.join(f'{t * 1e3:.1f}' for t in totals)})")
    print(profile_counts(answer, args.device, args.top))


def ours(directory: Path, args) -> None:
    import llava_next
    from llava_next.engine import Engine, Scheduler

    pipe = llava_next.load(directory, dtype=args.dtype, device=args.device, progress=False)
    pipe.engine.eos_token_ids = []
    img, conversation = image(), messages(QUESTION)
    stages: dict[str, list[float]] = collections.defaultdict(list)

    def timed(cls, name: str, label: str):
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(*a, **k):
            synchronize(args.device)
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                synchronize(args.device)
                stages[label].append(time.perf_counter() - start)
        setattr(cls, name, wrapper)

    def answer():
        pipe.clear_caches()
        synchronize(args.device)
        start = time.perf_counter()
        pipe.generate(conversation, [img], max_new_tokens=1)
        synchronize(args.device)
        return time.perf_counter() - start

    report("ours", answer, args)
    timed(type(pipe), "prepare", "prepare (processor)")
    timed(Engine, "image_features", "image_features (tower, projector, packing)")
    timed(Engine, "sequences", "sequences (features included)")
    timed(Engine, "kv_space", "kv_space (the KV cache's memory)")
    timed(Scheduler, "_prefill", "prefill (first token included)")
    timed(Scheduler, "_accept", "first token (sampling, detokenising)")
    for _ in range(args.repeats):
        answer()
    for label, times in stages.items():
        print(f"  stage {label:48} {statistics.median(times) * 1e3:8.2f} ms")


def transformers_reference(directory: Path, args) -> None:
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    processor = AutoProcessor.from_pretrained(directory)
    model = LlavaNextForConditionalGeneration.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    model = model.to(args.device).eval()
    img, conversation = image(), messages(QUESTION)

    def answer():
        synchronize(args.device)
        start = time.perf_counter()
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        batch = processor(text=prompt, images=[img], return_tensors="pt").to(args.device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
        synchronize(args.device)
        return time.perf_counter() - start

    report("transformers", answer, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="medium")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=20, help="rows of the host-time table")
    parser.add_argument("--cache", default="/tmp/llava-next-bench")
    args = parser.parse_args()
    directory = build_checkpoint(Path(args.cache), args.preset)
    ours(directory, args)
    transformers_reference(directory, args)


if __name__ == "__main__":
    main()
