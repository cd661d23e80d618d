"""How a Tide reaches its server: an endpoint (tide's Rust HTTP transport,
used when `Tide(endpoint=...)`), or any object with `async exchange(request)`
and `async aclose()` (`Tide(transport=...)`)."""

from __future__ import annotations

from typing import Protocol

from tide.protocol import SyncRequest, SyncResponse


class Transport(Protocol):
    async def exchange(self, request: SyncRequest) -> SyncResponse: ...

    async def aclose(self) -> None: ...
