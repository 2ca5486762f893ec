"""The HTTP layer: OpenAI's chat-completions API, health, metrics and the chat page, on the generation engine.

Requests become engine sequences and nothing else: the engine's thread runs them all (continuous batching), and
each request waits on a queue its sequences' listener fills. Images come only through `media.load_image_url`,
which applies the operator's policy; message text reaches the tokenizer as literal text (`Processor.chat_inputs`).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import BackgroundEngine, EngineBusy, Sequence
from ..errors import LlavaError
from ..pipeline import Pipeline, load, sampling_params
from ..prompt import IncrementalDetokenizer
from .media import MediaError, load_image_url
from .metrics import ServerMetrics
from .schema import ChatCompletionRequest, ImageTokensRequest, Message
from .settings import ServeSettings

log = logging.getLogger("llava_next.serve")

GiB = 2**30
LOAD_THREAD = "llava-next-load"


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.TYPES.get(self.status, "server_error"), self.code,
                              self.param, self.headers)


def error_response(status: int, message: str, kind: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def kv_space(pipe: Pipeline, max_concurrent: int | None, kv_memory: int | None) -> tuple[int, int]:
    """(sequences, tokens per sequence) of the KV space: as many rows as asked for (8 on CPU, 32 on GPU), each as
    long as the context window where memory allows, shortened (and, when the count was not given, fewer rows)
    where it does not. Never less than one row of min(window, 4096) tokens."""
    engine = pipe.engine
    per_token = engine.kv_bytes_per_token()
    window = pipe.config.text.max_position_embeddings
    if kv_memory is None:
        kv_memory = free_memory(engine.device) // (2 if engine.device.type == "cuda" else 4)
    slots = max_concurrent or (32 if engine.device.type == "cuda" else 8)
    wanted = min(window, 4096)
    if max_concurrent is None:
        slots = max(1, min(slots, kv_memory // (per_token * wanted)))
    capacity = min(window, kv_memory // (per_token * slots))
    if capacity < min(window, 256):
        raise LlavaError(f"--kv-memory {kv_memory} bytes gives {slots} sequences only {capacity} tokens each "
                         f"({per_token} bytes per token); give more memory or fewer --max-concurrent")
    return slots, capacity


def free_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 4 * GiB


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 4GiB, 512MiB or a number of bytes")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20, "G": 1e9, "GB": 1e9,
             "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}[unit]
    return int(number * scale)


# -- server state ----------------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    settings: ServeSettings
    pipe: Pipeline | None = None
    engine: BackgroundEngine | None = None
    failure: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def ready(self) -> tuple[Pipeline, BackgroundEngine]:
        if self.failure:  # no Retry-After: waiting will not help
            raise ApiError(503, f"the model failed to load: {self.failure}; the server's log has the details")
        if self.pipe is None or self.engine is None:
            raise ApiError(503, "the model is still loading; try again shortly", headers={"Retry-After": "5"})
        return self.pipe, self.engine

    def start(self, pipe: Pipeline, compile: bool = False) -> None:
        """Serves `pipe`; `compile`: its decoding steps through torch.compile first, told how many rows they carry
        (with more than one slot a CPU engine keeps int8 weights plain instead of laying them out for one row). The
        pipe's prefix cache takes the server's budget (prefix_cache_memory), whatever it was loaded with."""
        s = self.settings
        slots, capacity = kv_space(pipe, s.max_concurrent, s.kv_memory)
        if compile:
            pipe.engine.compile_decoding(many_rows=slots > 1)
        self.engine = BackgroundEngine(pipe.engine, slots, capacity, s.prefill_chunk, s.max_queue)
        # finished conversations' KV for their next turns: several conversations', not only the newest (load()'s
        # default, for one conversation at a time); set before any request (the warm-up keeps nothing)
        prefix = pipe.engine.prefix_cache
        kv_bytes = self.engine.scheduler.kv_bytes
        prefix.max_bytes = kv_bytes // 4 if s.prefix_cache_memory is None else s.prefix_cache_memory
        if pipe.engine.decode_step is not pipe.model:  # compiled: before the first users, not while they wait
            log.info("compiling the decoding step (a few short requests of its own)")
            log.info("compiled in %.1f s", self.engine.warm_up())
        self.pipe = pipe
        log.info("ready: %s, KV space %d sequences x %d tokens (%.2f GiB), prefix cache %.2f GiB, dtype %s", s.name(),
                 slots, capacity, kv_bytes / GiB, prefix.max_bytes / GiB, pipe.model.dtype)

    def load(self) -> None:
        s = self.settings
        try:
            pipe = load(s.model, dtype=s.dtype, device=s.device, revision=s.revision, progress=False,
                        max_image_pixels=s.max_image_pixels, quantize=s.quantize, group_size=s.group_size,
                        vision_tower=s.vision_tower, conv_template=s.conv_template)
            self.start(pipe, compile=s.compile)
        except Exception as e:  # noqa: BLE001 - reported by /health and every request, and logged
            self.failure = f"{type(e).__name__}: {e}"
            if isinstance(e, (LlavaError, FileNotFoundError)):  # the operator's to fix: the message says it all
                log.error("loading %s failed: %s", s.model, e)
            else:
                log.exception("loading %s failed", s.model)


# -- the request body limit ------------------------------------------------------------------------------------------


class BodyLimit:
    """Refuses request bodies over `max_bytes` with 413, by the declared length or while receiving."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is over the server's limit of {self.max_bytes} bytes "
                                      "(--max-body-bytes); send fewer or smaller images", "invalid_request_error")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        return await self.app(scope, replay, send)


