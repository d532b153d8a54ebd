"""OpenAI-compatible HTTP API (FastAPI) over a :class:`~gguf_factory.serve.pool.ModelPool`.

``POST /v1/chat/completions`` and ``POST /v1/completions`` (plain JSON or server-sent events),
``GET /v1/models``, ``GET /health``. Errors use OpenAI's shape: ``{"error": {"message", "type", "param",
"code"}}``. Generation runs llama.cpp through llama-cpp-python with the GGUF's own chat template, and the
same defaults as :class:`gguf_factory.runtime.GenerationSettings`, so a reply equals ``runtime.chat``'s.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from ..errors import FactoryError
from ..router import AUTO, RouteDecision, Router
from ..runtime import ChatModel, GenerationSettings
from .pool import Lease, ModelPool, PoolBusyError, UnknownModelError

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS_LIMIT = 1024
MAX_WAITING = 256  # requests blocked waiting for a model at once; more wait (without a thread) for a slot


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
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class StreamOptions(_Body):
    include_usage: bool = False


class _Options(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # llama.cpp extras, as llama.cpp's own server takes them
    repeat_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[int, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id → bias
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")


class ChatRequest(_Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer OpenAI name for max_tokens


class CompletionRequest(_Options):
    prompt: str | list[str]


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
) -> FastAPI:
    """The OpenAI-compatible app serving ``pool``'s models.

    ``router``: the pool's ids are its domains; ``"model": "auto"`` routes each request by the text of its
    last user message (or prompt), and every reply says where it went in the ``X-Route`` header.

    ``api_key``: when set, every ``/v1`` request must send ``Authorization: Bearer <api_key>``.
    ``max_tokens_limit``: largest ``max_tokens`` a request may ask for (also the default).
    ``max_prompt_tokens``: longest prompt accepted, in tokens (the model's context always applies).
    ``web_ui``: serve the chat page (serve/web) at ``/``.
    """
    app = FastAPI(title="gguf-factory", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool

    # --- error handlers ---
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

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    # --- auth ---
    async def check_key(request: Request) -> None:  # async: no thread hop for a header check
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    # --- helpers ---
    # Requests waiting for a busy model block in threads of their own, so that a queue, however long,
    # never takes the worker threads the running generation (and its stream) needs.
    waiting = anyio.CapacityLimiter(MAX_WAITING)

    async def acquire(model_id: str) -> Lease:
        lease = pool.try_acquire(model_id)  # the common case: loaded and idle, no thread needed
        if lease is not None:
            return lease
        got: list[Lease] = []

        def wait() -> Lease:
            got.append(pool.acquire(model_id))
            return got[0]

        try:
            return await anyio.to_thread.run_sync(wait, limiter=waiting)
        except BaseException:  # cancelled after the wait succeeded: hand the model back
            for lease in got:
                lease.release()
            raise

    def pick_model(name: str | None, text: Callable[[], str]) -> tuple[str, RouteDecision | None]:
        """The model a request names, or with a router and "auto" (or no name), the routed domain."""
        if router is not None and name in (None, "", AUTO):
            decision = router.route(text())
            log.info("routed to %s (%s, %.2f)", decision.domain, decision.rule, decision.confidence)
            return decision.domain, decision
        return resolve_model(name), None

    def resolve_model(name: str | None) -> str:
        ids = pool.ids()
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

    def max_tokens_of(req: _Options, requested: int | None) -> int:
        if requested is None:
            return max_tokens_limit
        if requested > max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens is {requested}, over this server's limit of {max_tokens_limit}",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        return requested

    def check_prompt(n_prompt: int, model_id: str, n_ctx: int) -> None:
        if max_prompt_tokens is not None and n_prompt > max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {n_prompt} tokens, over this server's limit of {max_prompt_tokens} tokens",
                param="messages",
                code="prompt_too_long",
            )
        if n_prompt >= n_ctx:
            raise ApiError(
                400,
                f"the prompt is {n_prompt} tokens; model {model_id!r} has a context of {n_ctx} tokens",
                param="messages",
                code="context_length_exceeded",
            )

    def llama_settings(req: _Options, max_tokens: int) -> dict[str, Any]:
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

    # --- routes ---
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": pool.status(),
            "memory": {"budget_bytes": pool.budget_bytes, "used_bytes": pool.used_bytes},
        }

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    def list_models() -> dict[str, Any]:
        cards = [_model_card(pool, i) for i in pool.ids()]
        if router is not None:
            cards.insert(0, {"id": AUTO, "object": "model", "created": 0, "owned_by": "gguf-factory"})
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_key)])
    def get_model(model_id: str) -> dict[str, Any]:
        if router is not None and model_id == AUTO:
            return {"id": AUTO, "object": "model", "created": 0, "owned_by": "gguf-factory"}
        return _model_card(pool, resolve_model(model_id))

    def run_request(
        req: ChatRequest | CompletionRequest,
        lease: Lease,
        model_id: str,
        max_tokens: int,
        kind: _Kind,
    ) -> JSONResponse | StreamingResponse:
        """Both endpoints' body, in a worker thread holding ``lease`` (released here, or by the stream)."""
        try:
            model = lease.model
            n_prompt = kind.count_prompt(model)
            check_prompt(n_prompt, model_id, model.n_ctx)
            settings = llama_settings(req, max_tokens)
            cid, created = f"{kind.id_prefix}-{uuid.uuid4().hex}", int(time.time())
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                chunks = kind.call(model, stream=True, **settings)
                events = kind.events(chunks, cid, created, model_id, model, n_prompt, include_usage)
                return _LeasedStream(events, lease)
            out = _generate(lambda: kind.call(model, **settings))
        except BaseException:
            lease.release()
            raise
        lease.release()
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
        req: ChatRequest | CompletionRequest,
        model_id: str,
        max_tokens: int,
        kind: _Kind,
        decision: RouteDecision | None = None,
    ) -> JSONResponse | StreamingResponse:
        lease = await acquire(model_id)
        try:
            resp = await anyio.to_thread.run_sync(run_request, req, lease, model_id, max_tokens, kind)
        except BaseException:
            lease.release()
            raise
        if decision is not None:
            resp.headers[ROUTE_HEADER] = (
                f"{decision.domain}; rule={decision.rule}; confidence={decision.confidence:.3f}"
            )
        return resp

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)], response_model=None)
    async def chat_completions(req: ChatRequest) -> JSONResponse | StreamingResponse:
        messages = [m.as_dict() for m in req.messages]
        model_id, decision = pick_model(req.model, lambda: _routing_text(messages))
        max_tokens = max_tokens_of(req, req.max_completion_tokens or req.max_tokens)
        kind = _Kind(
            id_prefix="chatcmpl",
            object_name="chat.completion",
            count_prompt=lambda model: chat_prompt_tokens(model, messages),
            call=lambda model, **kw: model.llm.create_chat_completion(messages=messages, **kw),
            events=_chat_events,
            reply=lambda c: {"message": {"role": "assistant", "content": c["message"].get("content") or ""}},
        )
        return await serve_request(req, model_id, max_tokens, kind, decision)

    @app.post("/v1/completions", dependencies=[Depends(check_key)], response_model=None)
    async def completions(req: CompletionRequest) -> JSONResponse | StreamingResponse:
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "prompt: give one prompt per request", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        model_id, decision = pick_model(req.model, lambda: prompt or "")
        max_tokens = max_tokens_of(req, req.max_tokens)
        kind = _Kind(
            id_prefix="cmpl",
            object_name="text_completion",
            count_prompt=lambda model: (
                len(model.llm.tokenize(prompt.encode("utf-8"), special=True)) if prompt else 1
            ),
            call=lambda model, **kw: model.llm.create_completion(prompt=prompt, **kw),
            events=_completion_events,
            reply=lambda c: {"text": c.get("text") or ""},
        )
        return await serve_request(req, model_id, max_tokens, kind, decision)

    # --- web chat page (serve/web) ---
    if web_ui:
        from .web import add_web_routes

        add_web_routes(app)
    return app


