"""``gguf-factory serve``: an OpenAI-compatible server over a pool of GGUF models."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..files import parse_size
from ..router import Router
from .app import create_app
from .pool import ModelPool, ModelSpec, PoolBusyError, UnknownModelError

__all__ = ["ModelPool", "PoolBusyError", "UnknownModelError", "create_app", "parse_size", "run_server"]

API_KEY_ENV = "GGUF_FACTORY_API_KEY"
log = logging.getLogger(__name__)


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
) -> None:
    """Serve one GGUF (its id is the file stem), or a router manifest (``.yaml``: one id per domain, plus
    ``auto``), with uvicorn until interrupted."""
    import uvicorn

    path = Path(model)
    router, models = pool_models(path)
    pool = ModelPool(
        models,
        budget_bytes=parse_size(memory_budget) if memory_budget is not None else None,
        n_ctx=n_ctx,
        n_threads=threads,
        queue_timeout=queue_timeout,
    )
    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(
        pool,
        api_key=key,
        max_tokens_limit=max_tokens_limit,
        max_prompt_tokens=max_prompt_tokens,
        router=router,
        web_ui=web_ui,
    )
    auth = " (API key required)" if key else ""
    log.info("serving %s as %s on http://%s:%d/v1%s", path, ", ".join(models), host, port, auth)
    if web_ui:
        log.info("chat page: http://%s:%d/", host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        pool.close()


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
