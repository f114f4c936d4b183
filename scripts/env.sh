# Sourced by scripts/test.sh and scripts/demo.sh: creates the virtualenv if missing and
# installs fastnets (editable) with its test and bench extras.
#   FASTNETS_VENV  where the env lives (default .venv)
#   FASTNETS_TORCH the torch requirement when torch is not installed yet (default
#                  torch==2.13.0; on a GPU machine pick the CUDA build you want)
set -euo pipefail
VENV=${FASTNETS_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -c "import torch" 2>/dev/null || python -m pip install -q "${FASTNETS_TORCH:-torch==2.13.0}"
python -m pip install -q -e ".[test,bench]"