# -- turning a request into sequences --------------------------------------------------------------------------------


def to_messages(messages: list[Message]) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages -> transformers' chat format (images as image items), and the image URLs in order."""
    out, urls = [], []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            out.append({"role": role, "content": m.content or ""})
            continue
        items = []
        for part in m.content:
            if part.type == "text":
                items.append({"type": "text", "text": part.text})
            else:
                urls.append(part.image_url.url)
                items.append({"type": "image"})
        out.append({"role": role, "content": items})
    return out, urls


def sampling_options(body: ChatCompletionRequest, pipe: Pipeline) -> dict[str, Any]:
    """The request's settings over the checkpoint's defaults (as `generate` uses them: greedy unless the checkpoint
    or the request says otherwise); no max_tokens: up to the context window."""
    options = dict(pipe.sampling_defaults)
    max_tokens = body.max_completion_tokens or body.max_tokens
    options["max_new_tokens"] = max_tokens or options.get("max_new_tokens", pipe.config.text.max_position_embeddings)
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    if body.stop:
        options["stop"] = list(body.stop)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if body.logprobs:
        options["logprobs"] = body.top_logprobs or 0
    return options


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of n samples with seed + i (within the seed's range): n choices differ, and stay reproducible."""
    if seed is None:
        return None
    value = seed + index
    return value - 2**64 if value >= 2**64 else value


def token_entry(pipe: Pipeline, token_id: int, logprob: float) -> dict[str, Any]:
    tokenizer = pipe.processor.tokenizer
    text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up=False)
    raw = tokenizer.backend.id_to_token(token_id) or ""
    if raw.startswith("\u2581") and not text.startswith(" "):  # sentencepiece drops a run's leading space
        text = " " + text
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", raw)
    return {"token": text, "logprob": logprob, "bytes": [int(byte.group(1), 16)] if byte else list(text.encode())}


def logprobs_content(pipe: Pipeline, entries) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        item = token_entry(pipe, e.token_id, e.logprob)
        item["top_logprobs"] = [token_entry(pipe, t, lp) for t, lp in e.top]
        out.append(item)
    return out


class Run:
    """One request's sequences on the engine, and a queue of their updates for the request's coroutine."""

    def __init__(self, seqs: list[Sequence], loop: asyncio.AbstractEventLoop):
        self.seqs = seqs
        self.updates: asyncio.Queue = asyncio.Queue()
        self.loop = loop
        self.sent_logprobs = [0] * len(seqs)
        for index, seq in enumerate(seqs):
            seq.listener = self._listener(index)

    def _listener(self, index: int):
        def on_step(seq: Sequence) -> None:  # the engine's thread: read the sequence here, hand out plain values
            piece = seq.take_text()
            logprobs = None
            if seq.logprobs is not None:
                logprobs = seq.logprobs[self.sent_logprobs[index] :]
                self.sent_logprobs[index] = len(seq.logprobs)
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (index, piece, logprobs, seq.done))
            if seq.done:
                seq.listener = None  # no cycle (sequence -> listener -> run -> sequence) keeps its tensors alive
        return on_step

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)


# -- the app ---------------------------------------------------------------------------------------------------------


