"""What the server tests share: a real uvicorn server on a free port in a thread, a pool-and-server
context for a module's fixtures, the official client pointed at it, and the error-shape checks."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx2 as httpx  # the HTTP client the openai package itself ships with
import openai
import uvicorn

from gguf_factory.serve import ModelPool, create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app: object) -> Iterator[str]:
    """Run ``app`` in uvicorn on a free port in a background thread; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def wait_until_up(proc: subprocess.Popen, url: str, timeout: float = 60) -> None:
    """Wait for a ``gguf-factory serve`` child to answer ``/health`` with 200; fail with its output if it
    exits first, or when ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(out.decode() if isinstance(out, bytes) else out)
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health").status_code == 200:
                return
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)


@contextlib.contextmanager
def pool_of(specs: Mapping[str, Path], **pool_options: Any) -> Iterator[ModelPool]:
    """A model pool over ``specs`` (queue timeout 30 s unless given), closed afterwards."""
    pool = ModelPool(dict(specs), **{"queue_timeout": 30, **pool_options})
    try:
        yield pool
    finally:
        pool.close()


@contextlib.contextmanager
def serving(pool: ModelPool, **app_options: Any) -> Iterator[str]:
    """``create_app(pool, **app_options)`` running; yields its base URL."""
    with running(create_app(pool, **app_options)) as url:
        yield url


def client_of(url: str, api_key: str | None = None, timeout: float = 60) -> openai.OpenAI:
    """The official client on ``url`` (no retries: a failure shows as it happened)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=timeout)


def assert_error(r: httpx.Response, status: int, *, code: str | None = None, says: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["message"] and says.lower() in err["message"].lower(), err
    if code is not None:
        assert err["code"] == code, err
    return err


def assert_idle_soon(pool: ModelPool) -> None:
    """A stream hands its model back just after its last event: allow the server a moment."""
    deadline = time.monotonic() + 10
    while pool.status()[0]["busy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.status()[0]["busy"] is False, "the model must be handed back"
