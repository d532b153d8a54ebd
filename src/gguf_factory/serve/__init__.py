"""``gguf-factory serve``: an OpenAI-compatible server over a pool of GGUF models."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ..files import parse_size
from ..router import Router
from .app import DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS, create_app
from .pool import LoadOptions, ModelPool, ModelSpec, PoolBusyError, UnknownModelError

__all__ = [
    "LoadOptions", "ModelPool", "PoolBusyError", "UnknownModelError", "create_app", "parse_size", "run_server"
]  # fmt: skip

API_KEY_ENV = "GGUF_FACTORY_API_KEY"
SHUTDOWN_GRACE_S = 3  # after SIGTERM, requests still running get this long before they are cancelled
log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for an address or name that only this machine can reach."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_api_key(api_key: str | None) -> str | None:
    """The key from ``--api-key``, else from $GGUF_FACTORY_API_KEY; an empty one is refused (it would
    otherwise mean 'no key' without saying so)."""
    if api_key is not None:
        if not api_key.strip():
            raise InputError("--api-key is empty: give a non-empty key, or leave the option out")
        return api_key
    env = os.environ.get(API_KEY_ENV)
    if env is not None:
        if not env.strip():
            raise InputError(f"${API_KEY_ENV} is set but empty: give a non-empty key, or unset it")
        return env
    return None


def hosts_for(bind: str, allowed_hosts: Sequence[str] | None) -> list[str]:
    """Host header names the server accepts: loopback names, the address it binds (unless a wildcard),
    and the ``--allowed-host`` names."""
    hosts = list(LOOPBACK_HOSTS)
    wildcard = bind in ("0.0.0.0", "::", "")
    if not wildcard and bind not in hosts:
        hosts.append(bind.strip("[]"))
    hosts += [h.strip().lower() for h in allowed_hosts or () if h.strip()]
    return hosts


def run_server(
    model: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_tokens_limit: int = 1024,
    max_prompt_tokens: int | None = None,
    memory_budget: str | int | None = None,
    n_ctx: int | None = None,
    threads: int | None = None,
    queue_timeout: float = 60.0,
    web_ui: bool = True,
    allowed_hosts: Sequence[str] | None = None,
    max_body: str | int = DEFAULT_MAX_BODY_BYTES,
    gpu_layers: int = 0,
    cache_type_k: str | None = None,
    cache_type_v: str | None = None,
    parallel: int = 1,
    max_queue: int | None = None,
    batch_size: int | None = None,
    prompt_cache_mb: float | None = None,
) -> None:
    """Serve one GGUF (its id is the file stem), or a router manifest (``.yaml``: one id per domain, plus
    ``auto``), with uvicorn until interrupted.

    ``allowed_hosts``: Host header names accepted besides the loopback names and the bound address
    (``*`` accepts any: only behind a proxy that checks Host itself). ``max_body``: request body limit.
    ``gpu_layers``, ``cache_type_k``/``cache_type_v``, ``batch_size``: llama.cpp settings for every model;
    ``parallel``: instances per model (requests served at once); ``max_queue``: requests that may wait
    for a busy model (more: 503 at once; default no limit); ``prompt_cache_mb``: RAM per instance for
    evaluated prompts reused by requests sharing a prefix (0: off; default 128).
    """
    import uvicorn

    key = resolve_api_key(api_key)
    hosts = hosts_for(host, allowed_hosts)
    if not is_loopback(host) and key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach this address can use the models "
            "(set --api-key or $%s)",
            host,
            API_KEY_ENV,
        )
    if not is_loopback(host) and not allowed_hosts:
        log.info(
            "requests must name this server by address or as %s in their Host header; add the names "
            "clients use with --allowed-host",
            ", ".join(hosts),
        )
    options = LoadOptions(
        n_gpu_layers=gpu_layers,
        type_k=cache_type_k,
        type_v=cache_type_v,
        n_batch=batch_size,
        parallel=parallel,
        **({} if prompt_cache_mb is None else {"prompt_cache_bytes": _mb(prompt_cache_mb)}),
    )
    if max_queue is not None and max_queue < 0:
        raise InputError(f"--max-queue must be 0 or more, got {max_queue}")
    path = Path(model)
    router, models = pool_models(path)
    pool = ModelPool(
        models,
        budget_bytes=parse_size(memory_budget) if memory_budget is not None else None,
        n_ctx=n_ctx,
        n_threads=threads,
        queue_timeout=queue_timeout,
        options=options,
    )
    app = create_app(
        pool,
        api_key=key,
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        router=router,
        web_ui=web_ui,
        max_body_bytes=parse_size(max_body, "--max-body"),
        allowed_hosts=hosts,
        max_queue=max_queue,
    )
    auth = " (API key required)" if key else ""
    log.info("serving %s as %s on http://%s:%d/v1%s", path, ", ".join(models), host, port, auth)
    if web_ui:
        log.info("chat page: http://%s:%d/", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    finally:
        pool.close()


def _mb(value: float) -> int:
    if not value >= 0:
        raise InputError(f"--prompt-cache-mb must be 0 (off) or more, got {value}")
    return int(value * (1 << 20))


def pool_models(path: Path) -> tuple[Router | None, dict[str, ModelSpec]]:
    """The pool's models for a GGUF file or a router manifest (and the router, for a manifest)."""
    if path.suffix.lower() in (".yaml", ".yml"):
        router = Router(path)
        specs = {
            name: ModelSpec(t.model, t.adapter, t.adapter_scale, t.context_length)
            for name, t in router.targets.items()
        }
        return router, specs
    return None, {path.stem: ModelSpec(path)}
