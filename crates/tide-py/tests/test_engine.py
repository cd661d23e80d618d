"""tide for Python beyond the original's own tests: a 0.2.1 store file
opens and syncs, and tide's extras (status, rejected ops, batches, queries)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from tide import ProtocolError, Tide
from tide.server import ServerStore


class InProcess:
    def __init__(self, server: ServerStore) -> None:
        self._server = server

    async def exchange(self, request):
        return await self._server.exchange(request)

    async def aclose(self) -> None:
        return None


def original_store(path: Path) -> None:
    """A store file as tide 0.2.1 leaves it: one document, one pending op."""
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE tide_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE tide_docs (collection TEXT NOT NULL, id TEXT NOT NULL, doc TEXT,
                lamport INTEGER NOT NULL, node_id TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (collection, id));
            CREATE INDEX tide_docs_by_collection ON tide_docs (collection, deleted);
            CREATE TABLE tide_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL,
                id TEXT NOT NULL, kind TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL, node_id TEXT NOT NULL);
            INSERT INTO tide_meta VALUES ('schema_version', '1'), ('node_id', 'old-phone'), ('lamport', '3');
            INSERT INTO tide_docs VALUES ('notes', 'n1', '{"title": "from 0.2.1"}', 3, 'old-phone', 0);
            INSERT INTO tide_outbox (collection, id, kind, doc, lamport, node_id)
                VALUES ('notes', 'n1', 'put', '{"title": "from 0.2.1"}', 3, 'old-phone');
            """
        )


async def test_a_0_2_1_store_file_opens_and_syncs(tmp_path: Path) -> None:
    server = ServerStore(tmp_path / "server.db")
    try:
        original_store(tmp_path / "old.db")
        async with Tide(db_path=tmp_path / "old.db", transport=InProcess(server)) as old:
            assert old.node_id == "old-phone"
            assert await old.collection("notes").get("n1") == {"title": "from 0.2.1"}
            assert old.status().pending == 1
            await old.sync_once()
            assert old.status().pending == 0
        async with Tide(db_path=tmp_path / "new.db", transport=InProcess(server)) as new:
            await new.sync_once()
            assert await new.collection("notes").scan() == [("n1", {"title": "from 0.2.1"})]
    finally:
        server.close()


async def test_batches_and_queries(tmp_path: Path) -> None:
    async with Tide(db_path=tmp_path / "a.db") as tide:
        await tide.commit(
            [
                ("tasks", "a", {"status": "open", "due": 3}),
                ("tasks", "b", {"status": "done", "due": 1}),
                ("tasks", "c", {"status": "open", "due": 2}),
                ("tasks", "gone", None),
            ]
        )
        tasks = tide.collection("tasks")
        open_ones = await tasks.query(where=[("status", "==", "open")], order_by=["due"])
        assert [id for id, _ in open_ones] == ["c", "a"]
        late = await tasks.query(where=[("due", ">=", 2)], order_by=["-due"], limit=1)
        assert late == [("a", {"status": "open", "due": 3})]
        assert tide.status().pending == 4


async def test_rejected_writes_are_listed(tmp_path: Path) -> None:
    # A server that takes documents of at most 100 bytes refuses a larger one.
    server = ServerStore(tmp_path / "server.db", "--doc-bytes-max", "100")
    try:
        async with Tide(db_path=tmp_path / "a.db", transport=InProcess(server), node_id="a") as tide:
            await tide.collection("notes").put("ok", {"v": 1})
            await tide.collection("notes").put("big", {"text": "x" * 200})
            await tide.sync_once()
            rejected = await tide.rejected()
            assert [(r.op.id, r.code) for r in rejected] == [("big", "doc_too_large")]
            assert tide.status().rejected == 1
            # Retried, it is written again (and refused again); discarded, it goes.
            assert await tide.retry_rejected(rejected[0].seq)
            assert (tide.status().pending, tide.status().rejected) == (1, 0)
            await tide.sync_once()
            again = await tide.rejected()
            assert [(r.op.id, r.code) for r in again] == [("big", "doc_too_large")]
            await tide.discard_rejected(again[0].seq)
            assert await tide.rejected() == [] and tide.status().rejected == 0
            assert not await tide.retry_rejected(again[0].seq), "no longer a rejected write"
            # The refused write was taken back: the document is as the server has it.
            assert await tide.collection("notes").get("big") is None
    finally:
        server.close()


