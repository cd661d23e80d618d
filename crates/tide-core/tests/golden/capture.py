"""Capture golden wire messages from the original Python tide 0.2.1.

Runs the original reference server (uvicorn on loopback) and drives the
original client against it, recording every request and response body
byte for byte, plus the server's error bodies for malformed requests.

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install "tide==0.2.1" starlette uvicorn
    /tmp/pyref/bin/python crates/tide-core/tests/golden/capture.py > crates/tide-core/tests/golden/original-0.2.1.json

The output is checked in; tide-core's tests decode and re-encode it.
"""

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from tide import Tide


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def main() -> None:
    tmp = tempfile.mkdtemp()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable, "-c",
            "import uvicorn; from tide.server import create_app; "
            f"uvicorn.run(create_app('{tmp}/server.db'), host='127.0.0.1', port={port}, log_level='error')",
        ]
    )
    endpoint = f"http://127.0.0.1:{port}/sync"
    vectors: list[dict] = []
    try:
        for _ in range(100):
            try:
                httpx.get(f"http://127.0.0.1:{port}/")
                break
            except httpx.HTTPError:
                time.sleep(0.1)

        step = {"name": ""}

        async def on_request(request: httpx.Request) -> None:
            vectors.append({"name": step["name"], "from": "client", "body": request.content.decode()})

        async def on_response(response: httpx.Response) -> None:
            await response.aread()
            vectors.append(
                {"name": step["name"], "from": "server", "status": response.status_code, "body": response.text}
            )

        def client() -> httpx.AsyncClient:
            return httpx.AsyncClient(event_hooks={"request": [on_request], "response": [on_response]})

        from tide.transport import HTTPTransport

        ca, cb = client(), client()
        async with Tide(db_path=f"{tmp}/a.db", node_id="node-a", transport=HTTPTransport(endpoint, client=ca)) as a, \
                Tide(db_path=f"{tmp}/b.db", node_id="node-b", transport=HTTPTransport(endpoint, client=cb)) as b:
            notes_a, notes_b = a.collection("notes"), b.collection("notes")
            step["name"] = "first sync of an empty client"
            await a.sync_once()
            await notes_a.put("n1", {"title": "Hello", "body": "World", "n": 1.5, "tags": ["x", "y"], "u": "é\"\\"})
            await notes_a.put("n2", {"title": "Two"})
            await notes_a.delete("n1")
            step["name"] = "push two puts and a delete"
            await a.sync_once()
            step["name"] = "fresh client pulls everything"
            await b.sync_once()
            await notes_b.put("n2", {"title": "Two, edited by b"})
            step["name"] = "b overwrites n2"
            await b.sync_once()
            step["name"] = "a catches up"
            await a.sync_once()
            step["name"] = "a pushes a stale duplicate"
        await ca.aclose()
        await cb.aclose()

        raw = [
            ("duplicate push of an already accepted op", json.dumps({
                "node_id": "node-a", "cursor": "0",
                "ops": [{"collection": "notes", "id": "n2", "kind": "put", "doc": {"title": "Two"},
                         "lamport": 2, "node_id": "node-a", "op_id": "op-1"}]})),
            ("cursor null and no ops", json.dumps({"node_id": "node-c", "cursor": None, "ops": []})),
            ("not json", "{not json"),
            ("missing node_id", json.dumps({"cursor": None, "ops": []})),
            ("op missing lamport", json.dumps({"node_id": "x", "ops": [{"collection": "c", "id": "i", "kind": "put", "doc": {}, "node_id": "x"}]})),
        ]
        async with httpx.AsyncClient() as http:
            for name, body in raw:
                vectors.append({"name": name, "from": "client", "body": body})
                r = await http.post(endpoint, content=body, headers={"content-type": "application/json"})
                vectors.append({"name": name, "from": "server", "status": r.status_code, "body": r.text})
    finally:
        server.terminate()
        server.wait()
    json.dump(vectors, sys.stdout, indent=1, ensure_ascii=False)
    print()


asyncio.run(main())
