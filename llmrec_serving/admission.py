"""Admission control: a bounded FIFO queue in front of the backend.

At most ``max_concurrency`` requests run; at most ``max_queue`` wait, in arrival order.
Beyond that a request is refused at once (503 + Retry-After) instead of making everyone's
wait longer, and one user may hold at most ``per_user`` places (429 + Retry-After), so one
client cannot starve the rest. A finishing request hands its permit straight to the oldest
waiter, so nobody can overtake the queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Rejected(Exception):
    """The request was not admitted; ``status`` is 429 or 503."""

    def __init__(self, status: int, reason: str, retry_after_s: int):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s


class Admission:
    """Counts running and waiting requests, globally and per user."""

    def __init__(
        self,
        max_concurrency: int,
        max_queue: int,
        per_user: int,
        queue_timeout_s: float,
        retry_after_s: int,
    ):
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.per_user = per_user
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self.running = 0
        self._waiters: deque[asyncio.Future] = deque()
        self._by_user: Counter[str] = Counter()

    @property
    def waiting(self) -> int:
        """Requests in the queue now."""
        return len(self._waiters)

    @asynccontextmanager
    async def permit(self, user_id: str) -> AsyncIterator[None]:
        """Hold one permit to run ``user_id``'s request on the backend, or raise
        :class:`Rejected`."""
        if self._by_user[user_id] >= self.per_user:
            raise Rejected(429, "too many concurrent requests for this user", self.retry_after_s)
        busy = self.running >= self.max_concurrency or self._waiters
        if busy and self.waiting >= self.max_queue:
            raise Rejected(503, "the server is at capacity", self.retry_after_s)
        self._by_user[user_id] += 1
        try:
            if busy:
                await self._wait()
            else:
                self.running += 1
            try:
                yield
            finally:
                self._release()
        finally:
            self._by_user[user_id] -= 1
            if not self._by_user[user_id]:
                del self._by_user[user_id]

    async def _wait(self) -> None:
        """Queue up until a finishing request hands over its permit."""
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), self.queue_timeout_s)
        except BaseException as err:
            if turn.done():  # handed a permit just as we gave up: pass it on
                self._release()
            else:
                turn.cancel()
            if isinstance(err, TimeoutError):
                raise Rejected(503, "timed out waiting in the queue", self.retry_after_s) from None
            raise
        finally:
            if turn in self._waiters:
                self._waiters.remove(turn)

    def _release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)  # the permit moves to the oldest waiter: running unchanged
                return
        self.running -= 1
