#!/usr/bin/env bash
# Runs the opt-in end-to-end test `real_langflow_returns_the_text_of_a_chat_flow` against a
# real LangFlow started here, on loopback, with a throwaway database:
#
#   1. install LangFlow into a venv (reused when it already has `bin/langflow`)
#   2. start `langflow run --backend-only` on a free port, auto-login on, in a temporary dir
#   3. log in, create an API key, create a Chat Input -> Chat Output flow over the REST API
#   4. run `cargo test --test e2e real_langflow` with MULTIPLEX_REAL_LANGFLOW* set
#   5. stop LangFlow and delete the temporary dir, whatever happened
#
# Environment:
#   MULTIPLEX_LANGFLOW_VENV     venv to use or create (default: target/langflow-venv)
#   MULTIPLEX_LANGFLOW_SPEC     what to install (default: langflow==1.13.0, the recorded version)
#   MULTIPLEX_LANGFLOW_TIMEOUT  seconds to wait for LangFlow to come up (default: 300)
#   MULTIPLEX_LANGFLOW_KEEP=1   keep the temporary dir (LangFlow's log and database)
# The API key is never printed; it goes to curl through a mode-600 header file.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MULTIPLEX_LANGFLOW_VENV:-$repo/target/langflow-venv}"
spec="${MULTIPLEX_LANGFLOW_SPEC:-langflow==1.13.0}"
timeout="${MULTIPLEX_LANGFLOW_TIMEOUT:-300}"

phase() { printf '\n== real-langflow: %s\n' "$*"; }
fail() {
    printf 'real-langflow: %s\n' "$*" >&2
    exit 1
}

# --- 1. venv -------------------------------------------------------------------------------
if [[ -x "$venv/bin/langflow" ]]; then
    phase "reusing LangFlow in $venv"
else
    phase "installing $spec into $venv (takes a few minutes the first time)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check uv
    VIRTUAL_ENV="$venv" "$venv/bin/uv" pip install --quiet "$spec"
fi
py="$venv/bin/python"
"$venv/bin/langflow" --version 2>/dev/null | grep -i '^langflow' || true

# --- 2. start LangFlow ---------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/multiplex-langflow.XXXXXX")"
chmod 700 "$work"
langflow_pid=""

stop_langflow() {
    local status=$?
    if [[ -n "$langflow_pid" ]] && kill -0 "$langflow_pid" 2>/dev/null; then
        phase "stopping LangFlow (pid $langflow_pid)"
        # setsid made LangFlow a process group leader: stop its workers with it.
        kill -TERM -- "-$langflow_pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$langflow_pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$langflow_pid" 2>/dev/null || true
    fi
    if [[ $status -ne 0 && -f "$work/langflow.log" ]]; then
        echo "-- last lines of LangFlow's log:" >&2
        tail -n 40 "$work/langflow.log" >&2 || true
    fi
    if [[ "${MULTIPLEX_LANGFLOW_KEEP:-0}" == 1 ]]; then
        echo "real-langflow: kept $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap stop_langflow EXIT
trap 'exit 130' INT TERM

port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0));
print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
phase "starting LangFlow on $base (config and database in $work)"
mkdir -p "$work/config"
LANGFLOW_CONFIG_DIR="$work/config" \
    LANGFLOW_DATABASE_URL="sqlite:///$work/langflow.db" \
    LANGFLOW_AUTO_LOGIN=true \
    LANGFLOW_SKIP_AUTH_AUTO_LOGIN=false \
    LANGFLOW_OPEN_BROWSER=false \
    DO_NOT_TRACK=true \
    setsid "$venv/bin/langflow" run --backend-only --host 127.0.0.1 --port "$port" \
    >"$work/langflow.log" 2>&1 </dev/null &
langflow_pid=$!

phase "waiting for $base/health_check (up to ${timeout}s)"
deadline=$((SECONDS + timeout))
until curl -sf --max-time 5 "$base/health_check" 2>/dev/null | grep -q '"db": *"ok"'; do
    kill -0 "$langflow_pid" 2>/dev/null || fail "LangFlow exited during startup"
    ((SECONDS < deadline)) || fail "LangFlow not healthy after ${timeout}s"
    sleep 2
done
curl -sf "$base/api/v1/version"
echo

