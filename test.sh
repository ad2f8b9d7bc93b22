#!/usr/bin/env bash
# Runs the test suite on local Spark (one shared session). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/scripts/venv.sh"
cd "$ROOT"
exec python -m pytest "$@"
