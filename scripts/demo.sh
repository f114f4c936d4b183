#!/usr/bin/env bash
# The main job: set up (scripts/env.sh), report the backends, run the end-to-end swap demo,
# then the quick benchmark on the default device (a GPU if present; else a functional run
# on the CPU through Triton's interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
python -m fastnets info
python examples/swap_transformer.py
python -m fastnets bench --quick --out "${FASTNETS_BENCH_OUT:-bench-out}" "$@"
