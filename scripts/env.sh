# Sourced by scripts/test.sh and scripts/demo.sh: creates the virtualenv if missing,
# installs fastnets (editable) with its test and bench extras at the versions pinned in
# constraints.txt, and Triton 3.6 for the compile check (exported as FASTNETS_TRITON36_PATH).
#   FASTNETS_VENV   where the env lives (default .venv)
#   FASTNETS_TORCH  the torch requirement when torch is not installed yet (default
#                   torch==2.13.0; on a GPU machine pick the CUDA build you want)
#   FASTNETS_NEWEST 1: the newest releases of everything but torch instead of the pins
#                   (scripts/pin.sh moves the pins there after a green run)
set -euo pipefail
VENV=${FASTNETS_VENV:-.venv}
FASTNETS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "${FASTNETS_NEWEST:-0}" = 1 ]; then
  python -c "import torch" 2>/dev/null || python -m pip install -q "${FASTNETS_TORCH:-torch==2.13.0}"
  # Everything upgraded to its newest release, except torch: it stays the build installed.
  KEEP_TORCH="$VENV/keep-torch.txt"
  python -c "import torch; print('torch==' + torch.__version__)" > "$KEEP_TORCH"
  python -m pip install -q --upgrade --upgrade-strategy eager -c "$KEEP_TORCH" -e "$FASTNETS_ROOT[test,bench]"
else
  # constraints.txt pins every package but torch; through PIP_CONSTRAINT it reaches the
  # isolated build env of the editable install too. torch's own dependencies are pinned when
  # the default torch is installed here (another FASTNETS_TORCH may need others).
  if ! python -c "import torch" 2>/dev/null; then
    if [ -n "${FASTNETS_TORCH:-}" ]; then
      python -m pip install -q "$FASTNETS_TORCH"
    else
      PIP_CONSTRAINT="$FASTNETS_ROOT/constraints.txt" python -m pip install -q "torch==2.13.0"
    fi
  fi
  PIP_CONSTRAINT="$FASTNETS_ROOT/constraints.txt" python -m pip install -q -e "$FASTNETS_ROOT[test,bench]"
fi
# Triton 3.6, the Triton of the lent GPU machines, beside the venv's own: the test suite
# compiles every kernel with it too (tests/test_static_kernels.py). Only the compiler is
# needed, so it goes into its own folder (pip --target), never onto the venv's path.
TRITON36="$VENV/triton36"
if [ "$(uname -s)" = Linux ] && [ ! -f "$TRITON36/triton/__init__.py" ]; then
  python -m pip install -q --no-deps --target "$TRITON36" "triton==3.6.0"
fi
[ -f "$TRITON36/triton/__init__.py" ] && export FASTNETS_TRITON36_PATH="$(cd "$TRITON36" && pwd)"
# torchvision and timm, for the swap tests on their models, in a folder of their own that only
# the test session puts on sys.path (tests/conftest.py): PyPI's torchvision links its C
# extension against CUDA torch, and installed beside the CPU build in the venv it would make
# every `import transformers` fail (transformers imports torchvision when it finds one). Their
# pins are the two lines of constraints.txt (--no-deps: torch and the rest come from the venv).
VISION="$VENV/vision"
VISION_PINS=$(grep -i -E '^(torchvision|timm)==' "$FASTNETS_ROOT/constraints.txt" | tr '\n' ' ')
if [ ! -f "$VISION/.pins" ] || [ "$(cat "$VISION/.pins")" != "$VISION_PINS" ]; then
  rm -rf "$VISION"
  # shellcheck disable=SC2086
  python -m pip install -q --no-deps --target "$VISION" $VISION_PINS
  echo "$VISION_PINS" > "$VISION/.pins"
fi
export FASTNETS_VISION_PATH="$(cd "$VISION" && pwd)"
