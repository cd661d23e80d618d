#!/usr/bin/env bash
# tide for Python beside the original tide 0.2.1, in one run: local put and
# get, push and initial sync of N documents (default 5,000), each client in
# its own venv against its own fresh tide-server (release build). Prints the
# rates and tide's ratio to the original.
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
python3 - "$work/ours.json" "$work/original.json" "$n" <<'PY'
import json, sys
ours, original = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{sys.argv[3]} documents      tide (Rust engine)     original 0.2.1     ratio")
for k in ["put", "get", "push", "initial"]:
    print(f"{k:<18} {ours[k]:>14,.0f}/s {original[k]:>14,.0f}/s {ours[k] / original[k]:>8.1f}x")
PY
