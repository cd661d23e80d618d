#!/usr/bin/env bash
# tide for Python, tested as a user gets it: the wheel built with maturin,
# installed in a fresh venv holding only it and pytest; then the original
# tide 0.2.1's own client tests (test_protocol, test_sync, test_failure, from
# its sdist on PyPI, unchanged) and ours (tests/test_engine.py), with
# tide-server playing the original's reference server (tests/tide_shim.py).
#
#   bash crates/tide-py/tests/run.sh
#
# Needs python3 (3.10+) with venv, cargo, and PyPI. Exits non-zero on a failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "maturin>=1.5,<2" pytest pytest-asyncio
(cd "$root/crates/tide-py" && "$work/venv/bin/maturin" build --quiet --out "$work/wheels")
"$work/venv/bin/pip" install --quiet "$work"/wheels/*.whl

"$work/venv/bin/pip" download --quiet --no-deps --no-binary :all: "tide==0.2.1" -d "$work/sdist"
tar xzf "$work"/sdist/tide-0.2.1.tar.gz -C "$work/sdist"
original="$work/sdist/tide-0.2.1/tests"

(cd "$root" && cargo build --quiet --locked -p tide-server --bin tide-server)
cd "$work"
TIDE_SERVER_BIN="$root/target/debug/tide-server" PYTHONPATH="$root/crates/tide-py/tests" \
    "$work/venv/bin/python" -m pytest -p tide_shim -o asyncio_mode=auto \
    -o asyncio_default_fixture_loop_scope=function -q \
    "$original/test_protocol.py" "$original/test_sync.py" "$original/test_failure.py" \
    "$root/crates/tide-py/tests"
