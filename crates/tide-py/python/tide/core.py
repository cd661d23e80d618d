"""`Tide` and `Collection`: tide 0.2.1's API over tide's Rust engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from tide._engine import Engine
from dataclasses import dataclass

from tide.errors import NotOpenError
from tide.protocol import Op
from tide.events import ChangeEvent
from tide.store import _TideStore

log = logging.getLogger("tide")

#: The longest a run of calls that finish without waiting (gets, and writes
#: to an idle store, which run in the call) keeps the event loop to itself:
#: past it, the next such call yields to the loop's other tasks once, as
#: an `await` that waited would have.
YIELD_INTERVAL = 0.002


def _dumps(doc: Mapping[str, Any]) -> str:
    # Compact, as tide stores documents: such text is kept as it is rather
    # than encoded again.
    return json.dumps(dict(doc), separators=(",", ":"))


@dataclass(frozen=True)
class SyncStatus:
    """What an application can show of the sync."""

    pending: int
    rejected: int
    last_success: float | None
    last_error: str | None
    reachable: bool | None


@dataclass(frozen=True)
class RejectedOp:
    """A write the server refused for good."""

    seq: int
    op: Op
    code: str
    message: str


class Collection:
    """The documents of one collection, as dicts."""

    def __init__(self, tide: Tide, name: str) -> None:
        self._tide = tide
        self._name = name

    @property
    def name(self) -> str:
        return self._name

    async def get(self, id: str) -> dict[str, Any] | None:
        # A read of one document runs in the call: it takes microseconds on
        # a reader connection that never waits for writes, less than a hop
        # to another thread and back.
        tide = self._tide
        text = tide._engine_or_raise(RuntimeError).get_now(self._name, id)
        if time.monotonic() - tide._yielded >= YIELD_INTERVAL:
            await tide._yield()
        return None if text is None else json.loads(text)

    async def put(self, id: str, doc: Mapping[str, Any]) -> None:
        await self._tide._write([(self._name, id, _dumps(doc))])

    async def delete(self, id: str) -> None:
        await self._tide._write([(self._name, id, None)])

    async def scan(self) -> list[tuple[str, dict[str, Any]]]:
        rows = await self._tide._engine_or_raise(RuntimeError).scan(self._name)
        return _docs(rows)

    def watch(self) -> AsyncIterator[ChangeEvent]:
        """This collection's changes from the first iteration on."""
        return self._tide._watch(self._name)

    async def query(
        self,
        where: list[tuple[str, str, Any]] | None = None,
        order_by: list[str] | None = None,
        limit: int = 1000,
    ) -> list[tuple[str, dict[str, Any]]]:
        """Documents by their fields: `where` holds `(field, op, value)`
        (op one of `==`, `!=`, `<`, `<=`, `>`, `>=`, `in`, `startswith`,
        `contains`, `exists`; a dotted field reaches into objects), all of
        which must hold; `order_by` names fields, `-field` descending (ties
        by id)."""
        rows = await self._tide._engine_or_raise(NotOpenError).query(self._name, _conditions(where), order_by or [], limit)
        return _docs(rows)

    async def watch_query(
        self,
        where: list[tuple[str, str, Any]] | None = None,
        order_by: list[str] | None = None,
        limit: int = 1000,
    ) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
        """A live query (`where`, `order_by`, `limit` as in `query`): its
        result at once, then again each time a local or remote change alters
        it (a burst of changes, such as a page pulled by a sync, gives one
        result). Ends when the Tide closes."""
        engine = self._tide._engine_or_raise(NotOpenError)
        live = await engine.watch_query(self._name, _conditions(where), order_by or [], limit)
        while (rows := await live.next()) is not None:
            yield _docs(rows)

    async def create_index(self, *fields: str) -> None:
        """Indexes the collection on `fields` (dotted paths), so queries
        that filter on them, or order by the first, read only what matches.
        Kept in the store file; declaring it again does nothing."""
        await self._tide._engine_or_raise(NotOpenError).index(self._name, list(fields), True)

    async def drop_index(self, *fields: str) -> None:
        """Drops the index `create_index(*fields)` made."""
        await self._tide._engine_or_raise(NotOpenError).index(self._name, list(fields), False)


def _conditions(where: list[tuple[str, str, Any]] | None) -> list[tuple[str, str, str]]:
    return [(f, op, json.dumps(v)) for f, op, v in (where or [])]


def _docs(rows: list[tuple[str, str]]) -> list[tuple[str, dict[str, Any]]]:
    return [(id, json.loads(text)) for id, text in rows]