# --- 3. token, API key, flow ---------------------------------------------------------------
# json FIELD: prints a top-level field of the JSON document on stdin.
json() { "$py" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

phase "logging in (auto-login) and creating an API key"
auth="$work/auth.header"
key_header="$work/key.header"
(
    umask 077
    token="$(curl -sf "$base/api/v1/auto_login" | json access_token)"
    printf 'Authorization: Bearer %s\n' "$token" >"$auth"
    key="$(curl -sf -H @"$auth" -H 'Content-Type: application/json' \
        -d '{"name": "multiplex-real-langflow-test"}' "$base/api/v1/api_key/" | json api_key)"
    printf 'x-api-key: %s\n' "$key" >"$key_header"
)
[[ -s "$key_header" ]] || fail "no API key"
key="$(sed -n 's/^x-api-key: //p' "$key_header")"

phase "creating a Chat Input -> Chat Output flow from the templates of GET /api/v1/all"
curl -sf -H @"$auth" "$base/api/v1/all" >"$work/all.json"
endpoint="multiplex-echo-$port"
"$py" - "$work/all.json" "$endpoint" >"$work/flow.json" <<'PY'
"""Builds the flow the way LangFlow's frontend saves it: each node carries its component's
template from /api/v1/all, and the edge's handles are the frontend's scapedJSONStringfy (keys
sorted, no spaces, every '"' replaced by 'œ') of the objects also kept in edge.data."""
import json
import sys

catalog = json.load(open(sys.argv[1]))
endpoint = sys.argv[2]


def component(name):
    for category in catalog.values():
        if isinstance(category, dict) and name in category:
            return category[name]
    sys.exit(f"GET /api/v1/all has no {name} component")


def handle(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).replace('"', "œ")


def node(kind, node_id, x):
    return {
        "id": node_id,
        "type": "genericNode",
        "position": {"x": x, "y": 200},
        "data": {"id": node_id, "type": kind, "node": component(kind), "showNode": True},
    }


source, target = "ChatInput-mplx1", "ChatOutput-mplx2"
chat_input = node("ChatInput", source, 100)
chat_output = node("ChatOutput", target, 600)
output = chat_input["data"]["node"]["outputs"][0]
field = chat_output["data"]["node"]["template"]["input_value"]
source_handle = {
    "dataType": "ChatInput",
    "id": source,
    "name": output["name"],
    "output_types": output.get("types", ["Message"]),
}
target_handle = {
    "fieldName": "input_value",
    "id": target,
    "inputTypes": field.get("input_types", ["Message"]),
    "type": field.get("type", "other"),
}
sh, th = handle(source_handle), handle(target_handle)
edge = {
    "id": f"xy-edge__{source}{sh}-{target}{th}",
    "source": source,
    "sourceHandle": sh,
    "target": target,
    "targetHandle": th,
    "data": {"sourceHandle": source_handle, "targetHandle": target_handle},
    "animated": False,
    "className": "",
    "selected": False,
}
json.dump(
    {
        "name": "multiplex echo",
        "description": "Chat Input -> Chat Output, for Multiplex's end-to-end test",
        "endpoint_name": endpoint,
        "data": {
            "nodes": [chat_input, chat_output],
            "edges": [edge],
            "viewport": {"x": 0, "y": 0, "zoom": 1},
        },
    },
    sys.stdout,
)
PY
flow_id="$(curl -sf -H @"$key_header" -H 'Content-Type: application/json' \
    --data-binary @"$work/flow.json" "$base/api/v1/flows/" | json id)"
echo "flow id $flow_id, endpoint name $endpoint"

phase "reading the flow back and running it once with curl"
curl -sf -H @"$key_header" "$base/api/v1/flows/$flow_id" | "$py" -c '
import json, sys
data = json.load(sys.stdin)["data"]
nodes, edges = len(data["nodes"]), len(data["edges"])
print(f"stored: {nodes} nodes, {edges} edge(s)")
sys.exit(0 if edges == 1 else "the edge was not stored")'
curl -sf -H @"$key_header" -H 'Content-Type: application/json' \
    -d '{"input_value": "ping", "input_type": "chat", "output_type": "chat",
         "session_id": "multiplex-smoke"}' \
    "$base/api/v1/run/$endpoint" | "$py" -c '
import json, sys
answer = json.load(sys.stdin)
text = answer["outputs"][0]["outputs"][0]["results"]["message"]["text"]
session = answer["session_id"]
print(f"session {session}, text {text!r}")
sys.exit(0 if text == "ping" else "the flow does not echo its input")'

# --- 4. the test ---------------------------------------------------------------------------
phase "cargo test --test e2e real_langflow"
export MULTIPLEX_REAL_LANGFLOW="$base"
export MULTIPLEX_REAL_LANGFLOW_FLOW="$flow_id"
export MULTIPLEX_REAL_LANGFLOW_KEY="$key"
cd "$repo"
cargo test --test e2e real_langflow -- --nocapture
phase "passed"
