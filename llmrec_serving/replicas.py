"""Several engines behind one gateway: each user hashed onto an engine, health and failover.

Every engine has its own :class:`~llmrec_serving.adapters.AdapterRouter` (its own LRU of
loaded adapters), and a user is always sent to the same engine while it answers, so their
adapter stays warm where it was loaded. The engine is chosen by rendezvous hashing (highest
random weight), a consistent-hashing scheme written here because it is a few lines: each
user ranks the engines by a hash of (user, engine), and is served by the first one up. Adding
or removing an engine moves only the users whose first choice it was, and when an engine
dies its users spread evenly over the others (a hash ring without virtual nodes would hand
them all to one neighbour).

An engine is marked down when its health check fails: the periodic probe
(``serve.engine_probe_s``), or at once when a request on it failed as if it were dead. Its
users then go to their next engine, which loads their adapter on demand; once it answers
again they come back, and :meth:`Replicas.sweep` unloads the copies they left on the
engine that stood in.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from llmrec.data import user_sort_key
from llmrec.pseudonyms import pseudonym
from llmrec_serving.adapters import AdapterRouter
from llmrec_serving.engines import Backend, BackendError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Engine:
    """One engine, the adapters loaded on it, and whether it answered its last check."""

    name: str
    """``engine-<i>``: its label in the metrics and in /readyz."""
    backend: Backend
    router: AdapterRouter
    up: bool = True


def rendezvous_order(user_id: str, names: list[str]) -> list[int]:
    """The indices of ``names``, in ``user_id``'s order of preference (stable across
    processes and restarts: the hash is unkeyed)."""

    def weight(name: str) -> bytes:
        return hashlib.blake2b(f"{name}\0{user_id}".encode(), digest_size=8).digest()

    return sorted(range(len(names)), key=lambda i: weight(names[i]), reverse=True)


class Replicas:
    """The engines of one gateway, and which one serves each user."""

    def __init__(self, engines: list[Engine]):
        if not engines:
            raise ValueError("a gateway needs at least one engine")
        self.engines = engines
        self._names = [e.name for e in engines]

    def __iter__(self) -> Iterator[Engine]:
        return iter(self.engines)

    def __getitem__(self, index: int) -> Engine:
        return self.engines[index]

    @property
    def kind(self) -> str:
        """The engines' kind (``vllm`` or ``inprocess``)."""
        return self.engines[0].backend.kind

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion any engine takes (they are configured alike)."""
        return min(e.backend.max_model_len for e in self.engines)

    def order(self, user_id: str) -> list[Engine]:
        """Every engine, in ``user_id``'s order of preference."""
        return [self.engines[i] for i in rendezvous_order(user_id, self._names)]

    def pick(self, user_id: str) -> Engine:
        """The engine that serves ``user_id`` now: their first choice that is up.
        Raises BackendError(503) when none is."""
        for engine in self.order(user_id):
            if engine.up:
                return engine
        raise BackendError(503, "no engine answers")

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start (or connect to) every engine, all at once."""
        await asyncio.gather(*(e.backend.start() for e in self.engines))

    async def close(self) -> None:
        """Stop every engine, even when one fails to stop."""
        results = await asyncio.gather(
            *(e.backend.close() for e in self.engines), return_exceptions=True
        )
        for engine, result in zip(self.engines, results, strict=True):
            if isinstance(result, BaseException):
                log.error("stopping %s failed: %r", engine.name, result)

    async def check(self, engine: Engine) -> bool:
        """Ask ``engine`` whether it answers, and route by the answer from now on."""
        up = await engine.backend.ready()
        if up != engine.up:
            if up:
                log.info("%s answers again: its users come back to it", engine.name)
            else:
                log.warning("%s does not answer: its users move to their next engine", engine.name)
        engine.up = up
        return up

    async def probe(self) -> bool:
        """Check every engine; True when at least one answers."""
        return any(await asyncio.gather(*(self.check(e) for e in self.engines)))

    async def forget(self, user_id: str) -> list[str]:
        """Unload ``user_id``'s adapters from every engine (the user was deleted)."""
        found = await asyncio.gather(*(e.router.forget(user_id) for e in self.engines))
        return [name for names in found for name in names]

    async def sweep(self) -> list[str]:
        """Unload the adapters of deleted users (every engine), and those left on an engine
        that stood in for a user's first choice which answers again. Returns the names."""
        names = []
        for engine in self.engines:
            names += await engine.router.sweep()
        if len(self.engines) > 1 and any(e.up for e in self.engines):
            for engine in self.engines:
                for user in sorted(engine.router.users, key=user_sort_key):
                    if self.pick(user) is not engine:
                        log.info("%s: %s moved back", engine.name, pseudonym(user))
                        names += await engine.router.forget(user, reason="moved")
        return names
