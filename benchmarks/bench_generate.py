"""Speed and memory of image-question answering: llava_next against transformers, same weights, same inputs.

It builds (once, cached) a random LLaVA-NeXT checkpoint with real geometry (336 px tiles, patch 14, the published
pinpoints, a 500x316 image = 1512 image tokens) and a mid-size decoder, then runs each implementation in its own
process so that peak memory is its own:
  - prefill: preprocessing, the vision tower and the whole prompt, up to the first token's logits (median of runs)
  - decode: greedy tokens per second over --new-tokens tokens, EOS ignored
  - peak resident memory of the process
The last line printed is JSON with every number and the ratios (transformers / ours: above 1 means we are faster
or smaller).

    python benchmarks/bench_generate.py [--size small|medium] [--dtype float32|bfloat16] [--device cpu|cuda]
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

SIZES = {
    # vision: CLIP geometry at reduced width; text: a mistral-shaped decoder
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4),
                  text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=2)),
    "medium": dict(vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                   text=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                             num_key_value_heads=4)),
}
QUESTION = "What is shown in this image?"


def build_checkpoint(directory: Path, size: str) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import torch
    from tiny_checkpoints import build_tokenizer_json
    from tokenizers import Tokenizer
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, MistralConfig, PreTrainedTokenizerFast)

    if (directory / "config.json").exists():
        return directory
    tok_json, roles = build_tokenizer_json("sentencepiece")
    backend = Tokenizer.from_str(json.dumps(tok_json))
    vocab = 32064  # the real vocabulary size: the lm_head's cost matters in decoding
    spec = SIZES[size]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=256, **spec["vision"]),
        text_config=MistralConfig(vocab_size=vocab, max_position_embeddings=8192, sliding_window=None, **spec["text"]),
        image_token_index=backend.token_to_id("<image>"),
    )
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, padding_side="left", **roles)
    template = (Path(__file__).resolve().parent.parent / "llava_next" / "templates" / "mistral.jinja").read_text()
    LlavaNextProcessor(LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                       tokenizer, patch_size=14, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=template).save_pretrained(directory)
    return directory


def image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (316, 500, 3), dtype=np.uint8))


def run_ours(directory: Path, args) -> dict:
    import torch

    import llava_next
    from llava_next.engine import SamplingParams

    pipe = llava_next.load(directory, dtype=args.dtype, device=args.device, progress=False)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    img = image()
    engine = pipe.engine
    engine.eos_token_ids = []  # decode exactly --new-tokens tokens

    def prefill():
        inputs, _ = pipe.prepare(messages, [img])
        with torch.inference_mode():
            return pipe.model(**{k: v.to(pipe.model.lm_head.weight.device) for k, v in inputs.items()},
                              logits_to_keep=1)

    def generate(n):
        inputs, _ = pipe.prepare(messages, [img])
        return engine.generate(inputs, SamplingParams(max_new_tokens=n))[0]

    return measure(prefill, generate, args, sync=_sync(args))


def run_transformers(directory: Path, args) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    processor = AutoProcessor.from_pretrained(directory)
    model = LlavaNextForConditionalGeneration.from_pretrained(directory, dtype=dtype).to(args.device).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    img = image()

    def inputs():
        batch = processor(text=prompt, images=[img], return_tensors="pt").to(args.device)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return batch

    def prefill():
        with torch.inference_mode():
            return model(**inputs(), logits_to_keep=1).logits

    def generate(n):
        with torch.inference_mode():
            return model.generate(**inputs(), max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return measure(prefill, generate, args, sync=_sync(args))


def _sync(args):
    import torch

    return torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)


def measure(prefill, generate, args, sync) -> dict:
    prefill()  # warm-up
    generate(4)
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        prefill()
        sync()
        times.append(time.perf_counter() - start)
    # decode rate: the difference between a long and a one-token generation removes prefill from the count
    sync()
    start = time.perf_counter()
    generate(1)
    sync()
    one = time.perf_counter() - start
    start = time.perf_counter()
    generate(args.new_tokens + 1)
    sync()
    many = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    return {"prefill_s": statistics.median(times), "decode_tokens_per_s": args.new_tokens / max(many - one, 1e-9),
            "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", default=os.environ.get("LLAVA_NEXT_BENCH_CACHE", "/tmp/llava-next-bench"))
    parser.add_argument("--impl", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    directory = Path(args.cache) / f"{args.size}"
    if args.impl:
        result = (run_ours if args.impl == "ours" else run_transformers)(directory, args)
        print(json.dumps(result))
        return
    build_checkpoint(directory, args.size)
    results = {}
    for impl in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--impl", impl, *sys.argv[1:]], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch
    import transformers

    ours, theirs = results["ours"], results["transformers"]
    summary = {
        "size": args.size, "dtype": args.dtype, "device": args.device, "new_tokens": args.new_tokens,
        "image_tokens": 1512, "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "ours": ours, "transformers_results": theirs,
        "prefill_speedup": theirs["prefill_s"] / ours["prefill_s"],
        "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
        "memory_ratio": theirs["peak_rss_mib"] / ours["peak_rss_mib"],
    }
    print(f"{'':24}{'llava_next':>14}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill (s)':24}{ours['prefill_s']:14.3f}{theirs['prefill_s']:14.3f}{summary['prefill_speedup']:8.2f}")
    print(f"{'decode (tokens/s)':24}{ours['decode_tokens_per_s']:14.1f}{theirs['decode_tokens_per_s']:14.1f}"
          f"{summary['decode_speedup']:8.2f}")
    print(f"{'peak memory (MiB)':24}{ours['peak_rss_mib']:14.0f}{theirs['peak_rss_mib']:14.0f}{summary['memory_ratio']:8.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
