"""tide: a local SQLite store, a durable outbox and sync with a server,
with tide 0.2.1's API, on tide's Rust engine."""

from tide.core import Collection, RejectedOp, SyncStatus, Tide
from tide.errors import ConflictError, NotOpenError, ProtocolError, TideError, TransportError
from tide.events import ChangeEvent
from tide.protocol import Change, Op, SyncRequest, SyncResponse

__version__ = "0.2.1.post1"

__all__ = [
    "Change",
    "ChangeEvent",
    "Collection",
    "ConflictError",
    "NotOpenError",
    "Op",
    "ProtocolError",
    "RejectedOp",
    "SyncStatus",
    "SyncRequest",
    "SyncResponse",
    "Tide",
    "TideError",
    "TransportError",
]
