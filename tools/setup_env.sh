#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install medfm_ops with its pinned dependencies from
# this repository's own pyproject.toml. Idempotent: a healthy existing environment is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MEDFM_VENV:-.venv}"
PY="${PYTHON:-python3}"

"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
# torch 2.13.0 (CPU build) may lie in a local wheel folder; use it when present instead of downloading a CUDA build
FIND_LINKS=()
for d in ${MEDFM_WHEELS:-/opt/wheels}; do [ -d "$d" ] && FIND_LINKS+=(--find-links "$d"); done
stamp="$VENV/.medfm_installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import medfm_ops, monai, ignite" 2>/dev/null; then
  echo "[setup] reusing $VENV (dependencies up to date)"
else
  echo "[setup] installing medfm_ops and its pinned dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${FIND_LINKS[@]}" -e ".[test]"
  echo "$want" > "$stamp"
fi
"$VENV/bin/python" -c "import torch, monai; print(f'[setup] torch {torch.__version__}, MONAI {monai.__version__}')"
