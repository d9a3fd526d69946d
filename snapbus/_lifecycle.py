"""`AsyncLifecycle`: ``start()``/``stop()`` behind ``async with`` (internal)."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

_Self = TypeVar("_Self", bound="AsyncLifecycle")


class AsyncLifecycle:
    """A resource started with `start` and released with `stop` (safe to call twice)."""

    __slots__ = ()

    async def start(self) -> None:
        """Acquire the resource."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Release the resource; safe to call twice."""
        raise NotImplementedError

    async def __aenter__(self: _Self) -> _Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
