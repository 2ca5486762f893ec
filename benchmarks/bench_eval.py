"""Evaluation throughput: questions per second of `llava-next eval --task` (the runner: batched greedy answers through
the engine, scoring, predictions written as it goes) against transformers' `generate` called once per question
(as lmms-eval's llava_hf model does at its default batch size of 1), on the same questions and images.

The questions are POPE's ("Is there a <object> in the image?" with its post-prompt, yes/no scoring), in POPE's
dataset schema, over `--questions` rows that cycle through 4 random images of different sizes, on a preset's random
checkpoint (benchmarks/checkpoints.py). Both sides generate at most `--max-new-tokens` tokens, greedily.
The last line printed is JSON.

    python benchmarks/bench_eval.py --preset medium --questions 32
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import build_checkpoint  # noqa: E402

OBJECTS = ["dog", "car", "chair", "person", "bottle", "cup", "tree", "bicycle"]
SIZES = [(500, 316), (640, 480), (336, 336), (300, 600)]


def pope_rows(n: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    images = []
    for i, (w, h) in enumerate(SIZES):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return [{"id": str(i), "question_id": str(i), "question": f"Is there a {OBJECTS[i % len(OBJECTS)]} in the image?",
             "answer": "yes" if i % 2 else "no", "image_source": f"img{i % len(SIZES)}", "category": "adversarial",
             "image": {"bytes": images[i % len(SIZES)], "path": None}} for i in range(n)]


def ours(checkpoint: Path, data: Path, batch_size: int, dtype: str) -> dict:
    import llava_next
    from llava_next.eval.runner import run_task

    pipe = llava_next.load(checkpoint, dtype=dtype, progress=False)
    run_task(pipe, "pope", data, None, limit=2, batch_size=2)  # warm-up
    began = time.perf_counter()
    result = run_task(pipe, "pope", data, None, batch_size=batch_size)
    seconds = time.perf_counter() - began
    return {"questions": result.answered, "seconds": round(seconds, 2), "questions_s": round(result.answered / seconds, 3)}


def transformers_one_by_one(checkpoint: Path, rows: list[dict], max_new_tokens: int, dtype: str) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_next.eval.tasks import get_task

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    samples = list(get_task("pope").samples(iter(rows)))

    def answer(sample):
        content = [{"type": "image"}] * len(sample.images) + [{"type": "text", "text": sample.prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=text, images=[im.convert("RGB") for im in sample.images], return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)

    answer(samples[0])  # warm-up
    began = time.perf_counter()
    for sample in samples:
        answer(sample)
    seconds = time.perf_counter() - began
    return {"questions": len(samples), "seconds": round(seconds, 2), "questions_s": round(len(samples) / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache", default=os.environ.get("LLAVA_NEXT_BENCH_CACHE", "/tmp/llava-next-bench"))
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llava_next.eval.tasks import get_task

    checkpoint = build_checkpoint(Path(args.cache), args.preset)
    rows = pope_rows(args.questions)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "test-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(rows), data)
        mine = ours(checkpoint, data, args.batch_size, args.dtype)
    print(f"llava-next eval --task pope (batch {args.batch_size}): {mine}", flush=True)
    theirs = transformers_one_by_one(checkpoint, rows, get_task("pope").max_new_tokens, args.dtype)
    print(f"transformers generate, one question at a time: {theirs}", flush=True)
    print(json.dumps({"preset": args.preset, "dtype": args.dtype, "ours": mine, "transformers": theirs,
                      "speedup": round(mine["questions_s"] / theirs["questions_s"], 2),
                      "max_new_tokens": get_task("pope").max_new_tokens, "cpu_count": os.cpu_count()}))


if __name__ == "__main__":
    main()
