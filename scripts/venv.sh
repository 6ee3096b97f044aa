#!/usr/bin/env bash
# Creates or updates the project's venv (.venv) and prints its python; safe to run again and again.
# torch is installed only when the venv cannot import one (a system torch is seen through
# --system-site-packages); PAGEDLLM_TORCH overrides the pin. Packages are byte-compiled at install
# (pip's default): where PYTHONDONTWRITEBYTECODE is set (as on CI) Python never writes what it
# compiles on import, so each process would compile torch and transformers again (1.7 s each on a
# 2-core machine: the suite's hundreds of processes took ~130 s more).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
    python3 -m venv --system-site-packages "$venv" >&2
fi
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q "torch==${PAGEDLLM_TORCH:-2.13.0}" >&2
fi
stamp="$venv/.pagedllm-installed"
want=$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$py" -m pip install -q -e "$root[dev]" >&2
    echo "$want" > "$stamp"
fi
# The legacy openai 0.x client, beside the venv (it cannot share one with openai >= 1): the server
# tests check that vLLM users' old client code still works.
legacy="$venv/legacy-openai"
if [ ! -f "$legacy/openai/__init__.py" ]; then
    "$py" -m pip install -q --target "$legacy" "openai==0.28.1" >&2
fi
echo "$py"
