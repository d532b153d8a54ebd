"""``gguf-factory serve``: an OpenAI-compatible server over a pool of GGUF models."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .app import create_app
from .pool import ModelPool, PoolBusyError, UnknownModelError, parse_size

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
) -> None:
    """Serve one GGUF (its id is the file stem) with uvicorn until interrupted."""
    import uvicorn

    path = Path(model)
    pool = ModelPool(
        {path.stem: path},
        budget_bytes=parse_size(memory_budget) if memory_budget is not None else None,
        n_ctx=n_ctx,
        n_threads=threads,
        queue_timeout=queue_timeout,
    )
    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(
        pool, api_key=key, max_tokens_limit=max_tokens_limit, max_prompt_tokens=max_prompt_tokens
    )
    auth = " (API key required)" if key else ""
    log.info("serving %s as %r on http://%s:%d/v1%s", path, path.stem, host, port, auth)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        pool.close()
