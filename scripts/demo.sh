#!/usr/bin/env bash
# The main job: set up .venv if needed, then generate with pagedllm (GPU if there is one, else CPU).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$("$root/scripts/venv.sh")
exec "$py" "$root/scripts/demo.py" "$@"
