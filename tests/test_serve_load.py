"""A bounded load test on localhost: 32 concurrent clients x 5 requests against the float32 tiny checkpoint. Every
request is answered, none is mixed up with another (each equals its prompt's solo greedy answer), nothing fails,
and the process's memory is back to its baseline afterwards."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

import llava_next
from conftest import smooth_image
from serve_helpers import free_port

CLIENTS, REQUESTS_EACH = 32, 5
QUESTIONS = ["What is in the picture?", "Describe it in one sentence.", "Is there a circle?", "Why is the sky blue?",
             "Count to five.", "Name a colour."]


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def png_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextmanager
def serve_process(model: Path):
    """`llava-next serve` in a process of its own (so that its memory is its own), float32, 8 sequences at once."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llava_next.cli", "serve", "--model", str(model), "--dtype",
                                "float32", "--served-model-name", "tiny", "--port", str(port), "--max-concurrent", "8",
                                "--max-queue", "64"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, "the server exited"
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield base, process.pid
    finally:
        process.terminate()
        process.wait(30)


def test_32_concurrent_clients_each_get_their_own_answer(tiny):
    pipe = llava_next.load(tiny("vicuna"), dtype="float32", progress=False)
    images = [smooth_image(120 + 40 * i, 90 + 30 * i, seed=i) for i in range(3)]
    prompts = []  # (messages for the API, messages and images for pipe.generate, max_tokens)
    for i, question in enumerate(QUESTIONS):
        image = images[i % 3] if i % 2 == 0 else None
        api = [{"role": "user", "content": ([{"type": "image_url", "image_url": {"url": png_url(image)}}] if image else [])
                + [{"type": "text", "text": question}]}]
        local = [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]}]
        prompts.append((api, local, [image] if image else [], 4 + i))
    solo = [pipe.generate(local, imgs, max_new_tokens=n, temperature=0).text for _, local, imgs, n in prompts]

    with serve_process(tiny("vicuna")) as (base, pid):
        def request(client: httpx.Client, k: int) -> tuple[int, str, int, str]:
            api, _, _, n = prompts[k % len(prompts)]
            r = client.post(f"{base}/v1/chat/completions", timeout=300,
                            json={"model": "tiny", "messages": api, "max_tokens": n, "temperature": 0})
            body = r.json()
            return k, body["choices"][0]["message"]["content"] if r.status_code == 200 else "", r.status_code, r.text[:200]

        def client_job(c: int) -> list:
            with httpx.Client() as client:
                return [request(client, c * REQUESTS_EACH + j) for j in range(REQUESTS_EACH)]

        # the baseline: after a first round of the same load, which leaves the server's thread pools, the
        # allocator's per-thread arenas and its native caches (oneDNN's primitives, ...) at their working size
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(client_job, range(CLIENTS)))
        time.sleep(0.5)  # idle: the engine hands freed memory back
        baseline = rss_bytes(pid)
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for batch in pool.map(client_job, range(CLIENTS)) for r in batch]
        time.sleep(0.5)
        after = rss_bytes(pid)
        assert httpx.get(f"{base}/health").status_code == 200
        metrics = httpx.get(f"{base}/metrics").text

    assert len(results) == CLIENTS * REQUESTS_EACH
    failures = [(k, status, text) for k, _, status, text in results if status != 200]
    assert not failures, failures[:3]
    mixed = [(k, answer) for k, answer, _, _ in results if answer != solo[k % len(prompts)]]
    assert not mixed, mixed[:3]
    assert "llava_next_requests_running 0.0" in metrics and "llava_next_requests_waiting 0.0" in metrics
    # The KV space is allocated (and touched) at start and freed memory is handed back when the engine is idle, so
    # the load leaves the server's memory near where the first round left it. Not exactly: native caches that
    # Python does not see (oneDNN's primitive cache holds one entry per matrix shape, up to 1024) still grow by
    # 50-150 MB over a round of 160 requests here. A leak of the kind this catches (a pixel tensor kept per
    # request, a thread pool per request) grew it by 600 MB.
    assert after - baseline < 192 * 2**20, (baseline, after)
