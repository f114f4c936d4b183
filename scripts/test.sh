#!/usr/bin/env bash
# The test command: set up (scripts/env.sh), then the whole suite. Without a GPU the Triton
# kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
WORKERS=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  # The interpreter runs on one core; CI has two, so two pytest-xdist workers halve the run.
  # Shared caches (tuner, static report) are written through per-process temp files and
  # os.replace, so workers never see half-written files. FASTNETS_TEST_WORKERS=0 runs serially.
  N=${FASTNETS_TEST_WORKERS:-2}
  if [ "$N" != 0 ] && python -c "import xdist" 2>/dev/null; then
    WORKERS=(-n "$N")
  fi
fi
python -m pytest tests -q -p no:cacheprovider --durations=10 "${WORKERS[@]}" "$@"
