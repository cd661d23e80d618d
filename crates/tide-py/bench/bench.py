"""tide for Python beside the original tide 0.2.1, one workload at a time,
in whichever `tide` this interpreter imports (run it once in each venv):

    python bench.py ENDPOINT N      # prints one JSON object of rates
    python bench.py raw N           # the raw limit of put and get

Workloads: `put` and `get` (N local writes and reads, one at a time),
`push` (N pending writes sent by syncs until none is left), `initial` (a
new store pulling N documents someone else wrote). Every sync goes to the
tide-server at ENDPOINT (no authentication). The raw limit is Python's own
`sqlite3` doing the original's put transaction (outbox row, document,
clock; `synchronous=NORMAL`, WAL) and its get in the calling thread: no
event loop, no thread, nothing but the SQLite work a put or get needs.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

from tide import Tide


def doc(i: int) -> dict:
    return {"title": f"document number {i}", "body": "x" * 150, "n": i}


async def drain(tide: Tide) -> None:
    # The original syncs one exchange per call; tide syncs until caught up.
    for _ in range(100_000):
        applied = await tide.sync_once()
        if applied == 0 and not await pending(tide):
            return


async def pending(tide: Tide) -> bool:
    store = getattr(tide, "_store", None)
    return bool(store and await store.pending_ops())


async def main(endpoint: str, n: int) -> None:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        tide = await Tide(db_path=Path(d) / "a.db", endpoint=endpoint).open()
        notes = tide.collection(f"bench{int(time.time() * 1000)}")
        start = time.perf_counter()
        for i in range(n):
            await notes.put(f"{i:08}", doc(i))
        rates["put"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            await notes.get(f"{i:08}")
        rates["get"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        await drain(tide)
        rates["push"] = n / (time.perf_counter() - start)
        await tide.close()
        fresh = await Tide(db_path=Path(d) / "b.db", endpoint=endpoint).open()
        start = time.perf_counter()
        await drain(fresh)
        rates["initial"] = len(await fresh.collection(notes.name).scan()) / (time.perf_counter() - start)
        await fresh.close()
    print(json.dumps(rates))


def raw(n: int) -> None:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        db = sqlite3.connect(Path(d) / "raw.db", isolation_level=None)
        db.executescript(
            """
            PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE docs (collection TEXT NOT NULL, id TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL,
                node_id TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (collection, id));
            CREATE INDEX docs_by_collection ON docs (collection, deleted);
            CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, id TEXT NOT NULL,
                kind TEXT NOT NULL, doc TEXT, lamport INTEGER NOT NULL, node_id TEXT NOT NULL);
            """
        )
        start = time.perf_counter()
        for i in range(n):
            text = json.dumps(doc(i))
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO outbox (collection, id, kind, doc, lamport, node_id) VALUES ('c', ?, 'put', ?, ?, 'n')", (f"{i:08}", text, i))
            db.execute("INSERT OR REPLACE INTO docs VALUES ('c', ?, ?, ?, 'n', 0)", (f"{i:08}", text, i))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('lamport', ?)", (str(i),))
            db.execute("COMMIT")
        rates["put"] = n / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(n):
            row = db.execute("SELECT doc, deleted FROM docs WHERE collection = 'c' AND id = ?", (f"{i:08}",)).fetchone()
            json.loads(row[0])
        rates["get"] = n / (time.perf_counter() - start)
    print(json.dumps(rates))


if __name__ == "__main__":
    if sys.argv[1] == "raw":
        raw(int(sys.argv[2]))
    else:
        asyncio.run(main(sys.argv[1], int(sys.argv[2])))
