#!/usr/bin/env bash
# Moves the test environment's pins (constraints.txt) to today's newest releases: a fresh
# virtualenv set up with FASTNETS_NEWEST=1 (everything but torch at its newest), the whole test
# suite there, and only when it is green, that environment's versions become constraints.txt.
# Review the diff and commit it with the suite's result.
#   FASTNETS_PIN_VENV  where the throwaway env lives (default $TMPDIR/fastnets-newest-venv)
#   extra arguments    go to pytest (scripts/test.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export FASTNETS_VENV="${FASTNETS_PIN_VENV:-${TMPDIR:-/tmp}/fastnets-newest-venv}"
rm -rf "$FASTNETS_VENV"
FASTNETS_NEWEST=1 bash scripts/test.sh "$@"
vision=$(grep -i -E '^(torchvision|timm)==' constraints.txt)
frozen=$("$FASTNETS_VENV/bin/python" -m pip freeze --all --exclude-editable \
  | grep -v -i -E '^(pip|torch|fastnets|nvidia-[a-z0-9-]*|cuda-[a-z0-9-]*)==' | grep -v '^#')
{
  cat <<'HEADER'
# The test environment's pins: every package scripts/env.sh installs for the test and bench
# extras (and torch's own dependencies), at the versions the whole suite was last green with.
# torch is not pinned here: scripts/env.sh installs torch==2.13.0 (or FASTNETS_TORCH) first and
# keeps whatever torch is already installed. The pins apply to the isolated build of the
# editable install too (setuptools, wheel), through PIP_CONSTRAINT.
# Written by scripts/pin.sh from a green run at the newest releases; never edited by hand.
# FASTNETS_NEWEST=1 bash scripts/test.sh runs the suite against the newest releases instead.
HEADER
  echo "# Pinned: $(date -u +%Y-%m-%d), Python $("$FASTNETS_VENV/bin/python" -c 'import platform; print(platform.python_version())'), torch $("$FASTNETS_VENV/bin/python" -c 'import torch; print(torch.__version__)')"
  echo "$frozen"
  # torchvision and timm live in their own folder (scripts/env.sh), tied to the torch build:
  # their pins carry over
  echo "$vision"
  # the build backend the editable install's isolated build fetches (not in the env itself)
  grep -q -i '^wheel==' <<<"$frozen" || echo "wheel==$(python3 -m pip index versions wheel 2>/dev/null | sed -n 's/^wheel (\(.*\))$/\1/p')"
} > constraints.txt
echo "constraints.txt rewritten from $FASTNETS_VENV; review with: git diff constraints.txt"
