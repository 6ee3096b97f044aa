#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (CPU only; GPU tests skip without a GPU).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$("$root/scripts/venv.sh")
cd "$root"
exec "$py" -m pytest -q "$@"
