"""Server-sent event answers: the media type, and opening a stream so that a refusal is
still a status code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmrec_serving.middleware import ClientError

log = logging.getLogger(__name__)

Event = TypeVar("Event")
Model = TypeVar("Model", bound=BaseModel)


class EventStream(StreamingResponse):
    """Server-sent events (the media type the schema publishes for the streamed routes)."""

    media_type = "text/event-stream"


async def open_stream(
    stream: AsyncIterator[Event], timeout_s: float, started: Callable[[Event], bool]
) -> list[Event]:
    """The events of ``stream`` up to the first for which ``started`` holds (the first that
    needed the engine), pulled before the answer's 200: a refusal on the way (admission's
    429/503 with Retry-After, a 504 past ``timeout_s``) is then a real status code, not an
    error event in a stream that had already said yes. Closes ``stream`` when it raises."""
    head: list[Event] = []
    try:
        async with asyncio.timeout(timeout_s):
            async for event in stream:
                head.append(event)
                if started(event):
                    break
    except TimeoutError:
        await stream.aclose()
        raise ClientError(504, "time budget exceeded") from None
    except BaseException:
        await stream.aclose()
        raise
    return head


def sse(event: BaseModel) -> str:
    """One server-sent event carrying ``event`` as JSON (unset fields left out)."""
    return f"data: {event.model_dump_json(exclude_none=True)}\n\n"


def event_answer(
    head: list[Model],
    stream: AsyncIterator[Model],
    error: Callable[[str], Model],
    expected: tuple[type[BaseException], ...],
    label: str,
) -> EventStream:
    """The 200 of an opened stream (:func:`open_stream`): ``head``, then the rest of
    ``stream``. Once the 200 is sent a failure can only be said in the stream: an
    ``expected`` one as ``error(its message)``, anything else as ``error("internal
    error")``. ``stream`` is closed when the answer ends, the client gone included."""

    async def events() -> AsyncIterator[str]:
        try:
            for event in head:
                yield sse(event)
            async for event in stream:
                yield sse(event)
        except expected as err:
            message = getattr(err, "reason", None) or getattr(err, "message", None) or str(err)
            log.warning("%s stopped: %s", label, message)
            yield sse(error(message))
        except Exception:
            log.exception("%s failed", label)
            yield sse(error("internal error"))
        finally:
            await stream.aclose()

    return EventStream(events(), headers={"Cache-Control": "no-store"})