class Tide:
    """A local store that syncs with a server: open it, write, sync."""

    def __init__(
        self,
        *,
        db_path: str | Path,
        endpoint: str | None = None,
        transport: Any = None,
        headers: Any = None,
        node_id: str | None = None,
    ) -> None:
        if endpoint is not None and transport is not None:
            raise ValueError("pass either endpoint= or transport=, not both")
        self._db_path = Path(db_path)
        self._endpoint = endpoint
        self._transport = transport
        self._headers = headers
        self._node_id = node_id
        self._engine: Engine | None = None
        self._yielded = time.monotonic()

    async def open(self) -> Tide:
        if self._engine is None:
            # A mapping, or a callable (sync or async) asked before every exchange.
            headers = self._headers if self._endpoint is not None else None
            self._engine = await Engine.open(
                str(self._db_path), self._node_id, self._endpoint, headers, self._transport
            )
            self._store = _TideStore(self._engine)
        return self

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    async def __aenter__(self) -> Tide:
        return await self.open()

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def node_id(self) -> str:
        return self._engine_or_raise(NotOpenError).node_id()

    def collection(self, name: str) -> Collection:
        if not name or "/" in name:
            raise ValueError("collection name must be non-empty and not contain '/'")
        return Collection(self, name)

    async def sync_once(self) -> int:
        if self._engine is None or (self._endpoint is None and self._transport is None):
            raise RuntimeError("no transport configured; pass endpoint= or transport= to Tide()")
        return await self._engine.sync_once()

    @contextlib.asynccontextmanager
    async def sync_forever(self, *, interval: float = 5.0, on_error: str = "log") -> AsyncIterator[None]:
        if self._endpoint is None and self._transport is None:
            raise RuntimeError("no transport configured; pass endpoint= or transport= to Tide()")

        async def loop() -> None:
            while True:
                try:
                    await self.sync_once()
                except Exception:
                    if on_error == "raise":
                        raise
                    log.warning("tide sync failed; retrying", exc_info=True)
                await asyncio.sleep(interval)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _watch(self, collection: str | None) -> AsyncIterator[ChangeEvent]:
        watcher = self._engine_or_raise(NotOpenError).watch(collection)
        while True:
            event = await watcher.next()
            if event is None:
                return
            name, id, kind, doc, source = event
            yield ChangeEvent(name, id, kind, None if doc is None else json.loads(doc), source)

    def status(self) -> SyncStatus:
        """The sync state: pending and rejected ops, the last success and error."""
        pending, rejected, last_success, last_error, reachable = self._engine_or_raise(NotOpenError).status()
        return SyncStatus(pending, rejected, last_success, last_error, reachable)

    async def rejected(self) -> list[RejectedOp]:
        """The writes the server refused, oldest first, with why."""
        rows = await self._engine_or_raise(NotOpenError).rejected()
        return [RejectedOp(seq, Op.from_json(json.loads(op)), code, message) for seq, op, code, message in rows]

    async def discard_rejected(self, seq: int) -> None:
        """Forgets a rejected write; the local document stays as it is."""
        await self._engine_or_raise(NotOpenError).discard_rejected(seq)

    async def retry_rejected(self, seq: int) -> bool:
        """Writes a rejected write again with a new stamp, which wins over
        what the server holds; False if `seq` is not a rejected write."""
        return await self._engine_or_raise(NotOpenError).retry_rejected(seq)

    async def commit(self, writes: list[tuple[str, str, Mapping[str, Any] | None]]) -> None:
        """Several writes at once, all or none: `(collection, id, doc)`,
        a `None` doc deleting."""
        await self._write([(c, id, None if doc is None else _dumps(doc)) for c, id, doc in writes])

    async def _write(self, writes: list[tuple[str, str, str | None]]) -> None:
        # A write commits in the call when nothing else is being written
        # (microseconds at synchronous=NORMAL); behind a page of remote
        # changes being applied, it waits off the event loop instead.
        engine = self._engine_or_raise(NotOpenError)
        if not engine.write_now(writes):
            await engine.write(writes)
        elif time.monotonic() - self._yielded >= YIELD_INTERVAL:
            await self._yield()

    async def _yield(self) -> None:
        # A call that finished without waiting did not let the loop run
        # anything else; a loop of them would hold it for as long as it ran
        # (the callers check YIELD_INTERVAL first: no coroutine per call).
        await asyncio.sleep(0)
        self._yielded = time.monotonic()

    def _engine_or_raise(self, error: type[Exception]) -> Engine:
        if self._engine is None:
            raise error("Tide is not open; await tide.open() first")
        return self._engine
