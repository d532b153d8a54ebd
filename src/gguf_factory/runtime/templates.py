"""Chat templates rendered only in a bounded way: in Jinja's sandbox, in worker processes with a time,
CPU and memory limit, never in the calling process.

Why a worker and not the calling process: a chat template is code from the GGUF. Jinja's sandbox stops
it from reaching Python internals but not from looping (``{% for i in range(100000) %}{% for j in
range(100000) %}``), from doubling a string thirty times, or from recursing; and a template that passes a
check on sample conversations can still be made to loop by a crafted message. Only another process can
be stopped at any point: the worker (:mod:`.template_worker`, started once per process as a plain
script, ~50 ms) renders each request, the caller waits at most ``timeout`` seconds, and a worker that
runs over is killed and replaced. A render costs one pipe round trip (about 0.2 ms, see
benchmarks/hardening.py) on top of the render itself.

Every entry point goes through here: :func:`check_template` (the probe conversations ``validate`` uses;
run when a model loads, cached by template text), :func:`render_chat` and :class:`ChatTemplate` (any
later render: chat, generate, serve, eval, imatrix), :class:`BoundedChatFormatter` (llama-cpp-python's
chat handler for ``create_chat_completion``), :func:`render_calls` (many renders of one template in one
request: the Ollama export's probes).
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TemplateError, TemplateRefusedError

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("template_worker.py")
RENDER_TIMEOUT = 5.0  # seconds for one request to the worker (any number of renders of one template)
CHECK_TIMEOUT = 3.0  # seconds for the probe conversations (validate's default)
MAX_RENDER_CHARS = 8_000_000  # a prompt this long is far over any context; the worker stops there
CHECK_MAX_CHARS = 1_000_000  # the probes are three short conversations
WORKER_MEMORY_BYTES = 256 << 20  # address space a worker may add to what it uses at start (POSIX)
MAX_WORKERS = 4
STARTUP_TIMEOUT = 30.0  # a cold interpreter on a loaded machine

SAMPLE_USER = "What is the capital of France?"
SAMPLE_ASSISTANT = "Paris is the capital of France."
PROBE_CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": SAMPLE_USER},
        {"role": "assistant", "content": SAMPLE_ASSISTANT},
        {"role": "user", "content": SAMPLE_USER},
    ],
    [
        {"role": "user", "content": SAMPLE_USER},
        {"role": "assistant", "content": SAMPLE_ASSISTANT},
        {"role": "user", "content": SAMPLE_USER},
    ],
    [{"role": "user", "content": SAMPLE_USER}],
]
# problems that make a template unusable: a model carrying one is refused when it loads
FATAL_CODES = frozenset(
    {"template-syntax-error", "template-unsafe", "template-timeout", "template-render-error"}
)


# ---------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------


class _WorkerTimeout(Exception):
    pass


class _WorkerDied(Exception):
    pass


class _WorkerStartError(Exception):
    pass


class _Worker:
    """One worker process and a reader thread that queues its reply lines (portable: no select on pipes)."""

    def __init__(self, memory_bytes: int):
        cmd = [sys.executable, "-P", str(WORKER_SCRIPT), str(memory_bytes)]
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            creationflags=flags,
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, name="template-worker-reader", daemon=True).start()
        ready = self._reply(STARTUP_TIMEOUT)
        if not ready.get("ready"):
            self.kill()
            raise _WorkerDied("the template worker did not start")

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in stdout:
                self._lines.put(line)
        self._lines.put(None)

    def _reply(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise _WorkerTimeout from None
        if line is None:
            self.kill()
            raise _WorkerDied(f"exit code {self.proc.returncode}")
        return dict(json.loads(line))

    def request(self, req: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        data = json.dumps(req).encode("utf-8") + b"\n"
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(data)
            stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            self.kill()
            raise _WorkerDied(f"exit code {self.proc.returncode}") from None
        return self._reply(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if f is not None:
                    f.close()


class WorkerPool:
    """Up to ``max_workers`` template workers, started on demand and reused; one request each at a time."""

    def __init__(self, max_workers: int = MAX_WORKERS, memory_bytes: int = WORKER_MEMORY_BYTES):
        self.max_workers = max_workers
        self.memory_bytes = memory_bytes
        self._idle: list[_Worker] = []
        self._count = 0
        self._cond = threading.Condition()
        self._pid = os.getpid()
        self.started = 0  # workers started so far (a killed one is replaced)

    def call(self, req: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        worker = self._acquire()
        keep = False
        try:
            reply = worker.request(req, timeout)
            keep = not reply.get("recycle")
            return reply
        finally:
            self._release(worker, keep)

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                while self._idle:
                    w = self._idle.pop()
                    if w.alive:
                        return w
                    self._count -= 1
                if self._count < self.max_workers:
                    self._count += 1
                    break
                self._cond.wait()
        try:
            w = _Worker(self.memory_bytes)
        except (_WorkerTimeout, _WorkerDied, OSError) as e:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            why = "no reply" if isinstance(e, _WorkerTimeout) else str(e) or type(e).__name__
            raise _WorkerStartError(f"{sys.executable} -P {WORKER_SCRIPT.name}: {why}") from None
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise
        self.started += 1
        return w

    def _release(self, worker: _Worker, keep: bool) -> None:
        if not (keep and worker.alive):
            worker.kill()
        with self._cond:
            if keep and worker.alive:
                self._idle.append(worker)
            else:
                self._count -= 1
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._count -= len(idle)
        for w in idle:
            w.kill()


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def worker_pool() -> WorkerPool:
    """The process's template workers (a forked child gets a pool of its own)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._pid != os.getpid():
            _pool = WorkerPool()
        return _pool


