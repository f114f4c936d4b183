#!/usr/bin/env bash
# The main job: set up (scripts/env.sh), report the backends, run the end-to-end swap demo,
# train a CNN on the digits data, a small GPT and a char-level LSTM on Python's own sources and a DDPM on
# the digits (writing a PNG grid of samples) (full short runs on a GPU; a few interpreted steps on a CPU), then, on a GPU, the quick benchmark; without one,
# the static kernel report (every kernel compiled for Hopper: registers, spills, tensor
# cores, occupancy), which is what can be known about the kernels' speed there. The
# interpreter's functional benchmark run is part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
GPU=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
  GPU=0
fi
python -m fastnets info
python examples/swap_transformer.py
if [ "$GPU" = 1 ]; then
  python examples/train_cnn.py --epochs 5 --channels-last --amp
  python examples/train_gpt.py --config tiny --n-layer 4 --n-embd 256 --n-head 4 --seq-len 256 --batch-size 32 \
    --steps 300 --amp --sample 200
  python examples/train_char_lm.py --hidden 512 --steps 300 --amp --sample 200
  python examples/train_diffusion.py --steps 3000 --amp --sample-every 1000 --class-cond --guidance-scale 2 \
    --out "${FASTNETS_BENCH_OUT:-bench-out}/diffusion"
  python examples/train_gan.py --steps 2000 --r1 1.0 --d-norm none --out "${FASTNETS_BENCH_OUT:-bench-out}/gan"
  python examples/train_vae.py --steps 2000 --amp --out "${FASTNETS_BENCH_OUT:-bench-out}/vae"
  python examples/train_clip.py --epochs 12 --amp
else
  python examples/train_cnn.py --epochs 1 --max-steps 4 --width 8 --size 8 --batch-size 32 --max-eval 128
  python examples/train_gpt.py --n-layer 1 --n-embd 32 --n-head 2 --seq-len 32 --batch-size 4 --steps 3 \
    --eval-every 0 --sample 16
  python examples/train_char_lm.py --embed 16 --hidden 32 --layers 2 --seq-len 32 --batch-size 8 --steps 3 \
    --sample 40 --no-progress
  python examples/train_diffusion.py --size 8 --channels 8,16 --groups 4 --batch-size 8 --steps 3 --samples 8 \
    --sample-steps 3 --no-progress --out "${FASTNETS_BENCH_OUT:-bench-out}/diffusion"
  python examples/train_gan.py --size 8 --nz 8 --ngf 8 --ndf 8 --batch-size 8 --steps 3 --samples 16 --r1 1.0 \
    --d-norm none --no-progress --out "${FASTNETS_BENCH_OUT:-bench-out}/gan"
  python examples/train_vae.py --size 8 --channels 8 --latent 2 --groups 4 --batch-size 8 --steps 3 --samples 8 \
    --eval-size 16 --no-progress --out "${FASTNETS_BENCH_OUT:-bench-out}/vae"
  python examples/train_clip.py --width 16 --layers 1 --heads 1 --embed 8 --train-size 32 --batch-size 16 \
    --epochs 1 --max-steps 2 --eval-size 16 --templates 1 --no-progress
fi
if [ "$GPU" = 1 ]; then
  python -m fastnets bench --quick --out "${FASTNETS_BENCH_OUT:-bench-out}" "$@"
else
  python -m fastnets kernels --quiet --out "${FASTNETS_BENCH_OUT:-bench-out}" "$@"
fi
