# Sourced by scripts/test.sh and scripts/demo.sh: creates the virtualenv if missing,
# installs fastnets (editable) with its test and bench extras, and Triton 3.6 for the
# compile check (exported as FASTNETS_TRITON36_PATH).
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
# Triton 3.6, the Triton of the lent GPU machines, beside the venv's own: the test suite
# compiles every kernel with it too (tests/test_static_kernels.py). Only the compiler is
# needed, so it goes into its own folder (pip --target), never onto the venv's path.
TRITON36="$VENV/triton36"
if [ "$(uname -s)" = Linux ] && [ ! -f "$TRITON36/triton/__init__.py" ]; then
  python -m pip install -q --no-deps --target "$TRITON36" "triton==3.6.0"
fi
[ -f "$TRITON36/triton/__init__.py" ] && export FASTNETS_TRITON36_PATH="$(cd "$TRITON36" && pwd)"
