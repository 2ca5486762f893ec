"""`llava-next serve` judged with the official openai client: answers equal the CLI's, streams equal answers, every
bad input gets its 4xx in OpenAI's error shape (and the server answers the next request), the operational endpoints."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import llava_next
from conftest import random_image, smooth_image
from serve_helpers import free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"


def data_url(image=None, path: Path | None = None, fmt: str = "PNG") -> str:
    if path is not None:
        raw = path.read_bytes()
    else:
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        raw = buf.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(raw).decode()}"


def ask(text: str, url: str | None = None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": url}}] if url else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def demo():
    pipe = llava_next.load("demo", progress=False)
    with running_server(pipe, served_name="demo") as base:
        yield pipe, base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_server(tiny):
    pipe = llava_next.load(tiny("vicuna"), dtype="float32", progress=False)
    with running_server(pipe, served_name="tiny", max_images=2, max_image_bytes=300_000) as base:
        yield pipe, base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def cli_json(model: str, image: Path, prompt: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "llava_next.cli", "generate", "--model", model, "--image", str(image),
                          "--prompt", prompt, "--json", *extra], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def test_an_answer_equals_the_cli_and_the_stream_equals_the_answer(demo):
    pipe, base, client = demo
    messages = ask("What color is the circle?", data_url(path=SHAPES))
    answer = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=20)
    expected = cli_json("demo", SHAPES, "What color is the circle?", "--max-new-tokens", "20")
    assert answer.choices[0].message.content == expected["text"] == "red"
    assert answer.choices[0].finish_reason == expected["finish_reason"]
    assert answer.usage.prompt_tokens == expected["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["completion_tokens"]
    assert answer.model == "demo" and answer.id.startswith("chatcmpl-")

    chunks = list(client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == answer.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [answer.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == answer.usage.model_dump()


@pytest.mark.parametrize("question", ["What shape is orange?", "How many shapes are there?"])
def test_tiny_float32_answers_equal_the_cli(tiny_server, tiny, question, tmp_path):
    pipe, base, client = tiny_server
    image_path = tmp_path / "picture.png"
    smooth_image(300, 200, seed=5).save(image_path)
    answer = client.chat.completions.create(model="tiny", messages=ask(question, data_url(path=image_path)),
                                            temperature=0, max_tokens=12)
    expected = cli_json(str(tiny("vicuna")), image_path, question, "--dtype", "float32", "--max-new-tokens", "12")
    assert answer.choices[0].message.content == expected["text"]
    assert answer.usage.completion_tokens == expected["completion_tokens"] == len(expected["token_ids"])
    inputs, _ = pipe.prepare([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                             [image_path])
    assert answer.usage.prompt_tokens == expected["prompt_tokens"] == inputs["input_ids"].shape[1]


def test_choices_stop_strings_logprobs_and_multi_turn(tiny_server):
    pipe, base, client = tiny_server
    question = ask("Tell me a story about the sea.")
    sampled = dict(model="tiny", messages=question, temperature=1.0, max_tokens=10, extra_body={"top_k": 40})
    two = client.chat.completions.create(**sampled, n=2, seed=11)
    again = client.chat.completions.create(**sampled, n=2, seed=11)
    assert [c.message.content for c in two.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in two.choices] == [0, 1]
    first = client.chat.completions.create(**sampled, seed=11)
    second = client.chat.completions.create(**sampled, seed=12)
    assert two.choices[0].message.content == first.choices[0].message.content  # choice i samples with seed + i
    assert two.choices[1].message.content == second.choices[0].message.content
    assert two.usage.completion_tokens == first.usage.completion_tokens + second.usage.completion_tokens
    assert two.usage.prompt_tokens == first.usage.prompt_tokens

    plain = client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    stopped = client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=16, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop" and plain.choices[0].finish_reason == "length"

    with_logprobs = client.chat.completions.create(model="tiny", messages=question, temperature=0, max_tokens=5,
                                                   logprobs=True, top_logprobs=3)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == with_logprobs.usage.completion_tokens == 5
    for token in content:  # greedy: the chosen token is the most likely one
        assert len(token.top_logprobs) == 3
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    assert "".join(t.token for t in content).strip() == with_logprobs.choices[0].message.content.strip()

    conversation = [{"role": "system", "content": "You are terse."}, *question,
                    {"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    turn = client.chat.completions.create(model="tiny", messages=conversation, temperature=0, max_tokens=8)
    expected = pipe.generate(conversation, max_new_tokens=8, temperature=0)
    assert turn.choices[0].message.content == expected.text
    assert turn.usage.prompt_tokens == expected.prompt_tokens


def test_typed_image_and_special_tokens_are_text(tiny_server):
    pipe, base, client = tiny_server
    typed = "What is <image> and </s> here?"
    answer = client.chat.completions.create(model="tiny", messages=ask(typed), temperature=0, max_tokens=4)
    ids = pipe.processor.chat_inputs(ask(typed), [])["input_ids"][0].tolist()
    assert pipe.config.image_token_id not in ids and pipe.processor.tokenizer.eos_token_id not in ids
    assert "<image>" in pipe.processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert answer.usage.prompt_tokens == len(ids)
    # the same text through generate() is a placeholder with no image: an error, as documented
    with pytest.raises(llava_next.prompt.PromptError, match="1 image place without an image"):
        pipe.generate([{"role": "user", "content": typed}], max_new_tokens=2)


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]["message"]


def test_bad_requests_get_their_4xx_and_the_server_keeps_answering(tiny_server):
    pipe, base, client = tiny_server
    good = {"model": "tiny", "messages": ask("Hi"), "max_tokens": 2, "temperature": 0}
    big_image = data_url(random_image(400, 400, seed=1))  # noise: a PNG of about 480 kB
    assert len(big_image) > 300_000 * 4 / 3
    cases = [
        (b"{not json", 400, "the body is not valid JSON"),
        ({"model": "tiny"}, 400, "messages"),
        ({**good, "messages": []}, 400, "messages"),
        ({**good, "temperature": 7}, 400, "temperature"),
        ({**good, "top_p": 0}, 400, "top_p"),
        ({**good, "max_tokens": 0}, 400, "max_tokens"),
        ({**good, "n": 100}, 400, "n"),
        ({**good, "frequency_penalty": 1.0}, 400, "repetition_penalty"),
        ({**good, "tools": []}, 400, "tools"),
        ({**good, "top_logprobs": 2}, 400, "logprobs"),
        ({**good, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({**good, "model": "gpt-4"}, 404, "this server serves 'tiny'"),
        ({**good, "messages": ask("x", "data:image/png;base64,@@@@")}, 400, "base64"),
        ({**good, "messages": ask("x", "https://example.com/cat.png")}, 400, "--allow-remote-images"),
        ({**good, "messages": ask("x", "file:///etc/passwd")}, 400, "--allowed-local-media-path"),
        ({**good, "messages": ask("x", "/etc/passwd")}, 400, "--allowed-local-media-path"),
        ({**good, "messages": ask("x", big_image)}, 413, "bytes"),
        ({**good, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(smooth_image(20, 20))}}] * 3}]},
         413, "--max-images"),
        ({**good, "messages": ask("hello " * 17000)}, 400, "context window"),
        ({**good, "messages": ask("x", data_url(smooth_image(1, 1)))}, 200, None),
    ]
    for body, status, says in cases:
        if isinstance(body, bytes):
            response = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
        else:
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == status, (says, response.text[:300])
        if says:
            assert says in error_of(response), (says, response.text[:300])
        after = client.chat.completions.create(**good)
        assert after.choices[0].finish_reason in ("stop", "length")


def test_rejected_requests_say_what_is_wrong_name_the_field_and_log_one_line(tiny_server, caplog):
    pipe, base, client = tiny_server
    url = f"{base}/v1/chat/completions"
    with caplog.at_level("INFO", logger="llava_next.serve"):
        not_json = httpx.post(url, content=b'{"model": tiny}', headers={"content-type": "application/json"})
        as_form = httpx.post(url, content=b"model=tiny", headers={"content-type": "application/x-www-form-urlencoded"})
        bad_field = httpx.post(url, json={"model": "tiny", "messages": ask("Hi"), "temperature": -1})
        no_route = httpx.get(f"{base}/v1/nothing%1B[2Jcleared")  # a terminal escape
        wrong_method = httpx.delete(f"{base}/v1/models")
    assert error_of(not_json) == "the body is not valid JSON (Expecting value at character 10)"
    assert error_of(as_form) == ("the body must be a JSON object; send it with the header "
                                 "'Content-Type: application/json'")
    assert bad_field.json()["error"]["param"] == "temperature" and "temperature" in error_of(bad_field)
    # a part of a kind the server does not take: where, in the request's own terms (no pydantic union branches)
    video = httpx.post(url, json={"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "video", "video_url": {"url": "v.mp4"}}]}]})
    assert error_of(video) == ("invalid request: messages[0].content[0].type: Input should be 'text' or 'image_url'; "
                               "messages[0].content[0].video_url: Extra inputs are not permitted")
    assert video.json()["error"]["param"] == "messages[0].content[0].type"
    neither = httpx.post(url, json={"model": "tiny", "messages": [{"role": "user", "content": 5}]})
    assert error_of(neither) == ("invalid request: messages[0].content: Input should be a valid string; or Input "
                                 "should be a valid list")
    assert [r.status_code for r in (not_json, as_form, bad_field, no_route, wrong_method)] == [400, 400, 400, 404, 405]
    lines = [r.getMessage() for r in caplog.records if r.name == "llava_next.serve"]
    assert lines == ["- 400 POST /v1/chat/completions: the body is not valid JSON (Expecting value at character 10)",
                     "- 400 POST /v1/chat/completions: the body must be a JSON object; send it with the header "
                     "'Content-Type: application/json'",
                     "- 400 POST /v1/chat/completions: invalid request: temperature: Input should be greater than or "
                     "equal to 0",
                     f"- 404 GET /v1/nothing\\x1b[2Jcleared: {error_of(no_route)}",
                     "- 405 DELETE /v1/models: DELETE is not allowed on /v1/models"]
    assert error_of(no_route).startswith("no such path /v1/nothing\\x1b[2Jcleared; this server answers POST "
                                         "/v1/chat/completions, GET /v1/models")
    assert "Hi" not in " ".join(lines)  # no prompt text without --log-prompts


def test_limits_auth_and_queue(tiny):
    pipe = llava_next.load(tiny("vicuna"), dtype="float32", progress=False)
    with running_server(pipe, served_name="tiny", api_key="s3cret", max_body_bytes=10_000, max_concurrent=1,
                        max_queue=1) as base:
        body = {"model": "tiny", "messages": ask("Hi"), "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 401 and "Authorization: Bearer" in error_of(response)
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        response = httpx.post(f"{base}/v1/chat/completions", json={**body, "messages": ask("x" * 20_000)},
                              headers={"Authorization": "Bearer s3cret"})
        assert response.status_code == 413 and "--max-body-bytes" in error_of(response)
        # one running, one waiting: the third concurrent request is refused with Retry-After, never hangs
        statuses = []

        def long_request():
            r = httpx.post(f"{base}/v1/chat/completions", json={**body, "max_tokens": 300, "temperature": 0},
                           headers={"Authorization": "Bearer s3cret"}, timeout=120)
            statuses.append((r.status_code, r.headers.get("retry-after"), r.json()))

        threads = [threading.Thread(target=long_request) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.1)
        for t in threads:
            t.join()
        codes = sorted(s for s, _, _ in statuses)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        assert all(retry == "1" and "queue is full" in b["error"]["message"] for s, retry, b in statuses if s == 429)
        assert client.chat.completions.create(**body).choices  # and it still answers


def test_health_models_metrics_and_disconnect(tiny_server):
    pipe, base, client = tiny_server
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert client.models.retrieve("tiny").id == "tiny"
    with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": ask("Go on and on."), "max_tokens": 5000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        next(lines), next(lines)  # a blank line and a first piece: it is running
    deadline = time.monotonic() + 10  # the client is gone: its row is freed within a step or two
    while "llava_next_requests_running 0.0" not in httpx.get(f"{base}/metrics").text:
        assert time.monotonic() < deadline, "the disconnected request kept its KV row"
        time.sleep(0.05)
    metrics = httpx.get(f"{base}/metrics").text
    for name in ("llava_next_requests_waiting", 'llava_next_requests_total{status="200"}',
                 "llava_next_prompt_tokens_total", "llava_next_generated_tokens_total",
                 "llava_next_time_to_first_token_seconds_count", "llava_next_time_per_output_token_seconds_bucket",
                 "llava_next_image_features_cache_hits_total", "llava_next_prefix_cache_hits_total"):
        assert name in metrics, name
    # the cache counters are the engine's own (the requests here share their prompt's start: a hit, tokens reused)
    prefix = pipe.engine.cache_stats()["prefix"]
    for kind, value in (("hits", prefix["hits"]), ("misses", prefix["misses"]),
                        ("reused_tokens", prefix["reused_tokens"])):
        sample = re.search(rf"^llava_next_prefix_cache_{kind}_total (\S+)$", metrics, re.MULTILINE)
        assert float(sample.group(1)) == value, kind
    assert prefix["misses"] >= 1  # (the server's first request found nothing saved)
    answered = float(metrics.split('llava_next_requests_total{status="200"} ')[1].split()[0])
    assert answered >= 1


def test_health_is_503_while_loading_and_after_a_failed_load(monkeypatch, tiny, caplog):
    caplog.set_level("INFO", logger="llava_next.serve")
    from llava_next.serve import app as app_module

    release = threading.Event()
    real_load = app_module.load

    def slow_load(*args, **kwargs):
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(app_module, "load", slow_load)
    with running_server(tiny("vicuna"), served_name="tiny", dtype="float32") as base:
        response = httpx.get(f"{base}/health")
        assert response.status_code == 503 and response.json() == {"status": "loading"}
        busy = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny", "messages": ask("Hi")})
        assert busy.status_code == 503 and "loading" in error_of(busy)
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    with running_server("/nonexistent/model", served_name="x") as base:
        deadline = time.monotonic() + 30
        while httpx.get(f"{base}/health").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        response = httpx.get(f"{base}/health")
        assert response.status_code == 503 and "nonexistent" in response.json()["error"]
    failed = [r for r in caplog.records if r.getMessage().startswith("loading /nonexistent/model failed: ")]
    assert len(failed) == 1 and failed[0].exc_info is None  # the operator's mistake: one line, no traceback


def test_the_command_serves_and_shuts_down_cleanly_on_sigterm():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llava_next.cli", "serve", "--model", "demo", "--port", str(port)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pieces = []
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, json={
                "model": "demo", "messages": ask("What color is the circle?", data_url(path=SHAPES)),
                "max_tokens": 30, "stream": True}) as r:
            for line in r.iter_lines():
                if not pieces:
                    process.send_signal(signal.SIGTERM)  # mid-answer: the answer still completes
                pieces.append(line)
        events = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")]
        assert pieces[-2:] == ["data: [DONE]", ""] or pieces[-1] == "data: [DONE]"
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == ["stop"]
        # uvicorn finishes in-flight responses, shuts down, then re-raises the signal (the conventional exit status
        # of a service stopped by SIGTERM)
        assert process.wait(30) in (0, -signal.SIGTERM)
        log = process.stdout.read()
        assert "chatcmpl-" in log and "completion_tokens=" in log
        assert "What color" not in log  # no prompt text without --log-prompts
    finally:
        if process.poll() is None:
            process.kill()


INTERRUPTED_WHILE_LOADING = """
import sys, time
from llava_next import cli
from llava_next.serve import app
real = app.load
def slow(*args, **kwargs):
    time.sleep(120)
    return real(*args, **kwargs)
