"""A pool of GGUF models for the server: loaded lazily, kept within a memory budget, least recently used
evicted first, one request at a time per loaded model (the others wait their turn, up to a timeout).

A model's cost is its file size plus an estimate of its KV cache (f16 K and V for every layer over the
context it is loaded with): what llama.cpp holds in memory for it, give or take the compute buffers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FactoryError, InputError, ModelError
from ..files import human_size, require_file
from ..runtime import DEFAULT_CTX, ChatModel, load, read_context_lengths
from ..splitset import set_size

log = logging.getLogger(__name__)

KV_BYTES_PER_VALUE = 2  # llama.cpp's default KV cache type is f16
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this


class UnknownModelError(FactoryError):
    """A request named a model the server does not serve."""


class PoolBusyError(FactoryError):
    """A request waited longer than the queue timeout for its model (or for memory to load it)."""


def resolve_n_ctx(path: Path, n_ctx: int | None = None) -> int:
    """The context length llama.cpp will have for ``path`` loaded by :func:`gguf_factory.runtime.load`:
    the asked or default one, rounded up to a multiple of 256 as llama.cpp pads it."""
    if not n_ctx:
        recommended, trained = read_context_lengths(path)
        n_ctx = recommended or (min(trained, DEFAULT_CTX) if trained else DEFAULT_CTX)
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def kv_cache_bytes(path: Path, n_ctx: int) -> int:
    """f16 K+V bytes for ``n_ctx`` positions, from the GGUF header (0 when the header lacks the shapes)."""
    from ..gguf_header import scan_gguf_header

    try:
        meta, _ = scan_gguf_header(path)
    except InputError as e:
        raise ModelError(f"cannot read GGUF metadata of {path}: {e}") from e
    arch = meta.get("general.architecture")

    def get(key: str) -> int | None:
        v = meta.get(f"{arch}.{key}")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    n_layer, n_embd, n_head = get("block_count"), get("embedding_length"), get("attention.head_count")
    if not (n_layer and n_embd and n_head):
        return 0
    n_head_kv = get("attention.head_count_kv") or n_head
    k_dim = get("attention.key_length") or n_embd // n_head
    v_dim = get("attention.value_length") or n_embd // n_head
    return n_layer * n_ctx * n_head_kv * (k_dim + v_dim) * KV_BYTES_PER_VALUE


def model_cost(path: Path, n_ctx: int | None = None) -> int:
    """Estimated resident bytes of a loaded model: file size + KV cache."""
    return set_size(path) + kv_cache_bytes(path, resolve_n_ctx(path, n_ctx))


@dataclass(frozen=True)
class ModelSpec:
    """What the pool loads for one id: a GGUF, optionally a GGUF LoRA adapter applied on it, a context."""

    path: str | Path
    adapter: str | Path | None = None
    adapter_scale: float = 1.0
    n_ctx: int | None = None


@dataclass
class _Entry:
    id: str
    path: Path
    n_ctx: int
    cost: int
    adapter: Path | None = None
    adapter_scale: float = 1.0
    model: ChatModel | None = None
    busy: bool = False  # a request holds it (or is loading it)
    loads: int = 0
    last_used: float = 0.0


@dataclass
class Lease:
    """One request's hold on a model; :meth:`release` (idempotent) hands it back to the pool."""

    model: ChatModel
    model_id: str
    _release: Callable[[], None] = field(repr=False)
    _done: bool = field(default=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def release(self) -> None:
        with self._guard:
            if self._done:
                return
            self._done = True
        self._release()


class ModelPool:
    """Models by id (``{id: path}``), loaded on first use, evicted least-recently-used over the budget.

    ``budget_bytes=None`` means no limit. ``loader`` loads a path (default: :func:`runtime.load`).
    """

    def __init__(
        self,
        models: Mapping[str, str | Path | ModelSpec],
        *,
        budget_bytes: int | None = None,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        queue_timeout: float = 60.0,
        loader: Callable[..., ChatModel] | None = None,
    ):
        if not models:
            raise InputError("no models to serve")
        self.budget_bytes = budget_bytes
        self.queue_timeout = queue_timeout
        self._n_threads = n_threads
        self._loader: Callable[..., ChatModel] = loader or load
        self._entries: dict[str, _Entry] = {}
        for model_id, item in models.items():
            spec = item if isinstance(item, ModelSpec) else ModelSpec(item)
            path = require_file(spec.path, "model file")
            adapter = require_file(spec.adapter, "LoRA adapter") if spec.adapter is not None else None
            for f_path in (path, adapter):
                if f_path is None:
                    continue
                with open(f_path, "rb") as f:
                    if f.read(4) != b"GGUF":
                        raise ModelError(f"not a GGUF file: {f_path}")
            ctx = resolve_n_ctx(path, spec.n_ctx or n_ctx)
            cost = set_size(path) + kv_cache_bytes(path, ctx)
            cost += adapter.stat().st_size if adapter else 0
            if budget_bytes is not None and cost > budget_bytes:
                raise InputError(
                    f"{path} needs about {human_size(cost)} (file + KV cache for {ctx} tokens), "
                    f"more than the memory budget of {human_size(budget_bytes)}"
                )
            self._entries[model_id] = _Entry(model_id, path, ctx, cost, adapter, spec.adapter_scale)
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded ids, least recently used first
        self._used = 0
        self._cond = threading.Condition()
        self.evictions = 0

    # --- introspection ----------------------------------------------------------------------------
    def ids(self) -> list[str]:
        return list(self._entries)

    def path(self, model_id: str) -> Path:
        return self._entry(model_id).path

    def n_ctx(self, model_id: str) -> int:
        return self._entry(model_id).n_ctx

    def cost(self, model_id: str) -> int:
        return self._entry(model_id).cost

    def loaded(self) -> list[str]:
        """Ids of the loaded models, least recently used first."""
        with self._cond:
            return list(self._lru)

    @property
    def used_bytes(self) -> int:
        return self._used

    def status(self) -> list[dict[str, Any]]:
        with self._cond:
            return [
                {
                    "id": e.id,
                    "path": str(e.path),
                    "adapter": str(e.adapter) if e.adapter else None,
                    "loaded": e.model is not None,
                    "busy": e.busy,
                    "n_ctx": e.n_ctx,
                    "cost_bytes": e.cost,
                    "loads": e.loads,
                }
                for e in self._entries.values()
            ]

    def _entry(self, model_id: str) -> _Entry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModelError(
                f"model {model_id!r} not found; this server has: {', '.join(self._entries)}"
            ) from None

    # --- leasing ----------------------------------------------------------------------------------
    def acquire(self, model_id: str, timeout: float | None = None) -> Lease:
        """Wait (up to ``timeout``, default the pool's queue timeout) for ``model_id``, loading it if needed
        (evicting idle models, least recently used first, to stay within the budget)."""
        entry = self._entry(model_id)
        deadline = time.monotonic() + (self.queue_timeout if timeout is None else timeout)
        with self._cond:
            while entry.busy:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())) and entry.busy:
                    raise PoolBusyError(f"model {model_id!r} is busy; gave up after waiting for it")
            entry.busy = True
            if entry.model is None:
                try:
                    self._make_room(entry, deadline)
                except BaseException:
                    entry.busy = False
                    self._cond.notify_all()
                    raise
                self._used += entry.cost  # reserved while loading, outside the pool lock
        if entry.model is None:
            try:
                with_lora = f" + LoRA {entry.adapter.name}" if entry.adapter else ""
                log.info("loading %s%s (%s)", entry.path, with_lora, human_size(entry.cost))
                extra: dict[str, Any] = {}
                if entry.adapter is not None:
                    extra = {"lora_path": entry.adapter, "lora_scale": entry.adapter_scale}
                model = self._loader(entry.path, n_ctx=entry.n_ctx, n_threads=self._n_threads, **extra)
            except BaseException:
                with self._cond:
                    self._used -= entry.cost
                    entry.busy = False
                    self._cond.notify_all()
                raise
            with self._cond:
                entry.model = model
                entry.loads += 1
                self._lru[entry.id] = None
        with self._cond:
            self._lru.move_to_end(entry.id)
        assert entry.model is not None
        return Lease(entry.model, entry.id, lambda: self._release(entry))

    def try_acquire(self, model_id: str) -> Lease | None:
        """A lease at once if ``model_id`` is loaded and idle, else None (never blocks, never loads)."""
        entry = self._entry(model_id)
        with self._cond:
            if entry.busy or entry.model is None:
                return None
            entry.busy = True
            self._lru.move_to_end(entry.id)
            return Lease(entry.model, entry.id, lambda: self._release(entry))

    @contextmanager
    def use(self, model_id: str, timeout: float | None = None) -> Iterator[ChatModel]:
        lease = self.acquire(model_id, timeout)
        try:
            yield lease.model
        finally:
            lease.release()

    def _release(self, entry: _Entry) -> None:
        with self._cond:
            entry.busy = False
            entry.last_used = time.monotonic()
            if entry.id in self._lru:
                self._lru.move_to_end(entry.id)
            self._cond.notify_all()

    def _make_room(self, entry: _Entry, deadline: float) -> None:
        """Evict idle models (LRU first) until ``entry`` fits; wait for busy ones. Holds ``self._cond``."""
        if self.budget_bytes is None:
            return
        while self._used + entry.cost > self.budget_bytes:
            victim = next((i for i in self._lru if not self._entries[i].busy), None)
            if victim is not None:
                self._evict(self._entries[victim])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._cond.wait(remaining):
                if self._used + entry.cost > self.budget_bytes:
                    raise PoolBusyError(
                        f"no memory to load {entry.id!r}: the models in use fill the budget of "
                        f"{human_size(self.budget_bytes)}"
                    )

    def _evict(self, entry: _Entry) -> None:
        log.info("evicting %s (least recently used) to stay within the memory budget", entry.id)
        model, entry.model = entry.model, None
        self._lru.pop(entry.id, None)
        self._used -= entry.cost
        self.evictions += 1
        if model is not None:
            model.close()

    def close(self) -> None:
        """Free the idle models. A model still in use (a request that outlived the server's shutdown
        grace period) is left to the process's exit: freeing it under llama.cpp would crash."""
        with self._cond:
            for model_id in list(self._lru):
                e = self._entries[model_id]
                if e.busy:
                    log.warning("model %s is still generating at shutdown: not freed", model_id)
                    continue
                model, e.model = e.model, None
                if model is not None:
                    model.close()
                self._lru.pop(model_id, None)
                self._used -= e.cost
