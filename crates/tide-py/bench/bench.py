"""tide for Python beside the original tide 0.2.1, one workload at a time,
in whichever `tide` this interpreter imports (run it once in each venv):

    python bench.py ENDPOINT N      # prints one JSON object of rates

Workloads: `put` and `get` (N local writes and reads, one at a time),
`push` (N pending writes sent by syncs until none is left), `initial` (a
new store pulling N documents someone else wrote). Every sync goes to the
tide-server at ENDPOINT (no authentication).
"""

from __future__ import annotations

import asyncio
import json
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


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
