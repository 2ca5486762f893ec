"""Starting the server in-process for tests: uvicorn on a free localhost port, on a thread of its own."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from llava_next.serve.app import ServeSettings, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model, **options) -> Iterator[str]:
    """The base URL (http://127.0.0.1:PORT) of a server for `model`: a loaded Pipeline (served at once) or a
    model name or path (loaded by the server, as `llava-next serve` does). `options` are ServeSettings fields."""
    from llava_next.pipeline import Pipeline

    pipe = model if isinstance(model, Pipeline) else None
    settings = ServeSettings(model=str(pipe.directory) if pipe else str(model), **options)
    app = create_app(settings, pipe)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
