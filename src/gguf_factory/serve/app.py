"""OpenAI-compatible HTTP API (FastAPI) over a :class:`~gguf_factory.serve.pool.ModelPool`.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON or server-sent events),
``POST /v1/embeddings`` (mean-pooled, L2-normalized: llama.cpp's embedding mode on the same loaded model),
``GET /v1/models``, ``GET /health``. Errors use OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``. Generation runs llama.cpp through llama-cpp-python with the GGUF's own chat template, and the
same defaults as :class:`gguf_factory.runtime.GenerationSettings`, so a reply equals ``runtime.chat``'s.

Hostile input stays bounded: a body over ``max_body_bytes`` gets a 413 before it is read; the Host header
must name this server (loopback names, IP addresses, ``allowed_hosts``: no DNS rebinding); a prompt whose
byte length alone proves it too long is refused before it is tokenized; chat templates render in a
bounded worker (:mod:`gguf_factory.runtime.templates`), a template that fails is a JSON error and the
model is handed back; a non-streaming generation stops when its client disconnects; text that is not
valid Unicode and an empty prompt are 400s.

Tools (:mod:`.tools`): ``tools`` / ``tool_choice`` (``none``, ``auto``, ``required``, a named function)
through the model's own chat template (or a system message when the template has no tool support),
replies in OpenAI's ``tool_calls`` shape, ``tool`` messages in the history. Streamed as generated (through
the one SSE path): text as ``content`` deltas as soon as it cannot start a call, a call's first delta as
soon as its name is complete, then its arguments' text in fragments (:class:`.tools.CallReader`).

Constrained output (:mod:`.structured`): ``response_format`` ``{"type": "json_object"}`` and
``{"type": "json_schema", "json_schema": {"schema": ...}}``, and the ``grammar`` extension (GBNF, as
llama.cpp's server takes it), sample every token under a llama.cpp grammar; a schema keyword the grammar
could not enforce is a 400 naming it.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from ..errors import FactoryError, InputError, TemplateError, TemplateRefusedError
from ..router import AUTO, RouteDecision, Router
from ..runtime import ChatModel, GenerationSettings
from ..runtime.templates import cancel_requested, cancellable
from .generation import chat_completion, prompt_tokens
from .generation import render as render_prompt
from .pool import Lease, ModelPool, PoolBusyError, UnknownModelError
from .structured import BadField, Constraint, check_grammar, constraint_for
from .tools import CallReader, ToolPlan, plan_tools, template_tags_calls, with_tool_calls
from .tools import prepare as prepare_tools

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 1024
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more text than any small model's context holds
MAX_WAITING = 256  # requests blocked waiting for a model at once; more wait (without a thread) for a slot
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host header names accepted by default: a page on another site cannot reach a loopback server through
DNS rebinding, because its requests carry that site's name in Host."""


