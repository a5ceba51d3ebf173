"""Per-user adapter routing: user -> current stored version -> loaded in the engine.

Each request resolves the user's adapter afresh from the store (a couple of small file
reads), so a newly published version is served from the next request on, with no restart.
A request pins the version it started with until it ends: nothing is unloaded under it.
Loaded adapters are kept in LRU order up to ``capacity`` (the engine's ``max_cpu_loras``);
older versions of a user are unloaded once idle. Names are versioned (``user@v3``), and a
name whose weights changed (the user was deleted and published again, so versions restart
at v1) is unloaded and loaded again before anyone is served the new weights under it.

A user without an adapter of their own gets the shared one; a stored adapter that fails
validation is never handed to the engine: the user falls back to the shared adapter.

A deleted user is forgotten at once: :meth:`AdapterRouter.forget` unloads their loaded
versions as soon as no request uses them (``DELETE /v1/me`` calls it), and
:meth:`AdapterRouter.sweep` does the same for users deleted by another process
(``llmrec user delete``), which the gateway runs every ``serve.store_poll_s``. A deleted
user is then served like any user without an adapter: the shared one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from llmrec.adapters import (
    ADAPTER_WEIGHTS,
    SHARED_ID,
    AdapterRef,
    AdapterStore,
    AdapterValidationError,
)
from llmrec.data import user_sort_key
from llmrec.federated import adapter_for
from llmrec.pseudonyms import pseudonym, served_name
from llmrec_serving.engines import Backend, BackendError, ServedAdapter
from llmrec_serving.prometheus import Metrics

log = logging.getLogger(__name__)


def served(ref: AdapterRef) -> ServedAdapter:
    """The engine's view of a stored version."""
    return ServedAdapter(
        ref.adapter_name, ref.user_id, ref.path, ref.manifest.files[ADAPTER_WEIGHTS]
    )


@dataclass(eq=False)
class _Entry:
    adapter: ServedAdapter
    load: asyncio.Task
    users: int = 0  # requests holding it now
    retired: str | None = None  # why to unload it when the last user lets go
    drained: asyncio.Event = field(default_factory=asyncio.Event)