@dataclass(frozen=True)
class _Kind:
    """What differs between /v1/chat/completions and /v1/completions."""

    id_prefix: str
    object_name: str
    count_prompt: Callable[[Any], int]
    call: Callable[..., Any]
    events: Callable[..., Any]
    reply: Callable[[dict[str, Any]], dict[str, Any]]


def _json(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body)  # as is: skips FastAPI's response encoding, a measurable cost per request


def _factory_error(e: FactoryError) -> ApiError:
    if isinstance(e, UnknownModelError):
        return ApiError(404, str(e), type="not_found_error", code="model_not_found", param="model")
    if isinstance(e, PoolBusyError):
        return ApiError(503, str(e), type="server_error", code="model_busy")
    return ApiError(400, str(e))


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


def chat_prompt_tokens(model: ChatModel, messages: list[dict[str, str]]) -> int:
    """Tokens of the prompt llama-cpp-python builds for ``messages`` (the GGUF's chat template)."""
    render = getattr(model, "_serve_chat_formatter", _UNSET)
    if render is _UNSET:
        render = _chat_formatter(model)
        model._serve_chat_formatter = render  # type: ignore[attr-defined]
    if render is None:  # no chat template in the GGUF: approximate from the contents
        return sum(len(model.tokenize(m["content"])) + 4 for m in messages)
    return len(model.llm.tokenize(render(messages).encode("utf-8"), add_bos=False, special=True))