# --- errors ---------------------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(error_body(self.message, self.type, self.code, self.param), self.status, headers)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- request bodies -------------------------------------------------------------------------------
def _utf8(text: str) -> str:
    """Text that UTF-8 can encode: JSON allows a lone surrogate escape (\\ud800), llama.cpp cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text: a lone surrogate (\\u{ord(text[e.start]):04x})") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class FunctionCall(_Body):
    name: Text
    arguments: Text | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None  # None: an assistant message that only calls tools
    tool_calls: list[ToolCall] | None = None  # an assistant's calls (history)
    tool_call_id: Text | None = None  # a tool message: the call it answers
    name: Text | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        text = content if isinstance(content, str) or content is None else "".join(p.text for p in content)
        if text is None and not self.tool_calls:
            raise ApiError(400, f"a message with role {self.role!r} needs content", param="messages")
        out: dict[str, Any] = {"role": self.role, "content": text if text is not None else ""}
        if self.tool_calls:
            out["content"] = text
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        if self.role == "tool":
            if not self.tool_call_id:
                raise ApiError(400, "a tool message needs the tool_call_id it answers", param="messages")
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out

    @property
    def is_tool_history(self) -> bool:
        return self.role == "tool" or bool(self.tool_calls)


class StreamOptions(_Body):
    include_usage: bool = False


class _Options(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # llama.cpp extras, as llama.cpp's own server takes them
    repeat_penalty: float | None = Field(None, gt=0)
    stop: Text | list[Text] | None = None
    seed: int | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id → bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    response_format: dict[str, Any] | None = None  # text | json_object | json_schema (structured.py)
    grammar: Text | None = None  # llama.cpp's extension: a GBNF grammar for the reply


class ChatRequest(_Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens
    tools: Any = None  # tools.py
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionRequest(_Options):
    prompt: Text | list[Text]


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on inputs per request


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Text | list[Text] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


# --- streaming ------------------------------------------------------------------------------------
_END = object()


async def _in_threads(items: Iterator[Any]) -> AsyncIterator[Any]:
    """Iterate a blocking iterator in worker threads; on cancellation (client gone) the current step
    finishes, then the iterator is closed so llama.cpp stops generating."""
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, items, _END)
            if item is _END:
                return
            yield item
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


class _LeasedStream(StreamingResponse):
    """An SSE response that hands its model back to the pool however the stream ends."""

    def __init__(self, events: Iterator[str], lease: Lease):
        super().__init__(
            _in_threads(events),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            finally:
                self._lease.release()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


ROUTE_HEADER = "X-Route"
"""Response header naming the domain a routed request went to, the rule, and the confidence."""


# --- the app --------------------------------------------------------------------------------------
def create_app(
    pool: ModelPool,
    *,
    api_key: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_prompt_tokens: int | None = None,
    router: Router | None = None,
    web_ui: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allowed_hosts: Sequence[str] | None = None,
    max_queue: int | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving ``pool``'s models.

    ``router``: the pool's ids are its domains; ``"model": "auto"`` routes each request by the text of its
    last user message (or prompt), and every reply says where it went in the ``X-Route`` header.

    ``api_key``: when set, every ``/v1`` request must send ``Authorization: Bearer <api_key>`` (and
    ``/health`` details the models only for such a request); an empty key is refused.
    ``max_tokens_limit``: largest ``max_tokens`` a request may ask for (also the default).
    ``max_prompt_tokens``: longest prompt accepted, in tokens (the model's context always applies).
    ``web_ui``: serve the chat page (serve/web) at ``/``.
    ``max_body_bytes``: larger request bodies are refused with 413 before they are read.
    ``allowed_hosts``: Host header names accepted (default: the loopback names; ``"*"`` accepts any; a
    pattern may start with ``*.``): the defence against DNS rebinding of a local server.
    ``max_queue``: requests that may wait for a busy model at once; more get a 503 (``queue_full``) at
    once instead of waiting (default: no limit but the queue timeout).
    """
    if api_key is not None and not api_key.strip():
        raise InputError("the API key is empty: give a non-empty key, or none to serve without one")
    if max_body_bytes <= 0:
        raise InputError(f"max_body_bytes must be positive, got {max_body_bytes}")
    app = FastAPI(title="gguf-factory", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    server = _Server(pool, api_key, max_tokens_limit, max_prompt_tokens, router, max_queue)
    _add_error_handlers(app)
    _add_model_routes(app, server)
    _add_generation_routes(app, server)
    _add_embedding_routes(app, server)
    if web_ui:  # the web chat page (serve/web)
        from .web import add_web_routes

        add_web_routes(app)
    hosts = list(allowed_hosts) if allowed_hosts is not None else list(LOOPBACK_HOSTS)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(HostCheck, allowed=hosts)  # outermost: checked first
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers with, in OpenAI's shape (:class:`ApiError`)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems, param = [], None
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            if err.get("type") == "json_invalid":
                problems.append(f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg'))}")
                continue
            where = ".".join(loc) or "body"
            param = param or where
            problems.append(f"{where}: {err.get('msg')}")
        return ApiError(400, "; ".join(problems) or "invalid request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return ApiError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(FactoryError)
    async def _factory(_: Request, e: FactoryError) -> JSONResponse:
        return _factory_error(e).response()

    @app.exception_handler(UnicodeError)
    async def _unicode(_: Request, e: UnicodeError) -> JSONResponse:  # text llama.cpp cannot take
        return ApiError(400, f"the request holds text that is not valid Unicode: {e}").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


def _add_model_routes(app: FastAPI, server: _Server) -> None:
    """``GET /health``, ``GET /v1/models`` and ``GET /v1/models/{model_id}``."""
    pool, router = server.pool, server.router

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        if not server.key_matches(request):  # alive, and nothing about what is served, without the key
            return {"status": "ok"}
        models = [
            {**{k: v for k, v in m.items() if k not in ("path", "adapter")}, "file": _name(m["path"])}
            | ({"adapter_file": _name(m["adapter"])} if m.get("adapter") else {})
            for m in pool.status()
        ]
        return {
            "status": "ok",
            "models": models,
            "memory": {"budget_bytes": pool.budget_bytes, "used_bytes": pool.used_bytes},
        }

    @app.get("/v1/models", dependencies=[Depends(server.check_key)])
    def list_models() -> dict[str, Any]:
        cards = [_model_card(pool, i) for i in pool.ids()]
        if router is not None:
            cards.insert(0, {"id": AUTO, "object": "model", "created": 0, "owned_by": "gguf-factory"})
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(server.check_key)])
    def get_model(model_id: str) -> dict[str, Any]:
        if router is not None and model_id == AUTO:
            return {"id": AUTO, "object": "model", "created": 0, "owned_by": "gguf-factory"}
        return _model_card(pool, server.resolve_model(model_id))


def _add_generation_routes(app: FastAPI, server: _Server) -> None:
    """``POST /v1/chat/completions`` and ``POST /v1/completions``."""

    @app.post("/v1/chat/completions", dependencies=[Depends(server.check_key)], response_model=None)
    async def chat_completions(request: Request, req: ChatRequest) -> JSONResponse | StreamingResponse:
        constraint = _constraint_of(req)
        try:
            plan = plan_tools(req.tools, req.tool_choice, req.functions, req.function_call)
        except BadField as e:
            raise ApiError(400, str(e), param=e.param) from None
        if plan is not None and constraint is not None and plan.choice != "auto":
            raise ApiError(
                400, "response_format: a required tool call has its own grammar", param="response_format"
            )
        messages = [m.as_dict() for m in req.messages]
        model_id, decision = server.pick_model(req.model, lambda: _routing_text(messages))
        max_tokens = server.max_tokens(req.max_completion_tokens or req.max_tokens)
        if plan is None and constraint is None and not any(m.is_tool_history for m in req.messages):
            kind = _plain_chat_kind(messages)
        else:
            kind = _rendered_chat_kind(messages, plan, constraint)
        return await server.serve_request(request, req, model_id, max_tokens, kind, decision)

    @app.post("/v1/completions", dependencies=[Depends(server.check_key)], response_model=None)
    async def completions(request: Request, req: CompletionRequest) -> JSONResponse | StreamingResponse:
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt: give one prompt per request", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        if not prompt:
            raise ApiError(400, "prompt is empty: give the text to continue", param="prompt")
        constraint = _constraint_of(req)
        model_id, decision = server.pick_model(req.model, lambda: prompt)
        max_tokens = server.max_tokens(req.max_tokens)
        kind = _completion_kind(prompt, constraint)
        return await server.serve_request(request, req, model_id, max_tokens, kind, decision)


def _add_embedding_routes(app: FastAPI, server: _Server) -> None:
    """``POST /v1/embeddings``."""

    @app.post("/v1/embeddings", dependencies=[Depends(server.check_key)], response_model=None)
    async def embeddings(req: EmbeddingRequest) -> JSONResponse:
        """Mean-pooled, L2-normalized embeddings from llama.cpp's embedding mode, on the pool's model."""
        inputs = _embedding_inputs(req)
        texts = [x for x in inputs if isinstance(x, str)]
        model_id, decision = server.pick_model(req.model, lambda: " ".join(texts[:1]) or "")
        lease = await server.acquire(model_id)
        try:
            vectors, n_tokens = await anyio.to_thread.run_sync(
                server.embed, lease.model, model_id, inputs, req
            )
        finally:
            lease.release()
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                    if req.encoding_format == "base64"
                    else v.tolist()
                ),
            }
            for i, v in enumerate(vectors)
        ]
        resp = _json(
            {
                "object": "list",
                "data": data,
                "model": model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        )
        _set_route_header(resp, decision)
        return resp


@dataclass(eq=False)  # one per app: compared and hashed by identity
class _Server:
    """What the routes of one app share: its pool, the limits :func:`create_app` was given, and the queue of
    requests waiting for a busy model.

    Requests waiting for a busy model block in threads of their own (``waiting``), so that a queue, however
    long, never takes the worker threads the running generation (and its stream) needs."""

    pool: ModelPool
    api_key: str | None
    max_tokens_limit: int
    max_prompt_tokens: int | None
    router: Router | None
    max_queue: int | None
    waiting: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(MAX_WAITING))
    queued: int = 0
    """Requests waiting for a model now (changed on the event loop only)."""

    # --- auth ---
    def key_matches(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.api_key.encode())

    async def check_key(self, request: Request) -> None:  # async: no thread hop for a header check
        if self.key_matches(request):
            return
        if not request.headers.get("authorization"):
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        raise ApiError(401, "invalid API key", code="invalid_api_key")

    # --- models ---
    async def acquire(self, model_id: str) -> Lease:
        lease = self.pool.try_acquire(model_id)  # the common case: loaded and idle, no thread needed
        if lease is not None:
            return lease
        if self.max_queue is not None and self.queued >= self.max_queue:
            raise ApiError(
                503,
                f"model {model_id!r} is busy and {self.queued} requests already wait for it: try again later",
                type="server_error",
                code="queue_full",
            )
        got: list[Lease] = []

        def wait() -> Lease:
            got.append(self.pool.acquire(model_id))
            return got[0]

        self.queued += 1
        try:
            return await anyio.to_thread.run_sync(wait, limiter=self.waiting)
        except BaseException:  # cancelled after the wait succeeded: hand the model back
            for lease in got:
                lease.release()
            raise
        finally:
            self.queued -= 1

    def pick_model(self, name: str | None, text: Callable[[], str]) -> tuple[str, RouteDecision | None]:
        """The model a request names, or with a router and "auto" (or no name), the routed domain."""
        if self.router is not None and name in (None, "", AUTO):
            decision = self.router.route(text())
            log.info("routed to %s (%s, %.2f)", decision.domain, decision.rule, decision.confidence)
            return decision.domain, decision
        return self.resolve_model(name), None

    def resolve_model(self, name: str | None) -> str:
        ids = self.pool.ids()
        if name in (None, "", "auto"):
            if len(ids) == 1:
                return ids[0]
            raise ApiError(400, f"name a model: one of {', '.join(ids)}", param="model")
        if name in ids:
            return name
        if name.endswith(".gguf") and name[: -len(".gguf")] in ids:
            return name[: -len(".gguf")]
        raise ApiError(
            404,
            f"the model {name!r} does not exist on this server (it serves: {', '.join(ids)})",
            type="not_found_error",
            code="model_not_found",
            param="model",
        )

    # --- limits ---
    def max_tokens(self, requested: int | None) -> int:
        if requested is None:
            return self.max_tokens_limit
        if requested > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {requested}, over this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return requested

    def prompt_budget(self, n_ctx: int) -> int:
        return min(n_ctx - 1, self.max_prompt_tokens) if self.max_prompt_tokens is not None else n_ctx - 1

    def check_prompt_bytes(self, model: ChatModel, text: str, model_id: str) -> None:
        """Refuse a prompt that cannot fit before tokenizing it: no token of the vocabulary is longer than
        ``max_token_bytes`` bytes, so a longer text has more tokens than the budget."""
        n_bytes = len(text.encode("utf-8"))
        least = -(-n_bytes // max_token_bytes(model))  # tokens it has at the very least
        if least > self.prompt_budget(model.n_ctx):
            self.check_prompt(least, model_id, model.n_ctx, is_lower_bound=True)

    def check_prompt(self, n_prompt: int, model_id: str, n_ctx: int, *, is_lower_bound: bool = False) -> None:
        size = f"at least {n_prompt}" if is_lower_bound else str(n_prompt)
        if self.max_prompt_tokens is not None and n_prompt > self.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {size} tokens, over this server's limit of {self.max_prompt_tokens} tokens",
                param="messages",
                code="prompt_too_long",
            )
        if n_prompt >= n_ctx:
            raise ApiError(
                400,
                f"the prompt is {size} tokens; model {model_id!r} has a context of {n_ctx} tokens",
                param="messages",
                code="context_length_exceeded",
            )

    # --- generation ---
    def run_request(
        self,
        req: ChatRequest | CompletionRequest,
        lease: Lease,
        model_id: str,
        max_tokens: int,
        kind: _Kind,
        cancel: threading.Event,
    ) -> JSONResponse | StreamingResponse:
        """Both endpoints' body, in a worker thread holding ``lease`` (released here, or by the stream).

        ``cancel`` is set when the client of a non-streaming request disconnects: generation stops at the
        next token and the model is handed back."""
        try:
            model = lease.model
            self.check_prompt_bytes(model, kind.prompt_text(model), model_id)
            n_prompt = kind.count_prompt(model)
            self.check_prompt(n_prompt, model_id, model.n_ctx)
            settings = _llama_settings(req, max_tokens)
            cid, created = f"{kind.id_prefix}-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = kind.call(model, stream=True, **settings)
                events = kind.events(chunks, cid, created, model_id, model, n_prompt, include_usage)
                return _LeasedStream(events, lease)
            with cancellable(cancel):
                out = _generate(lambda: kind.call(model, **settings))
        except BaseException:
            lease.release()
            raise
        lease.release()
        if cancel.is_set():
            log.info("client gone: stopped generating for %s", model_id)
        choice = out["choices"][0]
        return _json(
            {
                "id": cid,
                "object": kind.object_name,
                "created": created,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        **kind.reply(choice),
                        "logprobs": None,
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
                "usage": _usage(out),
            }
        )

    async def serve_request(
        self,
        request: Request,
        req: ChatRequest | CompletionRequest,
        model_id: str,
        max_tokens: int,
        kind: _Kind,
        decision: RouteDecision | None = None,
    ) -> JSONResponse | StreamingResponse:
        lease = await self.acquire(model_id)
        cancel = threading.Event()
        failed: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                if not req.stream:  # a stream stops on its own when the client goes (its iterator closes)
                    tg.start_soon(_watch_disconnect, request, cancel)
                try:
                    resp = await anyio.to_thread.run_sync(
                        self.run_request, req, lease, model_id, max_tokens, kind, cancel
                    )
                except Exception as e:  # raised below, outside the task group (no exception group)
                    failed = e
                tg.cancel_scope.cancel()
        except BaseException:
            lease.release()
            raise
        if failed is not None:
            lease.release()
            raise failed
        _set_route_header(resp, decision)
        return resp

    # --- embeddings ---
    def embed(
        self, model: ChatModel, model_id: str, inputs: list[str | list[int]], req: EmbeddingRequest
    ) -> tuple[Any, int]:
        """The embeddings of ``inputs`` (in a worker thread holding the model), and their token count."""
        n_embd = int(model.llm.n_embd())  # type: ignore[attr-defined]
        if req.dimensions is not None and req.dimensions != n_embd:
            raise ApiError(
                400,
                f"dimensions: model {model_id!r} makes embeddings of {n_embd} values, not {req.dimensions}",
                param="dimensions",
            )
        limit = model.max_embed_tokens  # type: ignore[attr-defined]
        if self.max_prompt_tokens is not None:
            limit = min(limit, self.max_prompt_tokens)
        ids_list = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                least = -(-len(x.encode("utf-8")) // max_token_bytes(model))
                if least > limit:
                    _raise_too_long(i, f"at least {least}", limit, model_id)
                ids = model.tokenize(x, add_bos=True)
            else:
                ids = x
            if len(ids) > limit:
                _raise_too_long(i, str(len(ids)), limit, model_id)
            ids_list.append(ids)
        try:
            vectors = model.embed(ids_list)
        except InputError as e:
            raise ApiError(400, f"input: {e}", param="input") from None
        return vectors, sum(len(ids) for ids in ids_list)


def _set_route_header(resp: JSONResponse | StreamingResponse, decision: RouteDecision | None) -> None:
    """Say where a routed request went (``X-Route``); a request that named its model gets no header."""
    if decision is not None:
        resp.headers[ROUTE_HEADER] = (
            f"{decision.domain}; rule={decision.rule}; confidence={decision.confidence:.3f}"
        )


def _llama_settings(req: _Options, max_tokens: int) -> dict[str, Any]:
    d = asdict(GenerationSettings())
    for k in ("temperature", "top_p", "top_k", "repeat_penalty", "seed"):
        v = getattr(req, k)
        if v is not None:
            d[k] = v
    d["max_tokens"] = max_tokens
    if req.stop is not None:
        d["stop"] = req.stop
    if req.logit_bias:
        d["logit_bias"] = dict(req.logit_bias)
    return d


def _constraint_of(req: _Options) -> Constraint | None:
    """The grammar ``response_format`` or ``grammar`` asks for (a 400 naming the field if unusable)."""
    try:
        constraint = constraint_for(req.response_format, req.grammar)
    except BadField as e:
        raise ApiError(400, str(e), param=e.param) from None
    if constraint is not None and constraint.is_json and req.stop:
        raise ApiError(
            400,
            "stop: a stop string could cut a JSON reply short; leave it out with response_format "
            "(the reply ends where the JSON does)",
            param="stop",
        )
    return constraint


def _plain_chat_kind(messages: list[dict[str, Any]]) -> _Kind:
    """A chat request without tools, tool history or a grammar: llama-cpp-python's own chat completion."""
    return _Kind(
        id_prefix="chatcmpl",
        object_name="chat.completion",
        prompt_text=lambda model: chat_prompt_text(model, messages),
        count_prompt=lambda model: chat_prompt_tokens(model, messages),
        call=lambda model, **kw: model.llm.create_chat_completion(messages=messages, **kw),
        events=_chat_events,
        reply=_chat_reply,
    )


def _rendered_chat_kind(
    messages: list[dict[str, Any]], plan: ToolPlan | None, constraint: Constraint | None
) -> _Kind:
    """A chat request with tools, tool history or a grammar: the prompt rendered here (the tools through
    the model's own template), sampled under the grammar; with tools, the reply's calls parsed (a stream's
    as it comes, by :func:`_tool_events`)."""

    def rendered(model: ChatModel) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if not model.chat_template:
            return messages, {}
        return prepare_tools(model, messages, plan)

    def call(model: ChatModel, stream: bool = False, **kw: Any) -> Any:
        msgs, variables = rendered(model)
        grammar = constraint.grammar if constraint is not None else None
        if plan is not None and grammar is None:
            grammar = plan.grammar(template_tags_calls(model))
        if grammar is not None:
            check_grammar(model.llm, grammar, constraint.param if constraint is not None else "tools")
        out = chat_completion(model, msgs, grammar=grammar, variables=variables, stream=stream, **kw)
        return with_tool_calls(out, plan) if plan is not None and not stream else out

    def count(model: ChatModel) -> int:
        if not model.chat_template:
            return chat_prompt_tokens(model, [{"role": m["role"], "content": m["content"] or ""}
                                              for m in messages])  # fmt: skip
        msgs, variables = rendered(model)
        return len(prompt_tokens(model, msgs, **variables))

    def text(model: ChatModel) -> str:
        if not model.chat_template:
            return "".join(m["content"] or "" for m in messages)
        msgs, variables = rendered(model)
        return render_prompt(model, msgs, **variables)

    return _Kind(
        id_prefix="chatcmpl",
        object_name="chat.completion",
        prompt_text=text,
        count_prompt=count,
        call=call,
        events=_tool_events(plan) if plan is not None else _chat_events,
        reply=_chat_reply,
    )


def _completion_kind(prompt: str, constraint: Constraint | None) -> _Kind:
    """/v1/completions: ``prompt`` continued as it is (no template), under the grammar if one is asked."""

    def call(model: ChatModel, **kw: Any) -> Any:
        from llama_cpp import StoppingCriteriaList
        from llama_cpp.llama_grammar import LlamaGrammar

        grammar = None
        if constraint is not None:
            check_grammar(model.llm, constraint.grammar, constraint.param)
            grammar = LlamaGrammar.from_string(constraint.grammar, verbose=False)
        stop = StoppingCriteriaList([lambda *_: cancel_requested()])
        return model.llm.create_completion(prompt=prompt, stopping_criteria=stop, grammar=grammar, **kw)

    return _Kind(
        id_prefix="cmpl",
        object_name="text_completion",
        prompt_text=lambda model: prompt,
        count_prompt=lambda model: len(model.llm.tokenize(prompt.encode("utf-8"), special=True)),
        call=call,
        events=_completion_events,
        reply=lambda c: {"text": c.get("text") or ""},
    )


def _embedding_inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    """The inputs of an embeddings request, each a text or token ids (a 400 if there are none, too many,
    or an empty one)."""
    inputs: list[str | list[int]]
    if isinstance(req.input, str):
        inputs = [req.input]
    elif req.input and all(isinstance(x, int) for x in req.input):
        inputs = [list(req.input)]  # type: ignore[arg-type]  # one input as token ids
    else:
        inputs = list(req.input)  # type: ignore[arg-type]
    if not inputs:
        raise ApiError(400, "input is empty: give a text, a list of texts or token ids", param="input")
    if len(inputs) > MAX_EMBEDDING_INPUTS:
        raise ApiError(400, f"input: at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
    for i, x in enumerate(inputs):
        if not x:
            raise ApiError(400, f"input {i} is empty: there is nothing to embed", param="input")
    return inputs


def _raise_too_long(i: int, size: str, limit: int, model_id: str) -> None:
    raise ApiError(
        400,
        f"input {i} is {size} tokens, over the limit of {limit} tokens per embedding input for "
        f"model {model_id!r}",
        param="input",
        code="context_length_exceeded",
    )


async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client goes away (the body has been read: the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


class HostCheck:
    """ASGI middleware: the Host header must name this server (the defence against DNS rebinding).

    Accepted: a name in ``allowed`` (``*.example.com`` patterns; ``*`` accepts any) or an IP address
    literal (a rebinding page's requests carry its own domain name, never an address). Starlette's
    TrustedHostMiddleware has no rule for address literals and answers in plain text; this answers with
    the API's JSON error."""

    def __init__(self, app: ASGIApp, allowed: Sequence[str]):
        self.app = app
        self.names = {h.lower().rstrip(".") for h in allowed if not h.startswith("*")}
        self.suffixes = tuple(h.lower()[1:] for h in allowed if h.startswith("*.")) or ()
        self.any = "*" in allowed

    def allows(self, header: str | None) -> bool:
        if self.any:
            return True
        if not header:
            return False
        try:
            name = (urlsplit("//" + header).hostname or "").rstrip(".")
        except ValueError:
            return False
        if name in self.names or (self.suffixes and name.endswith(self.suffixes)):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            raw = dict(scope.get("headers") or []).get(b"host")
            header = raw.decode("latin-1") if raw is not None else None
            if not self.allows(header):
                msg = f"Host {header!r} is not a name of this server (start it with --allowed-host NAME)"
                await ApiError(400, msg, code="invalid_host").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before more of it is read.

    A declared Content-Length over the limit is refused at once; a chunked body is counted as it arrives
    and refused as soon as it passes the limit. The body is then handed to the app whole."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                await self._refuse(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before the body was complete
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: AsgiMessage | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> AsgiMessage:
            nonlocal body
            if body is not None:
                out, body = body, None
                return out
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"the request body is over this server's limit of {self.limit} bytes"
        resp = ApiError(413, msg, code="request_too_large").response()
        resp.headers["Connection"] = "close"  # the rest of the body is not read
        await resp(scope, receive, send)


@dataclass(frozen=True)
class _Kind:
    """What differs between /v1/chat/completions and /v1/completions."""

    id_prefix: str
    object_name: str
    prompt_text: Callable[[Any], str]
    count_prompt: Callable[[Any], int]
    call: Callable[..., Any]
    events: Callable[..., Any]
    reply: Callable[[dict[str, Any]], dict[str, Any]]


def _json(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body)  # as is: skips FastAPI's response encoding, a measurable cost per request


def _factory_error(e: FactoryError) -> ApiError:
    if isinstance(e, BadField):
        return ApiError(400, str(e), param=e.param)
    if isinstance(e, UnknownModelError):
        return ApiError(404, str(e), type="not_found_error", code="model_not_found", param="model")
    if isinstance(e, PoolBusyError):
        return ApiError(503, str(e), type="server_error", code="model_busy")
    if isinstance(e, TemplateRefusedError):  # the model's own template does not take this conversation
        return ApiError(400, str(e), param="messages", code="chat_template_refused")
    if isinstance(e, TemplateError):  # the model's template is broken or hostile: the server's side
        log.warning("%s", e)
        return ApiError(500, str(e), type="server_error", code="chat_template_error")
    return ApiError(400, str(e))


def _name(path: object) -> str:
    from pathlib import Path

    return Path(str(path)).name


def _generate(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ValueError as e:  # llama-cpp-python's way of refusing a request (e.g. context exceeded)
        raise ApiError(400, str(e)) from e


def _usage(out: dict[str, Any]) -> dict[str, int]:
    u = out.get("usage") or {}
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _routing_text(messages: list[dict[str, str]]) -> str:
    """What a chat request is about: its last user message (the whole conversation if it has none)."""
    users = [m["content"] for m in messages if m.get("role") == "user" and m.get("content")]
    return users[-1] if users else " ".join(m.get("content") or "" for m in messages)


def _model_card(pool: ModelPool, model_id: str) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(pool.path(model_id).stat().st_mtime),
        "owned_by": "gguf-factory",
    }


def chat_prompt_text(model: ChatModel, messages: list[dict[str, str]]) -> str:
    """The prompt llama-cpp-python builds for ``messages`` (the GGUF's chat template, rendered bounded in
    a template worker); without a template, the contents (the length estimate then uses them)."""
    if not model.chat_template:
        return "".join(m["content"] for m in messages)
    return str(model.render_prompt(messages))  # type: ignore[attr-defined]


def chat_prompt_tokens(model: ChatModel, messages: list[dict[str, str]]) -> int:
    """Tokens of the prompt llama-cpp-python builds for ``messages`` (the GGUF's chat template)."""
    if not model.chat_template:  # no chat template in the GGUF: approximate from the contents
        return sum(len(model.tokenize(m["content"])) + 4 for m in messages)
    text = chat_prompt_text(model, messages)
    return len(model.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))  # type: ignore[attr-defined]


def max_token_bytes(model: ChatModel) -> int:
    """The longest token of the model's vocabulary in UTF-8 bytes of its vocabulary text (an upper bound on
    the bytes one token covers), computed once per loaded model."""
    cached = getattr(model, "_max_token_bytes", None)
    if cached is None:
        import llama_cpp

        llm = model.llm  # type: ignore[attr-defined]
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        cached = max(
            (len(llama_cpp.llama_vocab_get_text(vocab, i) or b"") for i in range(llm.n_vocab())), default=1
        )
        cached = max(int(cached), 8)  # byte-fallback tokens ("<0x41>") and special tokens: at least this
        model._max_token_bytes = cached  # type: ignore[attr-defined]
    return int(cached)


def _stream_error(e: Exception) -> str:
    log.warning("stream stopped: %s", e)
    kind = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
    return _sse(error_body(str(e), kind))


class _TextReader(Protocol):
    """Turns a stream's text, as it comes, into the fields of the chunks that carry it."""

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The fields of the chunks ``piece`` (the next piece of text) lets go."""
        ...

    def close(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        """At the end: the fields of the chunks held back, and the finish reason (``finish``: llama.cpp's)."""
        ...


@dataclass(frozen=True)
class _EachPiece:
    """Each piece of text one chunk, as it comes."""

    fields: Callable[[str | None], dict[str, Any]]

    def feed(self, piece: str) -> list[dict[str, Any]]:
        return [self.fields(piece)]

    def close(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        return [], finish


class _CallDeltas:
    """A chat reply with tools read as it comes (:class:`.tools.CallReader`): its content and calls."""

    def __init__(self, names: Sequence[str]):
        self.reader = CallReader(names)

    def feed(self, piece: str) -> list[dict[str, Any]]:
        return [{"delta": d} for d in self.reader.feed(piece)]

    def close(self, finish: str) -> tuple[list[dict[str, Any]], str]:
        return [{"delta": d} for d in self.reader.close()], self.reader.finish_reason(finish)


@dataclass(frozen=True)
class _StreamShape:
    """What differs between the event streams: the chunk's object name, where a chunk of llama-cpp-python
    carries its text, how ours carries it (``fields(None)``: the closing chunk's), and how text becomes
    chunks (``reader``; None: each piece one chunk)."""

    object_name: str
    piece: Callable[[dict[str, Any]], str | None]
    fields: Callable[[str | None], dict[str, Any]]
    opening: dict[str, Any] | None = None
    """The fields of a chunk sent before any text (the chat stream's assistant role), or None."""
    reader: Callable[[], _TextReader] | None = None


_CHAT_STREAM = _StreamShape(
    object_name="chat.completion.chunk",
    piece=lambda choice: choice.get("delta", {}).get("content"),
    fields=lambda piece: {"delta": {"content": piece} if piece is not None else {}},
    opening={"delta": {"role": "assistant", "content": ""}},
)
_COMPLETION_STREAM = _StreamShape(
    object_name="text_completion",
    piece=lambda choice: choice.get("text") or "",
    fields=lambda piece: {"text": piece or ""},
)


def _sse_events(
    shape: _StreamShape,
    chunks: Iterator[dict[str, Any]],
    cid: str,
    created: int,
    model_id: str,
    model: ChatModel,
    n_prompt: int,
    include_usage: bool,
) -> Iterator[str]:
    """The one SSE path of both endpoints (and of chat with tools): chunks as the text comes (a chunk per
    non-empty piece, or what ``shape.reader`` makes of the text), a closing chunk with the finish reason,
    the usage chunk when asked, ``[DONE]``; an error mid-stream is one error event and ``[DONE]``.
    ``chunks`` is closed however the stream ends (llama.cpp stops generating)."""

    def chunk(fields: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": shape.object_name,
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, **fields, "logprobs": None, "finish_reason": finish}],
        }

    if shape.opening is not None:
        yield _sse(chunk(shape.opening, None))
    reader = shape.reader() if shape.reader is not None else _EachPiece(shape.fields)
    text, finish = [], None
    try:
        for c in chunks:
            choice = c["choices"][0]
            piece = shape.piece(choice)
            if piece:
                text.append(piece)
                for fields in reader.feed(piece):
                    yield _sse(chunk(fields, None))
            finish = choice.get("finish_reason") or finish
        held, finish = reader.close(finish or "stop")
    except Exception as e:
        yield _stream_error(e)
        yield "data: [DONE]\n\n"
        return
    finally:
        with contextlib.suppress(Exception):
            chunks.close()  # type: ignore[attr-defined]
    for fields in held:
        yield _sse(chunk(fields, None))
    yield _sse(chunk(shape.fields(None), finish))
    if include_usage:
        yield _sse(_usage_chunk(chunk(shape.fields(None), None), model, n_prompt, "".join(text)))
    yield "data: [DONE]\n\n"


def _chat_reply(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice["message"]
    if message.get("tool_calls"):
        return {"message": {"role": "assistant", "content": None, "tool_calls": message["tool_calls"]}}
    return {"message": {"role": "assistant", "content": message.get("content") or ""}}


def _tool_events(plan: ToolPlan) -> Callable[..., Iterator[str]]:
    """The chat stream when tools are in play (arguments as :func:`_chat_events` takes them): the one SSE
    path, its text read as it is generated by :class:`.tools.CallReader`. Text that cannot start a call
    goes out as ``content`` deltas at once (a possible start is held back until it is a call or cannot be
    one); a call's first delta carries its ``index``, ``id``, ``type`` and ``function.name`` as soon as the
    name is complete, further deltas its arguments' text in fragments as generated (together exactly the
    non-streaming reply's ``arguments``); the finish reason is ``tool_calls`` once a call was sent (unless
    cut: ``length``), then the usage when asked, ``[DONE]``."""
    return partial(_sse_events, replace(_CHAT_STREAM, reader=lambda: _CallDeltas(plan.names)))


def _chat_events(*args: Any) -> Iterator[str]:
    """/v1/chat/completions' stream (arguments as :func:`_sse_events` takes them after ``shape``)."""
    return _sse_events(_CHAT_STREAM, *args)


def _completion_events(*args: Any) -> Iterator[str]:
    """/v1/completions' stream (arguments as :func:`_sse_events` takes them after ``shape``)."""
    return _sse_events(_COMPLETION_STREAM, *args)


def _usage_chunk(base: dict[str, Any], model: ChatModel, n_prompt: int, text: str) -> dict[str, Any]:
    """OpenAI's final usage chunk (stream_options.include_usage); completion tokens re-counted from text."""
    n_completion = len(model.tokenize(text)) if text else 0
    base["choices"] = []
    base["usage"] = {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }
    return base