class AdapterRouter:
    """Maps users to adapters loaded in one engine (``engine``: its metrics label), within
    the engine's limits."""

    def __init__(
        self,
        store: AdapterStore,
        backend: Backend,
        capacity: int,
        metrics: Metrics,
        engine: str,
    ):
        self.store = store
        self.backend = backend
        self.capacity = capacity
        self.metrics = metrics
        self._loaded_gauge = metrics.adapters_loaded.labels(engine)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._unloading: dict[str, asyncio.Task] = {}
        self._lock = asyncio.Lock()
        backend.resets.add(self.reset)

    def reset(self) -> None:
        """The engine forgot everything (it restarted): so do we."""
        self._entries.clear()
        self._loaded_gauge.set(0)

    @property
    def loaded(self) -> list[str]:
        """Names loaded now, least recently used first."""
        return list(self._entries)

    @property
    def users(self) -> set[str]:
        """The users with a version loaded now (not the shared adapter's owner)."""
        return {e.adapter.user_id for e in list(self._entries.values())} - {SHARED_ID}

    @asynccontextmanager
    async def use(self, user_id: str) -> AsyncIterator[ServedAdapter | None]:
        """The adapter to serve ``user_id`` with, loaded and pinned for the block.

        None means the bare base model (nothing published yet, not even a shared adapter).
        """
        ref = await asyncio.to_thread(self._resolve, user_id)
        if ref is None:
            self.metrics.served.labels("base").inc()
            yield None
            return
        try:
            entry = await self._acquire(ref)
        except AdapterValidationError as err:
            self.metrics.adapter_rejected.inc()
            log.error("not serving %s: %s", served_name(ref.adapter_name), err)
            shared = (
                await asyncio.to_thread(self.store.shared) if ref.user_id != SHARED_ID else None
            )
            if shared is None:
                raise BackendError(503, "no valid adapter to serve this user") from err
            entry = await self._acquire(shared)
        self.metrics.served.labels("shared" if entry.adapter.user_id == SHARED_ID else "user").inc()
        try:
            yield entry.adapter
        finally:
            await self._release(entry)

    def _resolve(self, user_id: str) -> AdapterRef | None:
        try:
            return adapter_for(self.store, user_id)
        except AdapterValidationError as err:  # e.g. CURRENT names a missing version
            self.metrics.adapter_rejected.inc()
            log.error("cannot resolve %s's adapter: %s", pseudonym(user_id), err)
            return self.store.shared()

    async def _acquire(self, ref: AdapterRef) -> _Entry:
        adapter = served(ref)
        while True:
            async with self._lock:
                entry = self._entries.get(adapter.name)
                if entry is not None and entry.adapter.digest != adapter.digest:
                    # Same name, other weights: wait until no request uses the old ones.
                    entry.retired = "stale"
                    if entry.users:
                        drained = entry.drained
                    else:
                        self._drop(entry, "stale")
                        continue
                elif entry is not None:
                    entry.users += 1
                    self._entries.move_to_end(adapter.name)
                    self.metrics.adapter_hits.inc()
                    break
                else:
                    entry = self._start_load(ref, adapter)
                    break
            await drained.wait()
        try:
            await asyncio.shield(entry.load)
        except BaseException:
            await self._release(entry)
            raise
        return entry

    def _start_load(self, ref: AdapterRef, adapter: ServedAdapter) -> _Entry:
        """Register a new entry (lock held) and start loading it in a task of its own, so a
        cancelled request never leaves a half-loaded adapter behind."""
        evict: list[str] = []
        for name, other in list(self._entries.items()):
            if other.adapter.user_id == adapter.user_id:  # an older version of this user
                other.retired = "superseded"
                if not other.users:
                    evict.append(name)
                    self._drop(other, "superseded", unload=False)
        idle = [e for e in self._entries.values() if not e.users and e.load.done()]
        while len(self._entries) + 1 > self.capacity and idle:
            victim = idle.pop(0)
            evict.append(victim.adapter.name)
            self._drop(victim, "lru", unload=False)
        task = asyncio.create_task(self._load(ref, adapter, evict))
        entry = self._entries[adapter.name] = _Entry(adapter, task, users=1)
        self._loaded_gauge.set(len(self._entries))
        return entry

    async def _load(self, ref: AdapterRef, adapter: ServedAdapter, evict: list[str]) -> None:
        start = time.perf_counter()
        try:
            for name in evict:
                await self.backend.unload_adapter(name)
            pending = self._unloading.get(adapter.name)
            if pending is not None:
                await pending
            weights = await asyncio.to_thread(self.store.load, ref)  # validated before use
            await self.backend.load_adapter(adapter, weights)
        except BaseException:
            async with self._lock:
                if self._entries.get(adapter.name) is not None:
                    del self._entries[adapter.name]
                self._loaded_gauge.set(len(self._entries))
            raise
        self.metrics.adapter_loads.inc()
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)
        log.info("loaded %s in %.3f s", served_name(adapter.name), time.perf_counter() - start)

    def _drop(self, entry: _Entry, reason: str, unload: bool = True) -> None:
        """Forget ``entry`` (lock held); unload it from the engine unless the caller does."""
        if self._entries.get(entry.adapter.name) is entry:
            del self._entries[entry.adapter.name]
        self.metrics.adapter_evictions.labels(reason).inc()
        self._loaded_gauge.set(len(self._entries))
        if unload:
            name = entry.adapter.name
            task = asyncio.create_task(self.backend.unload_adapter(name))
            self._unloading[name] = task
            task.add_done_callback(lambda t: self._unloaded(name, t))

    def _unloaded(self, name: str, task: asyncio.Task) -> None:
        if self._unloading.get(name) is task:
            del self._unloading[name]
        if not task.cancelled() and task.exception() is not None:
            log.warning("unloading %s failed: %s", served_name(name), task.exception())

    async def _release(self, entry: _Entry) -> None:
        async with self._lock:
            entry.users -= 1
            if entry.users:
                return
            entry.drained.set()
            entry.drained = asyncio.Event()
            if entry.retired and entry.load.done():
                self._drop(entry, entry.retired)

    async def forget(self, user_id: str, reason: str = "forgotten") -> list[str]:
        """Unload every loaded version of ``user_id`` (the user was deleted, or is served
        by another engine now): an idle one now (awaited), one in use when its last
        request ends. Returns the names."""
        async with self._lock:
            mine = [e for e in self._entries.values() if e.adapter.user_id == user_id]
            for entry in mine:
                entry.retired = reason
                if not entry.users and entry.load.done():
                    self._drop(entry, reason)
            unloading = [self._unloading.get(e.adapter.name) for e in mine]
        await asyncio.gather(*(t for t in unloading if t is not None), return_exceptions=True)
        if mine:
            log.info("unloaded %s (%s): %d version(s)", pseudonym(user_id), reason, len(mine))
        return [e.adapter.name for e in mine]

    async def sweep(self) -> list[str]:
        """Forget the loaded users whose adapters are gone from the store (deleted by
        another process). Returns the names unloaded or marked for unloading."""
        loaded = self.users
        if not loaded:
            return []
        stored = set(await asyncio.to_thread(self.store.users))
        gone = sorted(loaded - stored, key=user_sort_key)
        return [name for user in gone for name in await self.forget(user)]