_UNSET = object()


def _chat_formatter(model: ChatModel) -> Callable[[list[dict[str, str]]], str] | None:
    """Render messages with the GGUF's chat template exactly as llama-cpp-python's chat handler does."""
    template = model.chat_template
    if not template:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = model.llm

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    eos, bos = text(llm.token_eos()), text(llm.token_bos())
    fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    return lambda messages: fmt(messages=messages).prompt


def _stream_error(e: Exception) -> str:
    log.warning("stream stopped: %s", e)
    kind = "invalid_request_error" if isinstance(e, ValueError) else "server_error"
    return _sse(error_body(str(e), kind))


def _chat_events(
    chunks: Iterator[dict[str, Any]],
    cid: str,
    created: int,
    model_id: str,
    model: ChatModel,
    n_prompt: int,
    include_usage: bool,
) -> Iterator[str]:
    def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }

    yield _sse(chunk({"role": "assistant", "content": ""}, None))
    text, finish = [], None
    try:
        for c in chunks:
            choice = c["choices"][0]
            piece = choice.get("delta", {}).get("content")
            if piece:
                text.append(piece)
                yield _sse(chunk({"content": piece}, None))
            finish = choice.get("finish_reason") or finish
    except Exception as e:
        yield _stream_error(e)
        yield "data: [DONE]\n\n"
        return
    finally:
        with contextlib.suppress(Exception):
            chunks.close()  # type: ignore[attr-defined]
    yield _sse(chunk({}, finish or "stop"))
    if include_usage:
        yield _sse(_usage_chunk(chunk({}, None), model, n_prompt, "".join(text)))
    yield "data: [DONE]\n\n"


def _completion_events(
    chunks: Iterator[dict[str, Any]],
    cid: str,
    created: int,
    model_id: str,
    model: ChatModel,
    n_prompt: int,
    include_usage: bool,
) -> Iterator[str]:
    def chunk(piece: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model_id,
            "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}],
        }

    text, finish = [], None
    try:
        for c in chunks:
            choice = c["choices"][0]
            piece = choice.get("text") or ""
            if piece:
                text.append(piece)
                yield _sse(chunk(piece, None))
            finish = choice.get("finish_reason") or finish
    except Exception as e:
        yield _stream_error(e)
        yield "data: [DONE]\n\n"
        return
    finally:
        with contextlib.suppress(Exception):
            chunks.close()  # type: ignore[attr-defined]
    yield _sse(chunk("", finish or "stop"))
    if include_usage:
        yield _sse(_usage_chunk(chunk("", None), model, n_prompt, "".join(text)))
    yield "data: [DONE]\n\n"


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