def create_app(settings: ServeSettings, pipe: Pipeline | None = None) -> FastAPI:
    """The ASGI app. With `pipe`, it serves that pipeline at once; otherwise it loads `settings.model` on a thread
    at startup (/health answers 503 until it is ready)."""
    state = ServerState(settings)
    policy = settings.media_policy()
    # Image preprocessing on a few threads of its own: it is CPU-bound (more threads than cores do not help), and
    # every extra thread that runs it keeps its own allocator and OpenMP memory (a 40-thread pool grew the process
    # by 2 GB under a 32-client load)
    preprocessing = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="llava-next-preprocess")
    name = settings.name()

    def stats():
        return state.pipe.engine.cache_stats() if state.pipe else {c: {"hits": 0, "misses": 0}
                                                                    for c in ("image_features", "prefix")}

    metrics = ServerMetrics(lambda: state.engine.running if state.engine else 0,
                            lambda: state.engine.waiting if state.engine else 0, stats)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if pipe is not None:
            state.start(pipe)
        else:
            threading.Thread(target=state.load, name=LOAD_THREAD, daemon=True).start()
        yield
        if state.engine is not None:  # uvicorn has let in-flight responses finish (or timed out): cancel the rest
            await run_in_threadpool(state.engine.shutdown, True, 30)
        preprocessing.shutdown(wait=False)

    app = FastAPI(title="llava-next", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.state.metrics = metrics

    def rejected(request: Request, response: JSONResponse, message: str) -> JSONResponse:
        """A request answered with an error: counted, and logged in one line as every request is."""
        metrics.requests.labels(str(response.status_code)).inc()
        request_id = getattr(request.state, "request_id", None) or "-"
        log.info("%s %d %s %s: %s", request_id, response.status_code, request.method, printable_path(request), message)
        return response

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return rejected(request, e.response(), e.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors and (errors[0]["type"] == "json_invalid" or tuple(errors[0]["loc"]) == ("body",)):
            # the body as a whole: not JSON, or JSON but no object (or sent as a form, which is no JSON at all)
            where = errors[0]["loc"][-1]
            problem = errors[0].get("ctx", {}).get("error", "")
            message = f"the body is not valid JSON ({problem} at character {where})" if isinstance(where, int) else \
                "the body must be a JSON object"
            if "json" not in request.headers.get("content-type", ""):
                message += "; send it with the header 'Content-Type: application/json'"
            return rejected(request, error_response(400, message, "invalid_request_error"), message)
        problems: dict[str, list[str]] = {}  # where -> what is wrong there, in pydantic's order
        for where, msg in field_problems(errors):
            problems.setdefault(where, []).append(msg)
        message = "invalid request: " + "; ".join(f"{where}: {'; or '.join(msgs)}"
                                                  for where, msgs in list(problems.items())[:5])
        return rejected(request, error_response(400, message, "invalid_request_error",
                                                param=next(iter(problems), None)), message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":  # a path no route has
            message = f"no such path {printable_path(request)}; this server answers {ROUTES}"
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {printable_path(request)}"
        return rejected(request, error_response(e.status_code, message,
                                                ApiError.TYPES.get(e.status_code, "invalid_request_error")), message)

    @app.exception_handler(Exception)
    async def _fault(request: Request, e: Exception):
        request_id = getattr(request.state, "request_id", None) or new_id()
        log.exception("request %s failed", request_id)
        metrics.requests.labels("500").inc()
        return error_response(500, f"internal server error (request id {request_id}); the server log has the details",
                              "server_error")

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        if state.pipe is not None and state.engine is not None:
            return {"status": "ok"}
        body = {"status": "failed", "error": state.failure} if state.failure else {"status": "loading"}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("llava_next.serve").joinpath("static/index.html").read_text("utf-8"))

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "llava-next"}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(404, f"model {model_id!r} does not exist; this server serves {name!r}", code="model_not_found")
        return model_card()

    async def fetch_images(urls: list[str], single: bool = False) -> list:
        if len(urls) > settings.max_images:
            raise ApiError(413, f"the request has {len(urls)} images; this server takes at most {settings.max_images} "
                                "per request (--max-images)", code="too_many_images")
        images = []
        for i, url in enumerate(urls):
            try:
                images.append(await load_image_url(url, policy, "image" if single else f"image {i + 1}"))
            except MediaError as e:
                raise ApiError(e.status, str(e), code="invalid_image", param=f"image {i + 1}") from None
        return images

    @app.post("/v1/image_tokens", dependencies=[Depends(authorized)])
    async def image_tokens(body: ImageTokensRequest):
        pipe, _ = state.ready()
        image = (await fetch_images([body.image_url.url], single=True))[0]
        height, width = image.height, image.width
        return {"tokens": pipe.processor.image_tokens((height, width)), "width": width, "height": height}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        began = time.perf_counter()
        request_id = request.state.request_id = new_id()
        pipe, engine = state.ready()
        if body.model != name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {name!r}",
                           code="model_not_found", param="model")
        messages, urls = to_messages(body.messages)
        images = await fetch_images(urls)
        try:
            inputs = await asyncio.get_running_loop().run_in_executor(preprocessing, pipe.processor.chat_inputs,
                                                                      messages, images)
            params = sampling_params(sampling_options(body, pipe))
        except LlavaError as e:
            raise ApiError(400, str(e)) from None
        pixels = (inputs["pixel_values"], inputs.get("image_sizes")) if "pixel_values" in inputs else None
        prompt_ids = inputs["input_ids"][0].tolist()
        seqs = [Sequence(prompt_ids, params, IncrementalDetokenizer(pipe.processor.tokenizer), images=pixels,
                         seed=choice_seed(params.seed, i)) for i in range(body.n)]
        run = Run(seqs, asyncio.get_running_loop())
        try:
            engine.submit(seqs)
        except EngineBusy as e:
            raise ApiError(429, f"{e}; retry after a moment", code="server_busy", headers={"Retry-After": "1"}) from None
        except LlavaError as e:
            raise ApiError(400, str(e)) from None
        summary = {"id": request_id, "messages": messages if settings.log_prompts else None}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_chunks(run, pipe, engine, name, request_id, include_usage, began, summary),
                                     media_type="text/event-stream", headers={"X-Request-ID": request_id})
        try:
            while not run.done:
                try:
                    await asyncio.wait_for(run.updates.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        engine.cancel(seqs)
                        finish_log(summary, "disconnected", seqs, began, metrics)
                        return Response(status_code=499)
        finally:
            if not run.done:
                engine.cancel(seqs)
        failed = [s for s in seqs if s.finish_reason == "error"]
        if failed:
            raise failed[0].error  # a fault of the server's: logged with the request id, answered 500
        finish_log(summary, "200", seqs, began, metrics)
        choices = []
        for i, seq in enumerate(seqs):
            choice = {"index": i, "message": {"role": "assistant", "content": seq.text},
                      "finish_reason": seq.finish_reason, "logprobs": None}
            if seq.logprobs is not None:
                choice["logprobs"] = {"content": logprobs_content(pipe, seq.logprobs)}
            choices.append(choice)
        return JSONResponse({"id": request_id, "object": "chat.completion", "created": int(time.time()),
                             "model": name, "choices": choices, "usage": usage(seqs)},
                            headers={"X-Request-ID": request_id})

    async def stream_chunks(run: Run, pipe, engine, model_name, request_id, include_usage, began,
                            summary) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(choices, usage_=None) -> str:
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": choices}
            if include_usage:
                body["usage"] = usage_
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        status = "disconnected"
        try:
            for i in range(len(run.seqs)):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            finished = 0
            while finished < len(run.seqs):
                index, piece, logprobs, done = await run.updates.get()
                seq = run.seqs[index]
                if piece or logprobs:
                    lp = {"content": logprobs_content(pipe, logprobs)} if logprobs else None
                    yield chunk([{"index": index, "delta": {"content": piece}, "logprobs": lp, "finish_reason": None}])
                if done:
                    finished += 1
                    if seq.finish_reason == "error":
                        log.error("request %s: generation failed", request_id, exc_info=seq.error)
                        status = "500"
                        yield f"data: {json.dumps({'error': {'message': f'internal server error (request id {request_id})', 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
                        continue
                    yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": seq.finish_reason}])
            if include_usage:
                yield chunk([], usage(run.seqs))
            yield "data: [DONE]\n\n"
            status = "200" if status != "500" else status
        finally:
            if not run.done:  # the client went away: free the KV rows now
                engine.cancel(run.seqs)
            finish_log(summary, status, run.seqs, began, metrics)

    return BodyLimit(app, settings.max_body_bytes) if settings.max_body_bytes else app


ROUTES = "POST /v1/chat/completions, GET /v1/models, POST /v1/image_tokens, GET /health, GET /metrics and GET / " \
         "(the chat page)"


# the names pydantic gives the branches of the request's unions (content: str | list[ContentPart], stop: str | list)
UNION_BRANCHES = ("str", "list[ContentPart]", "list[str]")


def field_problems(errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """pydantic's errors as (messages[0].content[0].type, what is wrong), the branches of a union left out of the
    place (content's 'str' and 'list[ContentPart]'), and a branch that the value is not even the kind of (a string
    where a list was given, with errors inside the list) left out."""
    def place(loc) -> tuple:
        return tuple(p for p in loc if p != "body" and p not in UNION_BRANCHES)

    deeper = {place(e["loc"]) for e in errors if len(place(e["loc"])) > 0}
    kept = []
    for e in errors:
        where = place(e["loc"])
        if e["type"].endswith("_type") and any(other[:len(where)] == where and len(other) > len(where)
                                               for other in deeper):
            continue  # e.g. "should be a valid string" for a list that has its own errors inside
        text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in where).lstrip(".") or "body"
        kept.append((text, e["msg"]))
    return kept


def printable_path(request: Request) -> str:
    """The request's path for a log line or a message: escaped (a client's %0A must not start a log line of its
    own) and cut short."""
    path = request.url.path.encode("unicode_escape").decode("ascii")
    return path if len(path) <= 200 else path[:200] + "..."


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(seqs: list[Sequence]) -> dict[str, int]:
    prompt = seqs[0].prompt_tokens
    completion = sum(len(s.token_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_log(summary: dict[str, Any], status: str, seqs: list[Sequence], began: float, metrics: ServerMetrics) -> None:
    """The request's log line (no prompt text or image bytes unless --log-prompts) and its metrics."""
    elapsed = time.perf_counter() - began
    completion = sum(len(s.token_ids) for s in seqs)
    metrics.requests.labels(status).inc()
    metrics.request_seconds.observe(elapsed)
    if status == "200":
        metrics.prompt_tokens.inc(seqs[0].prompt_tokens)
        metrics.generated_tokens.inc(completion)
        for s in seqs:
            if s.first_token_at is not None:
                metrics.time_to_first_token.observe(s.first_token_at - s.submitted_at)
                if len(s.token_ids) > 1 and s.finished_at is not None:
                    metrics.time_per_output_token.observe((s.finished_at - s.first_token_at) / (len(s.token_ids) - 1))
    first = min((s.first_token_at for s in seqs if s.first_token_at), default=None)
    ttft = f"{first - seqs[0].submitted_at:.3f}s" if first else "-"
    line = (f"{summary['id']} {status} n={len(seqs)} prompt_tokens={seqs[0].prompt_tokens} "
            f"completion_tokens={completion} ttft={ttft} total={elapsed:.3f}s "
            f"finish={','.join(s.finish_reason for s in seqs)}")
    if summary.get("messages") is not None:
        line += " messages=" + json.dumps(summary["messages"], ensure_ascii=False)
    log.info(line)


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """The server's sockets, bound before the model loads: a port in use is one clear error, and no load is started
    only to be thrown away (uvicorn binds after the app's startup). One for each address `host` names, as asyncio's
    create_server binds them (localhost: 127.0.0.1 and, where the system says so, ::1), IPv6 ones IPv6-only."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, OverflowError) as e:
        raise LlavaError(f"cannot listen on {host}:{port}: {e}; check --host and --port") from None
    sockets: list[socket.socket] = []
    for family, address in dict.fromkeys((family, address) for family, _, _, _, address in infos):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as e:
            for s in sockets:
                s.close()
            hint = "pick another --port, or stop what listens there" if e.errno == errno.EADDRINUSE else \
                "check --host (an address of this machine) and --port"
            raise LlavaError(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from None
    return sockets


def serve(settings: ServeSettings) -> None:
    """Runs the server until SIGINT/SIGTERM; in-flight requests get `shutdown_timeout` seconds to finish."""
    import uvicorn

    sockets = listening_sockets(settings.host, settings.port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=30, access_log=False))
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        log.info("listening on http://%s:%d (the chat page at /, the API at /v1; Ctrl-C stops)",
                 f"[{host}]" if ":" in host else host, port)
    interrupted = False
    try:
        server.run(sockets=sockets)  # uvicorn re-raises the signal that stopped it: Ctrl-C as KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for sock in sockets:
            sock.close()
    if any(t.name == LOAD_THREAD and t.is_alive() for t in threading.enumerate()):
        # Stopped while the model was still loading: letting the interpreter finalize under a thread that is
        # inside torch aborts the process ("terminate called without an active exception"); leave at once.
        log.info("stopped while %s was loading", settings.model)
        logging.shutdown()
        os._exit(130 if interrupted else 0)
    if interrupted:
        raise KeyboardInterrupt
    if not server.started:
        raise LlavaError("the server did not start; the log above says why")
