"""A pool of GGUF models for the server: loaded lazily, kept within a memory budget, least recently used
evicted first, one request at a time per loaded llama.cpp instance (the others wait their turn, up to a
timeout). ``parallel=N`` loads N instances of each model (llama-server's ``--parallel`` slots): N requests
to one model run at once, the weights shared through the file's memory map.

A model's cost is its file size plus an estimate of its KV caches (K and V for every layer over the
context it is loaded with, at the cache type's bytes per value, once per instance) plus each instance's
prompt cache budget (evaluated prompts kept for reuse): what llama.cpp holds in memory for it, give or take
the compute buffers. Ids sharing a GGUF share one loaded base (see :class:`ModelPool`): their LoRA adapters
are counted, not copies of the base.
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
KV_TYPE_BYTES = {  # bytes per cached value: a quantized block of 32 values holds a 2-byte scale (+ min)
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}  # fmt: skip
CTX_PAD = 256  # llama.cpp rounds the context up to a multiple of this
DEFAULT_PROMPT_CACHE_BYTES = 128 << 20  # per llama.cpp instance (serve --prompt-cache-mb)


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


def kv_cache_bytes(path: Path, n_ctx: int, type_k: str | None = None, type_v: str | None = None) -> int:
    """K+V bytes for ``n_ctx`` positions (f16 unless ``type_k``/``type_v`` name another cache type), from
    the GGUF header (0 when the header lacks the shapes)."""
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
    k_bytes = KV_TYPE_BYTES.get((type_k or "f16").lower(), KV_BYTES_PER_VALUE)
    v_bytes = KV_TYPE_BYTES.get((type_v or "f16").lower(), KV_BYTES_PER_VALUE)
    return int(n_layer * n_ctx * n_head_kv * (k_dim * k_bytes + v_dim * v_bytes))


def model_cost(path: Path, n_ctx: int | None = None) -> int:
    """Estimated resident bytes of a loaded model: file size + KV cache."""
    return set_size(path) + kv_cache_bytes(path, resolve_n_ctx(path, n_ctx))


@dataclass(frozen=True)
class LoadOptions:
    """llama.cpp settings for every model of a pool (``serve``'s options)."""

    n_gpu_layers: int = 0  # layers offloaded to the GPU (-1: all)
    type_k: str | None = None  # KV cache types (llama-server's --cache-type-k/-v); None: f16
    type_v: str | None = None
    n_batch: int | None = None  # llama.cpp's batch (also the longest embedding input); None: 512
    parallel: int = 1  # llama.cpp instances per model: requests to one model served at once
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES  # RAM per instance for evaluated prompts; 0: off

    def __post_init__(self) -> None:
        from ..runtime.llamacpp import kv_cache_type

        for t in (self.type_k, self.type_v):
            if t is not None:
                kv_cache_type(t)  # an unknown name fails here, before any model loads
        if self.parallel < 1:
            raise InputError(f"parallel must be at least 1, got {self.parallel}")
        if self.prompt_cache_bytes < 0:
            raise InputError(f"the prompt cache must be 0 (off) or more bytes, got {self.prompt_cache_bytes}")
        if self.n_batch is not None and self.n_batch < 1:
            raise InputError(f"n_batch must be at least 1, got {self.n_batch}")

    def loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"pooling": "mean"}  # embeddings: llama.cpp's mean pooling (generation as is)
        if self.n_gpu_layers:
            kw["n_gpu_layers"] = self.n_gpu_layers
        for k in ("type_k", "type_v", "n_batch", "prompt_cache_bytes"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        return kw


@dataclass(frozen=True)
class ModelSpec:
    """What the pool loads for one id: a GGUF, optionally a GGUF LoRA adapter applied on it, a context."""

    path: str | Path
    adapter: str | Path | None = None
    adapter_scale: float = 1.0
    n_ctx: int | None = None


@dataclass
class _Base:
    """One loaded GGUF (at one context length): its llama.cpp instances, shared by every id served from
    it, each id applying its own LoRA adapter (or none) per request."""

    key: tuple[Path, int]
    path: Path
    n_ctx: int
    cost: int  # file + KV caches, once however many ids share it
    models: list[ChatModel] = field(default_factory=list)  # the loaded instances (none: not loaded)
    in_use: set[int] = field(default_factory=set)  # instances a request holds
    loading: bool = False
    loads: int = 0
    adapters: dict[Path, int] = field(default_factory=dict)  # adapters admitted (loaded on use) -> bytes

    @property
    def busy(self) -> bool:
        return bool(self.in_use) or self.loading

    def free_instance(self) -> int | None:
        return next((i for i in range(len(self.models)) if i not in self.in_use), None)


@dataclass
class _Entry:
    id: str
    base: _Base
    adapter: Path | None = None
    adapter_scale: float = 1.0
    adapter_cost: int = 0  # the adapter's bytes, once per instance
    last_used: float = 0.0
    touched: int = 0  # order of the last lease (loaded() lists by it)

    @property
    def path(self) -> Path:
        return self.base.path

    @property
    def n_ctx(self) -> int:
        return self.base.n_ctx

    @property
    def cost(self) -> int:
        """What serving this id alone costs: the base + its adapter."""
        return self.base.cost + self.adapter_cost

    @property
    def loaded(self) -> bool:
        return bool(self.base.models) and (self.adapter is None or self.adapter in self.base.adapters)

    @property
    def adapters(self) -> tuple[tuple[Path, float], ...]:
        return () if self.adapter is None else ((self.adapter, self.adapter_scale),)


_Unit = tuple  # ("base", base key) or ("lora", base key, adapter path): what the LRU evicts


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
    """Models by id (``{id: path or ModelSpec}``), loaded on first use, evicted least-recently-used over the
    budget.

    Ids served from the same GGUF at the same context share one loaded base: each id's LoRA adapter (if
    any) is loaded once on that base and applied per request with llama.cpp's adapter API, so the budget
    (and the LRU) counts the base once and each adapter once, and requests for those ids take turns on the
    base's instances (one lease each, the adapter set switched as a request takes it). An id whose GGUF or
    context differs gets a base of its own.

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
        options: LoadOptions | None = None,
    ):
        if not models:
            raise InputError("no models to serve")
        self.budget_bytes = budget_bytes
        self.queue_timeout = queue_timeout
        self._n_threads = n_threads
        self.options = options or LoadOptions()
        opts = self.options
        self._loader: Callable[..., ChatModel] = loader or load
        self._entries: dict[str, _Entry] = {}
        self._bases: dict[tuple[Path, int], _Base] = {}
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
            if opts.type_k is not None or opts.type_v is not None:
                from ..runtime.llamacpp import check_kv_types

                check_kv_types(path, opts.type_k, opts.type_v)
            ctx = resolve_n_ctx(path, spec.n_ctx or n_ctx)
            key = (path.resolve(), ctx)
            base = self._bases.get(key)
            if base is None:
                kv = kv_cache_bytes(path, ctx, opts.type_k, opts.type_v)
                cost = set_size(path) + opts.parallel * (kv + opts.prompt_cache_bytes)
                base = self._bases[key] = _Base(key, path, ctx, cost)
            adapter = adapter.resolve() if adapter is not None else None
            adapter_cost = opts.parallel * adapter.stat().st_size if adapter else 0
            entry = _Entry(model_id, base, adapter, float(spec.adapter_scale), adapter_cost)
            if budget_bytes is not None and entry.cost > budget_bytes:
                caches = f"{opts.parallel} KV caches" if opts.parallel > 1 else "KV cache"
                if opts.prompt_cache_bytes:
                    caches += " + prompt cache"
                raise InputError(
                    f"{path} needs about {human_size(entry.cost)} (file + {caches} for {ctx} tokens"
                    f"{' + adapter' if adapter else ''}), more than the memory budget of "
                    f"{human_size(budget_bytes)}"
                )
            self._entries[model_id] = entry
        self._lru: OrderedDict[_Unit, None] = OrderedDict()  # loaded bases and adapters, LRU first
        self._used = 0
        self._touch = 0
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
        """Bytes to serve ``model_id`` alone: its base (file + KV caches) + its adapter."""
        return self._entry(model_id).cost

    def loaded(self) -> list[str]:
        """Ids ready to serve without loading anything, least recently used first."""
        with self._cond:
            ready = [e for e in self._entries.values() if e.loaded]
            return [e.id for e in sorted(ready, key=lambda e: e.touched)]

    def loaded_bases(self) -> list[Path]:
        """The GGUF files loaded now, once each however many ids they serve."""
        with self._cond:
            return [b.path for b in self._bases.values() if b.models]

    @property
    def used_bytes(self) -> int:
        return self._used

    def status(self) -> list[dict[str, Any]]:
        with self._cond:
            sharing: dict[tuple[Path, int], list[str]] = {}
            for e in self._entries.values():
                sharing.setdefault(e.base.key, []).append(e.id)
            return [
                {
                    "id": e.id,
                    "path": str(e.path),
                    "adapter": str(e.adapter) if e.adapter else None,
                    "loaded": e.loaded,
                    "busy": e.base.busy,
                    "instances": len(e.base.models),
                    "in_use": len(e.base.in_use),
                    "n_ctx": e.n_ctx,
                    "cost_bytes": e.cost,
                    "loads": e.base.loads,
                    "shares_base_with": [i for i in sharing[e.base.key] if i != e.id],
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
        """Wait (up to ``timeout``, default the pool's queue timeout) for a free instance of ``model_id``'s
        base, loading the base and admitting the id's adapter if needed (evicting idle bases and adapters,
        least recently used first, to stay within the budget); the instance comes with the id's adapter
        (or none) applied."""
        entry = self._entry(model_id)
        base = entry.base
        deadline = time.monotonic() + (self.queue_timeout if timeout is None else timeout)
        lease: Lease | None = None
        with self._cond:
            while True:
                if not base.loading:
                    if not base.models:
                        break  # not loaded, nobody loading it: this request loads it
                    if entry.adapter is not None and entry.adapter not in base.adapters:
                        self._make_room(entry.adapter_cost, deadline, keep=base, what=entry.id)
                        if base.models and entry.adapter not in base.adapters:
                            self._admit_adapter(entry)
                        continue
                    index = base.free_instance()
                    if index is not None:
                        lease = self._take(entry, index)
                        break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PoolBusyError(f"model {model_id!r} is busy; gave up after waiting for it")
                self._cond.wait(remaining)
            if lease is None:
                base.loading = True
                try:
                    self._make_room(entry.cost, deadline, keep=None, what=entry.id)
                except BaseException:
                    base.loading = False
                    self._cond.notify_all()
                    raise
                self._used += base.cost  # reserved while loading, outside the pool lock
                if entry.adapter is not None:
                    self._used += entry.adapter_cost
        if lease is None:
            lease = self._load(entry)
        try:
            self._apply_adapters(lease.model, entry)
        except BaseException:
            lease.release()
            raise
        return lease

    def _load(self, entry: _Entry) -> Lease:
        """Load ``entry``'s base (its cost, and its adapter's, already reserved): outside the pool lock."""
        base = entry.base
        models: list[ChatModel] = []
        try:
            n = self.options.parallel
            copies = f" ×{n}" if n > 1 else ""
            log.info("loading %s%s (%s)", base.path, copies, human_size(base.cost))
            extra: dict[str, Any] = self.options.loader_kwargs()
            for _ in range(n):
                models.append(self._loader(base.path, n_ctx=base.n_ctx, n_threads=self._n_threads, **extra))
        except BaseException:
            for m in models:
                m.close()
            with self._cond:
                self._used -= base.cost + (entry.adapter_cost if entry.adapter is not None else 0)
                base.loading = False
                self._cond.notify_all()
            raise
        with self._cond:
            base.models = models
            base.loading = False
            base.loads += 1
            self._lru[("base", base.key)] = None
            if entry.adapter is not None:
                base.adapters[entry.adapter] = entry.adapter_cost
                self._lru[("lora", base.key, entry.adapter)] = None
            self._cond.notify_all()  # the other instances are free for the requests waiting
            return self._take(entry, 0)

    def _admit_adapter(self, entry: _Entry) -> None:
        """Count ``entry``'s adapter as loaded on its base (llama.cpp loads it on each instance at its
        first use there). Holds ``self._cond``; room already made."""
        entry.base.adapters[entry.adapter] = entry.adapter_cost  # type: ignore[index]
        self._used += entry.adapter_cost
        self._lru[("lora", entry.base.key, entry.adapter)] = None
        name = entry.adapter.name if entry.adapter else "?"
        log.info("adding LoRA %s on the loaded %s for %s", name, entry.path.name, entry.id)

    @staticmethod
    def _apply_adapters(model: ChatModel, entry: _Entry) -> None:
        use = getattr(model, "use_adapters", None)
        if use is None:
            if entry.adapter is not None:
                raise ModelError(f"{entry.path.name}: this backend cannot apply LoRA adapters per request")
            return
        use(entry.adapters)

    def _take(self, entry: _Entry, index: int) -> Lease:
        """Hold instance ``index`` of ``entry``'s base. Holds ``self._cond``."""
        base = entry.base
        base.in_use.add(index)
        self._touch += 1
        entry.touched = self._touch
        self._lru.move_to_end(("base", base.key))
        if entry.adapter is not None:
            self._lru.move_to_end(("lora", base.key, entry.adapter))
        return Lease(base.models[index], entry.id, lambda: self._release(entry, index))

    def try_acquire(self, model_id: str) -> Lease | None:
        """A lease at once if ``model_id`` is loaded (its adapter too) and its base has an idle instance,
        else None (never blocks, never loads a base; applies the adapter set on the instance)."""
        entry = self._entry(model_id)
        with self._cond:
            if entry.base.loading or not entry.loaded:
                return None
            index = entry.base.free_instance()
            if index is None:
                return None
            lease = self._take(entry, index)
        try:
            self._apply_adapters(lease.model, entry)
        except BaseException:
            lease.release()
            raise
        return lease

    @contextmanager
    def use(self, model_id: str, timeout: float | None = None) -> Iterator[ChatModel]:
        lease = self.acquire(model_id, timeout)
        try:
            yield lease.model
        finally:
            lease.release()

    def _release(self, entry: _Entry, index: int) -> None:
        with self._cond:
            entry.base.in_use.discard(index)
            entry.last_used = time.monotonic()
            self._cond.notify_all()

    def _evictable(self, unit: _Unit, keep: _Base | None) -> bool:
        base = self._bases[unit[1]]
        if base.busy:
            return False
        return not (unit[0] == "base" and base is keep)

    def _make_room(self, cost: int, deadline: float, *, keep: _Base | None, what: str) -> None:
        """Evict idle bases and adapters (LRU first; never ``keep``) until ``cost`` more bytes fit; wait for
        busy ones. Holds ``self._cond``."""
        if self.budget_bytes is None:
            return
        while self._used + cost > self.budget_bytes:
            victim = next((u for u in self._lru if self._evictable(u, keep)), None)
            if victim is not None:
                self._evict(victim)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._cond.wait(remaining):
                if self._used + cost > self.budget_bytes:
                    raise PoolBusyError(
                        f"no memory to load {what!r}: the models in use fill the budget of "
                        f"{human_size(self.budget_bytes)}"
                    )

    def _evict(self, unit: _Unit) -> None:
        """Free an idle base (with its adapters) or one adapter of an idle base. Holds ``self._cond``."""
        base = self._bases[unit[1]]
        if unit[0] == "lora":
            adapter: Path = unit[2]
            log.info("evicting LoRA %s from %s (least recently used)", adapter.name, base.path.name)
            self._lru.pop(unit, None)
            self._used -= base.adapters.pop(adapter)
            self.evictions += 1
            for model in base.models:
                drop = getattr(model, "drop_adapter", None)
                if drop is not None:
                    drop(adapter)
            return
        log.info("evicting %s (least recently used) to stay within the memory budget", base.path.name)
        self._free_base(base)
        self.evictions += 1

    def _free_base(self, base: _Base) -> None:
        models, base.models = base.models, []
        self._lru.pop(("base", base.key), None)
        for adapter in base.adapters:
            self._lru.pop(("lora", base.key, adapter), None)
        self._used -= base.cost + sum(base.adapters.values())
        base.adapters = {}
        for model in models:
            model.close()

    def close(self) -> None:
        """Free the idle models. A model still in use (a request that outlived the server's shutdown
        grace period) is left to the process's exit: freeing it under llama.cpp would crash."""
        with self._cond:
            for base in self._bases.values():
                if not base.models:
                    continue
                if base.busy:
                    log.warning("model %s is still generating at shutdown: not freed", base.path.name)
                    continue
                self._free_base(base)
