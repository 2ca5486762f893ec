"""Serving throughput and time to first token: `llava-next serve` under 1, 4, 8, 16 concurrent clients, against the
same requests one after another, and against transformers' `generate` called once per request.

Each client sends `--requests-per-client` streamed chat completions one after another (greedy, `--max-tokens`
new tokens at most, a different question each, text only unless `--image`, which adds the 500x316 image to every
request). Per concurrency level: wall time, generated tokens (from each response's `usage`), tokens/s over the
wall time, and the time to first token (the first streamed chunk with a token) p50/p95. Then the 8-client
workload's requests are sent again one at a time (`sequential`). `--rounds` repeats all of that, interleaved;
figures are medians over the rounds. Finally transformers (`generate`, same dtype, same chat template, same
greedy settings) answers the same requests one at a time in this process, after the server has exited.

The server runs in its own process (`llava-next serve --max-concurrent 16`) on the preset's checkpoint
(benchmarks/checkpoints.py). The last line printed is JSON with every number.

    python benchmarks/bench_serve.py --preset medium
    python benchmarks/bench_serve.py --preset medium --image --concurrency 1,8
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import build_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "mountains", "a city at night", "a forest", "the desert", "rain", "a library", "a market",
          "winter", "a train journey", "the moon", "a garden", "an old house", "a river", "a storm", "a bakery"]


def question(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]} (number {i})."


def image_url() -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (316, 500, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def api_messages(i: int, url: str | None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": question(i)}]
    return [{"role": "user", "content": parts}]


def one_request(base: str, i: int, url: str | None, max_tokens: int) -> dict:
    """A streamed request: time to the first token (the first chunk carrying a token's logprob: a random model's
    text can stay empty until the end, held back as incomplete characters), total time, generated tokens."""
    began = time.perf_counter()
    first = None
    usage = None
    body = {"model": "bench", "messages": api_messages(i, url), "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event["choices"] and event["choices"][0].get("logprobs") and first is None:
                first = time.perf_counter() - began
            if event.get("usage"):
                usage = event["usage"]
    return {"ttft": first if first is not None else time.perf_counter() - began,
            "seconds": time.perf_counter() - began, "tokens": usage["completion_tokens"]}


def run_level(base: str, clients: int, per_client: int, url: str | None, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for j in range(per_client):
            r = one_request(base, c * per_client + j, url, max_tokens)
            with lock:
                results.append(r)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(results, time.perf_counter() - began)


def run_sequential(base: str, n: int, url: str | None, max_tokens: int) -> dict:
    began = time.perf_counter()
    results = [one_request(base, i, url, max_tokens) for i in range(n)]
    return summary(results, time.perf_counter() - began)


def summary(results: list[dict], wall: float) -> dict:
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "wall_s": round(wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}


def median_of(runs: list[dict]) -> dict:
    """Each figure's median over the rounds, and the ratio that matters computed per round first."""
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]} | {"rounds": len(runs)}


def start_server(checkpoint: Path, port: int, dtype: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "llava_next.cli", "serve", "--model", str(checkpoint),
                                "--served-model-name", "bench", "--port", str(port), "--dtype", dtype,
                                "--max-concurrent", "16", "--max-queue", "256"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise RuntimeError("the server exited while starting")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.5)


def transformers_sequential(checkpoint: Path, n: int, with_image: bool, max_tokens: int, dtype: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (316, 500, 3), dtype=np.uint8))
    eos = model.generation_config.eos_token_id
    results = []
    began = time.perf_counter()
    for i in range(n):
        start = time.perf_counter()
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question(i)}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=text, images=[picture] if with_image else None, return_tensors="pt")
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        results.append({"ttft": float("nan"), "seconds": time.perf_counter() - start,
                        "tokens": len(new) if eos not in new else new.index(eos) + 1})
    wall = time.perf_counter() - began
    tokens = sum(r["tokens"] for r in results)
    return {"requests": n, "wall_s": round(wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", action="store_true", help="every request carries the 500x316 image")
    parser.add_argument("--no-reference", action="store_true", help="skip transformers")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--cache", default="/tmp/llava-next-bench", help="where benchmark checkpoints are kept")
    args = parser.parse_args()

    checkpoint = build_checkpoint(Path(args.cache), args.preset)
    url = image_url() if args.image else None
    base = f"http://127.0.0.1:{args.port}"
    server = start_server(checkpoint, args.port, args.dtype)
    runs: dict[str, list[dict]] = {}
    try:
        run_sequential(base, 2, url, 8)  # warm-up
        for round_ in range(args.rounds):  # interleaved rounds: a noisy machine slows all of a round, not one figure
            for clients in [int(c) for c in args.concurrency.split(",")]:
                runs.setdefault(str(clients), []).append(
                    run_level(base, clients, args.requests_per_client, url, args.max_tokens))
                print(f"round {round_ + 1}, {clients:>3} clients: {runs[str(clients)][-1]}", flush=True)
            runs.setdefault("sequential", []).append(
                run_sequential(base, 8 * args.requests_per_client, url, args.max_tokens))
            print(f"round {round_ + 1}, sequential ({8 * args.requests_per_client} requests): "
                  f"{runs['sequential'][-1]}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    medians = {key: median_of(values) for key, values in runs.items()}
    sequential = medians.pop("sequential")
    levels = medians
    reference = None
    if not args.no_reference:
        reference = transformers_sequential(checkpoint, 8 * args.requests_per_client, args.image, args.max_tokens,
                                            args.dtype)
        print(f"transformers generate, one request at a time: {reference}", flush=True)
    result = {"preset": args.preset, "dtype": args.dtype, "image": args.image, "max_tokens": args.max_tokens,
              "requests_per_client": args.requests_per_client, "levels": levels, "sequential": sequential,
              "transformers_sequential": reference, "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if "8" in levels:
        per_round = [a["tok_s"] / b["tok_s"] for a, b in zip(runs["8"], runs["sequential"])]
        result["8_clients_vs_sequential"] = round(statistics.median(per_round), 2)
        result["8_clients_vs_sequential_per_round"] = [round(r, 2) for r in per_round]
        if reference:
            result["8_clients_vs_transformers"] = round(levels["8"]["tok_s"] / reference["tok_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