@atexit.register
def _close_pool() -> None:
    if _pool is not None and _pool._pid == os.getpid():
        _pool.close()


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """What the worker made of one request: the parse outcome and one (status, text) per call."""

    parse_status: str  # ok | syntax | unsafe
    parse_detail: str
    results: list[tuple[str, str]]


def render_calls(
    source: str,
    calls: Sequence[Mapping[str, Any]],
    *,
    timeout: float = RENDER_TIMEOUT,
    max_chars: int = MAX_RENDER_CHARS,
) -> Rendered:
    """Render ``source`` once per variables mapping in ``calls``, in a worker, within ``timeout`` seconds.

    Raises :class:`TemplateError` when the worker runs out of time or dies (memory, CPU limit); every
    other outcome is reported in the result (see :mod:`.template_worker` for the status codes).
    """
    req = {
        "source": source,
        "calls": [dict(c) for c in calls],
        "max_chars": max_chars,
        "cpu_seconds": timeout,
    }
    try:
        reply = worker_pool().call(req, timeout)
    except _WorkerStartError as e:
        raise TemplateError(f"could not start the chat-template worker process ({e})") from None
    except _WorkerTimeout:
        raise TemplateError(f"the chat template did not finish rendering within {timeout:g} s") from None
    except _WorkerDied as e:
        raise TemplateError(
            f"the chat template's rendering process died ({e}: memory or CPU limit)"
        ) from None
    if reply.get("error"):
        raise TemplateError(f"the chat template could not be rendered: {reply['error']}")
    status, detail = reply.get("parse") or ("ok", "")
    results = [(str(s), str(t)) for s, t in reply.get("results", [])]
    return Rendered(str(status), str(detail), results)


def _raise_for(status: str, detail: str) -> None:
    if status == "raised":
        raise TemplateRefusedError(f"the chat template refused the conversation: {detail}")
    if status == "unsafe":
        raise TemplateError(f"the sandbox blocked the chat template: {detail}")
    if status == "too-large":
        raise TemplateError(f"the chat template's output is too large: {detail}")
    if status == "memory":
        raise TemplateError("the chat template ran out of memory while rendering")
    raise TemplateError(f"the chat template failed to render: {detail}")


def _check_parse(r: Rendered) -> None:
    if r.parse_status == "syntax":
        raise TemplateError(f"the chat template does not parse: {r.parse_detail}")
    if r.parse_status == "unsafe":
        raise TemplateError(f"the chat template reaches for Python internals: {r.parse_detail}")