async def test_headers_are_asked_before_every_exchange(tmp_path: Path) -> None:
    server = ServerStore(tmp_path / "server.db", "--tokens", "secret=default")
    try:
        asked = []

        async def token() -> dict[str, str]:
            asked.append(1)
            return {"authorization": "Bearer secret"}

        async with Tide(db_path=tmp_path / "a.db", endpoint=server.endpoint, headers=token) as a:
            await a.collection("notes").put("n1", {"v": 1})
            await a.sync_once()
            await a.sync_once()
        assert len(asked) >= 2, "a callable is asked again for each exchange"
        static = {"authorization": "Bearer secret"}
        async with Tide(db_path=tmp_path / "b.db", endpoint=server.endpoint, headers=static) as b:
            await b.sync_once()
            assert await b.collection("notes").get("n1") == {"v": 1}
        async with Tide(db_path=tmp_path / "c.db", endpoint=server.endpoint, headers=lambda: {}) as c:
            try:
                await c.sync_once()
            except ProtocolError:
                pass
            else:
                raise AssertionError("an exchange without the token is refused")
    finally:
        server.close()


async def test_writes_during_a_sync_all_land(tmp_path: Path) -> None:
    # A write commits in the call when the store is idle, and waits off the
    # event loop behind pages of remote changes being applied: either way
    # every write lands once, and the pulled documents too. (The Python
    # transport relays tide's extensions, so one sync pulls every page.)
    server = ServerStore(tmp_path / "server.db")
    try:
        async with Tide(db_path=tmp_path / "a.db", transport=InProcess(server)) as a:
            await a.commit([("remote", f"r{i:04}", {"i": i}) for i in range(3000)])
            await a.sync_once()
        async with Tide(db_path=tmp_path / "b.db", transport=InProcess(server)) as b:
            notes = b.collection("notes")
            sync = asyncio.create_task(b.sync_once())
            for i in range(300):
                await notes.put(f"n{i:03}", {"i": i})
                if i % 3 == 0:
                    await notes.delete(f"n{i:03}")
            await sync
            expected = [(f"n{i:03}", {"i": i}) for i in range(300) if i % 3]
            assert len(await b.collection("remote").scan()) == 3000
            assert await notes.scan() == expected
            await b.sync_once()
            assert b.status().pending == 0
        async with Tide(db_path=tmp_path / "c.db", transport=InProcess(server)) as c:
            await c.sync_once()
            assert await c.collection("notes").scan() == expected
    finally:
        server.close()


async def test_calls_that_finish_at_once_still_let_other_tasks_run(tmp_path: Path) -> None:
    # Gets, and writes to an idle store, finish in the call; a loop of them
    # must still yield to the event loop's other tasks (every YIELD_INTERVAL).
    async with Tide(db_path=tmp_path / "a.db") as tide:
        notes = tide.collection("notes")
        ran = 0
        stop = asyncio.Event()

        async def other_task() -> None:
            nonlocal ran
            while not stop.is_set():
                ran += 1
                await asyncio.sleep(0)

        await tide.commit([("notes", f"n{i}", {"i": i}) for i in range(100)])
        other = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        started = ran
        # Reads only: a write may wait (behind a checkpoint), and waiting yields.
        for i in range(5000):
            assert await notes.get(f"n{i % 100}") == {"i": i % 100}
        during = ran - started
        stop.set()
        await other
        assert during > 0, "the other task never ran while 5,000 gets were made"


async def test_live_queries_and_indexes(tmp_path: Path) -> None:
    async with Tide(db_path=tmp_path / "a.db") as tide:
        tasks = tide.collection("tasks")
        await tasks.create_index("status", "due")
        await tide.commit([("tasks", "a", {"status": "open", "due": 3}), ("tasks", "b", {"status": "done", "due": 1})])
        live = tasks.watch_query(where=[("status", "==", "open")], order_by=["due"])
        assert await anext(live) == [("a", {"status": "open", "due": 3})], "the result at once"
        await tasks.put("c", {"status": "open", "due": 0})
        assert [id for id, _ in await anext(live)] == ["c", "a"]
        # A change that cannot alter the result gives no update; the next one does.
        await tasks.put("b", {"status": "done", "due": 2})
        await tasks.put("a", {"status": "done", "due": 3})
        assert [id for id, _ in await anext(live)] == ["c"]
        await live.aclose()
        await tasks.drop_index("status", "due")
        assert [id for id, _ in await tasks.query(where=[("status", "==", "done")], order_by=["due"])] == ["b", "a"]
