#!/usr/bin/env bash
# tide for Python beside the original tide 0.2.1, in one run: local put and
# get, push and initial sync of N documents (default 5,000), each client in
# its own venv against its own fresh tide-server (release build). Prints the
# rates, tide's ratio to the original, and for put and get the raw limit
# (Python's sqlite3 doing the original's SQL in the calling thread, the
# least any Python call can take).
#
#   bash crates/tide-py/bench/run.sh [N]
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
n="${1:-5000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

(cd "$root" && cargo build --quiet --release --locked -p tide-server --bin tide-server)
python3 -m venv "$work/ours"
"$work/ours/bin/pip" install --quiet "maturin>=1.5,<2"
(cd "$root/crates/tide-py" && "$work/ours/bin/maturin" build --quiet --release --out "$work/wheels")
"$work/ours/bin/pip" install --quiet "$work"/wheels/*.whl
python3 -m venv "$work/original"
"$work/original/bin/pip" install --quiet "tide==0.2.1"

run() {
    local name="$1"
    "$root/target/release/tide-server" --listen 127.0.0.1:0 --no-auth --db "$work/$name-server.db" \
        >"$work/$name-server.out" 2>/dev/null &
    local pid=$!
    until grep -q listening "$work/$name-server.out" 2>/dev/null; do sleep 0.05; done
    local endpoint
    endpoint="$(sed -n 's/^tide-server listening on //p' "$work/$name-server.out")"
    "$work/$name/bin/python" "$root/crates/tide-py/bench/bench.py" "$endpoint" "$n" >"$work/$name.json"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}
run ours
run original
"$work/original/bin/python" "$root/crates/tide-py/bench/bench.py" raw "$n" >"$work/raw.json"
python3 - "$work/ours.json" "$work/original.json" "$work/raw.json" "$n" <<'PY'
import json, sys
ours, original, raw = (json.load(open(p)) for p in sys.argv[1:4])
print(f"{sys.argv[4]} documents   tide (Rust engine)   original 0.2.1   ratio   raw limit   original to raw")
for k in ["put", "get", "push", "initial"]:
    limit = f"{raw[k]:>9,.0f}/s {original[k] / raw[k]:>12.2f}" if k in raw else f"{'-':>11} {'-':>12}"
    print(f"{k:<14} {ours[k]:>14,.0f}/s {original[k]:>14,.0f}/s {ours[k] / original[k]:>6.1f}x {limit}")
PY
