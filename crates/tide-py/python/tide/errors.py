"""tide's exceptions, as in tide 0.2.1."""

from __future__ import annotations


class TideError(Exception):
    """Every tide error."""


class NotOpenError(TideError):
    """The Tide is not open."""


class _HttpError(TideError):
    """An error that may carry the server's HTTP status and error body; a
    Python transport that passes them on lets the engine act on the body's
    code (for one refused op: set it aside and go on)."""

    def __init__(self, message: str = "", *, status: int | None = None, body: bytes | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class TransportError(_HttpError):
    """The exchange failed in a way a retry can fix (network, 5xx)."""


class ProtocolError(_HttpError):
    """The server refused the request (4xx) or answered something else than a sync response."""


class ConflictError(TideError):
    """Reserved: last writer wins resolves every conflict."""
