"""What a watcher receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class ChangeEvent:
    """A local or remote change to one document."""

    collection: str
    id: str
    kind: Literal["put", "delete"]
    doc: dict[str, Any] | None
    source: Literal["local", "remote"]
