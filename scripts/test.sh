#!/usr/bin/env bash
# The test command: set up (scripts/env.sh), then the whole suite. Without a GPU the Triton
# kernels run under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