app.load = slow
sys.exit(cli.main(["serve", "--model", "demo", "--port", sys.argv[1]]))
"""


def test_the_server_listens_on_every_address_its_host_names(monkeypatch):
    # localhost is 127.0.0.1 and ::1 on many systems: a client may try either (as asyncio's create_server binds both)
    import socket

    from llava_next.errors import LlavaError
    from llava_next.serve.app import listening_sockets

    port = free_port()
    both = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: both + both[1:])  # (a repeat: bound once)
    try:
        sockets = listening_sockets("localhost", port)
    except LlavaError as e:  # (a system without IPv6 on its loopback)
        pytest.skip(str(e))
    try:
        assert [s.getsockname()[:2] for s in sockets] == [("::1", port), ("127.0.0.1", port)]
        assert sockets[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in sockets:
            s.close()


def test_a_port_in_use_is_one_line_and_ctrl_c_while_loading_stops_cleanly():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "llava_next.cli", "serve", "--model", "demo", "--port",
                                 str(port)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (f"llava-next: error: cannot listen on 127.0.0.1:{port}: Address already in use; pick "
                             "another --port, or stop what listens there\n")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", INTERRUPTED_WHILE_LOADING, str(port)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the server to answer "loading"
            assert process.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "loading"}:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 130
        log = process.stdout.read()
        assert "stopped while demo was loading" in log and "terminate called" not in log, log
    finally:
        if process.poll() is None:
            process.kill()


def test_a_fault_is_a_logged_500_with_a_request_id_and_the_server_goes_on(tiny, monkeypatch, caplog):
    from llava_next.engine import Scheduler

    pipe = llava_next.load(tiny("vicuna"), dtype="float32", progress=False)
    real = Scheduler._prefill

    def faulty(self, seq, changed, budget):
        if seq.prompt_tokens > 40:  # only the long prompt's prefill breaks
            raise RuntimeError("simulated fault")
        return real(self, seq, changed, budget)

    monkeypatch.setattr(Scheduler, "_prefill", faulty)
    with running_server(pipe, served_name="tiny") as base, caplog.at_level("ERROR", logger="llava_next.serve"):
        long = {"model": "tiny", "messages": ask("word " * 60), "max_tokens": 3}
        response = httpx.post(f"{base}/v1/chat/completions", json=long, timeout=60)
        assert response.status_code == 500
        message = error_of(response)
        request_id = message.split("request id ")[1].split(")")[0]
        assert request_id.startswith("chatcmpl-") and "simulated fault" not in message  # no internals to clients
        assert any(request_id in r.getMessage() for r in caplog.records)
        assert any("simulated fault" in str(r.exc_info) for r in caplog.records if r.exc_info)
        streamed = httpx.post(f"{base}/v1/chat/completions", json={**long, "stream": True}, timeout=60).text
        assert '"type": "server_error"' in streamed and streamed.rstrip().endswith("data: [DONE]")
        ok = httpx.post(f"{base}/v1/chat/completions", json={**long, "messages": ask("Hi")}, timeout=60)
        assert ok.status_code == 200


def test_the_server_keeps_several_conversations_prefixes_within_its_prefix_cache_memory(tiny, monkeypatch, capsys):
    from llava_next import cli
    from llava_next.serve import app as app_module
    from llava_next.serve.app import ServeSettings, ServerState

    # by default a quarter of the KV space (load()'s default keeps the newest conversation's only)
    for memory, expected in ((None, lambda kv: kv // 4), (12345, lambda kv: 12345), (0, lambda kv: 0)):
        state = ServerState(ServeSettings(model=str(tiny("vicuna")), dtype="float32", max_concurrent=2,
                                          kv_memory=2**24, prefix_cache_memory=memory))
        state.load()
        try:
            assert state.failure is None
            assert state.pipe.engine.prefix_cache.max_bytes == expected(state.engine.scheduler.kv_bytes)
        finally:
            state.engine.shutdown()
    # the flag, in the sizes --kv-memory takes
    given = []
    monkeypatch.setattr(app_module, "serve", lambda settings: given.append(settings))
    assert cli.main(["serve", "--model", "demo", "--prefix-cache-memory", "1GiB"]) == 0
    assert given[-1].prefix_cache_memory == 2**30 and given[-1].kv_memory is None
    assert cli.main(["serve", "--model", "demo", "--prefix-cache-memory", "lots"]) == 2
    assert "--prefix-cache-memory: 'lots' is not a size" in capsys.readouterr().err
