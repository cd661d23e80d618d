"""The local store file, as tide 0.2.1 exposes it: `Store(path)` opens (and
migrates) it; a newer schema than this build knows is refused."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tide._engine import Engine
from tide.errors import TideError
from tide.protocol import Op

#: The schema version this build writes (tide's store schema; 0.2.1's was 1,
#: and its files migrate in place).
SCHEMA_VERSION = 5


class Store:
    """A store file opened on its own (no sync)."""

    def __init__(self, db_path: str | Path) -> None:
        self._path = Path(db_path)
        self._engine: Engine | None = None

    async def open(self) -> Store:
        try:
            self._engine = await Engine.open(str(self._path))
        except TideError as e:
            raise RuntimeError(str(e)) from e
        return self

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.close()

    async def pending_ops(self) -> list[tuple[int, Op]]:
        if self._engine is None:
            raise RuntimeError("Store is not open")
        return await _pending(self._engine)

    def _get_meta_sync(self, key: str) -> str | None:
        with sqlite3.connect(self._path) as conn:
            row = conn.execute("SELECT value FROM tide_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta_sync(self, key: str, value: str) -> None:
        with sqlite3.connect(self._path) as conn:
            conn.execute(
                "INSERT INTO tide_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


class _TideStore:
    """`Tide._store`: the open Tide's store, for the calls tests make."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def pending_ops(self) -> list[tuple[int, Op]]:
        return await _pending(self._engine)


async def _pending(engine: Engine) -> list[tuple[int, Op]]:
    rows = await engine.pending_ops()
    return [(seq, Op.from_json(json.loads(text))) for seq, text in rows]
