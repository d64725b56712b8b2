#!/usr/bin/env bash
# Start a local Prefect server (UI + API on http://127.0.0.1:4200) backed by SQLite under
# ~/.prefect, and point this shell's Prefect client at it. Ctrl-C stops it.
#   bash infra/prefect/start-server.sh            # then, in another shell: still serve
set -euo pipefail
HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
PORT="${PREFECT_SERVER_API_PORT:-4200}"
prefect config set PREFECT_API_URL="http://${HOST}:${PORT}/api" >/dev/null
exec prefect server start --host "$HOST" --port "$PORT"
