#!/usr/bin/env bash
# Starts the recommendations API on the project's venv (installed on first use by scripts/venv.sh):
#   RECS_API_TOKEN=... ./service/serve.sh [--warehouse warehouse] [--host 127.0.0.1] [--port 8080] [--workers 1]
# Settings: environment variables RECS_* (docs/service.md); the token lives in $RECS_API_TOKEN.
set -euo pipefail
source "$(dirname "$0")/../scripts/venv.sh"
exec python -m service "$@"
