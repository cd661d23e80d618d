"""The wire types of the sync protocol version 0, as tide 0.2.1 exchanges them.

A sync exchange is one request (the client's pending ops and its cursor) and
one response (the changes after the cursor and a new cursor).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

OpKind = Literal["put", "delete"]


@dataclass(frozen=True)
class Op:
    """A local write on its way to the server, with its Lamport stamp."""

    collection: str
    id: str
    kind: OpKind
    doc: dict[str, Any] | None
    lamport: int
    node_id: str
    op_id: str = field(default="")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "collection": self.collection,
            "id": self.id,
            "kind": self.kind,
            "doc": self.doc,
            "lamport": self.lamport,
            "node_id": self.node_id,
        }
        if self.op_id:
            data["op_id"] = self.op_id
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Op:
        return cls(
            collection=data["collection"],
            id=data["id"],
            kind=data["kind"],
            doc=data.get("doc"),
            lamport=int(data["lamport"]),
            node_id=data["node_id"],
            op_id=str(data.get("op_id") or ""),
        )


@dataclass(frozen=True)
class Change:
    """A version the server stored, as it sends it, with its seq."""

    collection: str
    id: str
    kind: OpKind
    doc: dict[str, Any] | None
    lamport: int
    node_id: str
    seq: int

    def to_json(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "id": self.id,
            "kind": self.kind,
            "doc": self.doc,
            "lamport": self.lamport,
            "node_id": self.node_id,
            "seq": self.seq,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Change:
        return cls(
            collection=data["collection"],
            id=data["id"],
            kind=data["kind"],
            doc=data.get("doc"),
            lamport=int(data["lamport"]),
            node_id=data["node_id"],
            seq=int(data["seq"]),
        )


def _extensions(data: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


@dataclass(frozen=True)
class SyncRequest:
    """The client's side of an exchange.

    `extensions` holds the fields tide adds to 0.2.1's (PROTOCOL.md): a
    transport that relays a request through `to_json`/`from_json` relays
    them too."""

    node_id: str
    cursor: str | None
    ops: list[Op]
    extensions: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = {"node_id": self.node_id, "cursor": self.cursor, "ops": [op.to_json() for op in self.ops]}
        return {**self.extensions, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncRequest:
        cursor = data.get("cursor")
        return cls(
            node_id=data["node_id"],
            cursor=None if cursor is None else str(cursor),
            ops=[Op.from_json(o) for o in data.get("ops") or []],
            extensions=_extensions(data, ("node_id", "cursor", "ops")),
        )


@dataclass(frozen=True)
class SyncResponse:
    """The server's side of an exchange.

    `extensions` holds the fields tide adds to 0.2.1's (per-op results,
    whether more changes wait, digests...): a transport that builds its
    response with `from_json` passes them on."""

    cursor: str
    changes: list[Change]
    extensions: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = {"cursor": self.cursor, "changes": [c.to_json() for c in self.changes]}
        return {**self.extensions, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncResponse:
        return cls(
            cursor=str(data["cursor"]),
            changes=[Change.from_json(c) for c in data.get("changes") or []],
            extensions=_extensions(data, ("cursor", "changes")),
        )
