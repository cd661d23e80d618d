"""A pytest plugin that plays the original's reference server for its own
tests: `tide.server.ServerStore(path)` runs `tide-server` (the binary in
`TIDE_SERVER_BIN`) on that database and forwards `exchange` over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import types
import urllib.error
import urllib.request

from tide.errors import ProtocolError, TransportError
from tide.protocol import SyncRequest, SyncResponse


class ServerStore:
    def __init__(self, db_path, *flags: str) -> None:
        auth = [] if any(f.startswith("--tokens") for f in flags) else ["--no-auth"]
        self._process = subprocess.Popen(
            [os.environ["TIDE_SERVER_BIN"], "--listen", "127.0.0.1:0", *auth, "--db", str(db_path), *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self._process.stdout.readline().strip()
        self._endpoint = line.removeprefix("tide-server listening on ")

    @property
    def endpoint(self) -> str:
        """The server's sync endpoint (for `Tide(endpoint=...)`)."""
        return self._endpoint

    def _post(self, body: bytes) -> dict:
        req = urllib.request.Request(self._endpoint, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            error = TransportError if e.code >= 500 else ProtocolError
            raise error(str(e), status=e.code, body=e.read()) from e
        except OSError as e:
            raise TransportError(str(e)) from e

    async def exchange(self, request: SyncRequest) -> SyncResponse:
        data = await asyncio.to_thread(self._post, json.dumps(request.to_json()).encode())
        return SyncResponse.from_json(data)

    def close(self) -> None:
        self._process.kill()
        self._process.wait()


server = types.ModuleType("tide.server")
server.ServerStore = ServerStore
sys.modules["tide.server"] = server