def render_many(
    source: str,
    calls: Sequence[Mapping[str, Any]],
    *,
    timeout: float = RENDER_TIMEOUT,
    max_chars: int = MAX_RENDER_CHARS,
) -> list[str | TemplateError]:
    """Each render's text, or the :class:`TemplateError` (refusals: :class:`TemplateRefusedError`) it
    ended with. Raises when the template does not parse, reaches out of the sandbox, or the worker runs
    out of time or dies."""
    r = render_calls(source, calls, timeout=timeout, max_chars=max_chars)
    _check_parse(r)
    out: list[str | TemplateError] = []
    for status, text in r.results:
        if status == "ok":
            out.append(text)
            continue
        try:
            _raise_for(status, text)
        except TemplateError as e:
            out.append(e)
    return out


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    timeout: float = RENDER_TIMEOUT,
    max_chars: int = MAX_RENDER_CHARS,
    **extra: Any,
) -> str:
    """``messages`` through the chat template, bounded. Raises :class:`TemplateError`."""
    variables = {
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
        "bos_token": bos_token,
        "eos_token": eos_token,
        **extra,
    }
    [result] = render_many(source, [variables], timeout=timeout, max_chars=max_chars)
    if isinstance(result, TemplateError):
        raise result
    return result


class ChatTemplate:
    """A model's chat template with its BOS/EOS text, rendered the way transformers' and
    llama-cpp-python's chat templates render, always bounded (a worker, a time and output limit).

    Checked on the probe conversations when made (``check=False`` skips that); after one render runs out
    of time, every later one fails at once instead of waiting again.
    """

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        *,
        timeout: float = RENDER_TIMEOUT,
        check: bool = True,
        where: str = "the model",
    ):
        self.source, self.bos_token, self.eos_token, self.timeout = source, bos_token, eos_token, timeout
        self._broken: TemplateError | None = None
        if check:
            require_safe_template(source, where, bos_token or "<s>", eos_token or "</s>")

    def _variables(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool
    ) -> dict[str, Any]:
        return {
            "messages": [dict(m) for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        [out] = self.render_many([(messages, add_generation_prompt)])
        if isinstance(out, TemplateError):
            raise out
        return out

    def render_many(
        self, items: Sequence[tuple[Sequence[Mapping[str, Any]], bool]]
    ) -> list[str | TemplateError]:
        """Many renders in one request to the worker (one round trip)."""
        if self._broken is not None:
            raise self._broken
        try:
            return render_many(self.source, [self._variables(m, g) for m, g in items], timeout=self.timeout)
        except TemplateError as e:
            self._broken = e
            raise


# ---------------------------------------------------------------------------------------------------
# the check on probe conversations (validate, and every model load)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateProblem:
    code: str  # template-unsafe | template-syntax-error | template-render-error | template-timeout | ...
    message: str

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


def check_template(
    source: str, bos: str = "<s>", eos: str = "</s>", timeout: float = CHECK_TIMEOUT
) -> list[TemplateProblem]:
    """Problems with a chat template (empty list: it parses, looks safe and renders a conversation that
    contains the user's message), from renders of :data:`PROBE_CONVERSATIONS` in a worker."""
    if not source.strip():
        return [TemplateProblem("template-empty", "the chat template is empty")]
    calls = [
        {"messages": m, "add_generation_prompt": True, "bos_token": bos, "eos_token": eos, "tools": None}
        for m in PROBE_CONVERSATIONS
    ]
    try:
        r = render_calls(source, calls, timeout=timeout, max_chars=CHECK_MAX_CHARS)
    except TemplateError as e:
        if "did not finish" in str(e):
            return [TemplateProblem("template-timeout", f"rendering did not finish within {timeout:g} s")]
        return [TemplateProblem("template-render-error", str(e))]
    if r.parse_status == "syntax":
        return [TemplateProblem("template-syntax-error", r.parse_detail)]
    if r.parse_status == "unsafe":
        return [
            TemplateProblem(
                "template-unsafe", f"the chat template reaches for Python internals: {r.parse_detail}"
            )
        ]
    refused = "no conversation rendered"
    for status, text in r.results:
        if status == "raised":
            refused = text
            continue
        if status == "unsafe":
            return [TemplateProblem("template-unsafe", f"the sandbox blocked the template: {text}")]
        if status == "memory":
            return [TemplateProblem("template-render-error", "ran out of memory")]
        if status != "ok":
            return [TemplateProblem("template-render-error", text)]
        if SAMPLE_USER not in text:
            return [
                TemplateProblem(
                    "template-ignores-messages",
                    f"the rendered prompt does not contain the user's message: {text[:200]!r}",
                )
            ]
        return []
    return [
        TemplateProblem("template-render-error", f"raise_exception() on every sample conversation: {refused}")
    ]


_checked: dict[str, list[TemplateProblem]] = {}
_checked_lock = threading.Lock()


def require_safe_template(source: str, where: str, bos: str = "<s>", eos: str = "</s>") -> None:
    """Raise :class:`TemplateError` naming ``where`` when :func:`check_template` finds a fatal problem.

    Results are cached by template text for the life of the process (a model evicted and loaded again is
    not checked twice)."""
    key = hashlib.sha256("\0".join((source, bos, eos)).encode("utf-8", "surrogatepass")).hexdigest()
    with _checked_lock:
        problems = _checked.get(key)
    if problems is None:
        problems = check_template(source, bos, eos)
        if not any(p.code == "template-timeout" for p in problems):  # a loaded machine may time out once
            with _checked_lock:
                _checked[key] = problems
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise TemplateError(f"{where}: chat template refused ({fatal[0].code}): {fatal[0].message}")


# ---------------------------------------------------------------------------------------------------
# llama-cpp-python's chat handler, rendering through the worker
# ---------------------------------------------------------------------------------------------------

_cancel: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("_cancel", default=None)


@contextlib.contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """While inside, a chat completion started in this thread stops at the next token once ``event`` is
    set (the server sets it when a client disconnects)."""
    token = _cancel.set(event)
    try:
        yield
    finally:
        _cancel.reset(token)


def cancel_requested() -> bool:
    """True once the event of the enclosing :func:`cancellable` is set (a stopping criterion for
    llama-cpp-python's completions)."""
    event = _cancel.get()
    return event is not None and event.is_set()


class BoundedChatFormatter:
    """llama-cpp-python's chat-formatter protocol, as its ``Jinja2ChatFormatter`` implements it (same
    variables, stop string and stop token), with the render done by :func:`render_chat`.

    Keeps the last render: the server counts a prompt's tokens and then generates from the same messages.
    """

    def __init__(
        self,
        template: str,
        eos_token: str,
        bos_token: str,
        stop_token_ids: Sequence[int] = (),
        add_generation_prompt: bool = True,
        timeout: float = RENDER_TIMEOUT,
    ):
        self.template, self.eos_token, self.bos_token = template, eos_token, bos_token
        self.stop_token_ids = set(stop_token_ids)
        self.add_generation_prompt = add_generation_prompt
        self.timeout = timeout
        self._last: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def render(self, messages: Sequence[Mapping[str, Any]], **variables: Any) -> str:
        full = {
            "messages": [dict(m) for m in messages],
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "add_generation_prompt": self.add_generation_prompt,
            **variables,
        }
        key = json.dumps(full, sort_keys=True, default=str)
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
        [out] = render_many(self.template, [full], timeout=self.timeout)
        if isinstance(out, TemplateError):
            raise out
        with self._lock:
            self._last = (key, out)
        return out

    def __call__(
        self,
        *,
        messages: Sequence[Mapping[str, Any]],
        functions: Any = None,
        function_call: Any = None,
        tools: Any = None,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Any:
        from llama_cpp import llama
        from llama_cpp.llama_chat_format import ChatFormatterResponse

        prompt = self.render(
            messages,
            functions=functions,
            function_call=function_call,
            tools=tools,
            tool_choice=tool_choice,
            **kwargs,
        )
        stop_ids = self.stop_token_ids
        cancel = _cancel.get()

        def stop(tokens: Any, logits: Any) -> bool:
            return bool((stop_ids and tokens[-1] in stop_ids) or (cancel is not None and cancel.is_set()))

        return ChatFormatterResponse(
            prompt=prompt,
            stop=[self.eos_token],
            stopping_criteria=llama.StoppingCriteriaList([stop]),
            added_special=True,
        )
