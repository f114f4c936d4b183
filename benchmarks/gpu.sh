#!/usr/bin/env bash
# The GPU run, in parts that each finish well under 8 minutes on an H100 (one device command
# is at most 10). Usage:
#   benchmarks/gpu.sh OUTDIR --list             the parts, with what each runs
#   benchmarks/gpu.sh OUTDIR --part NAME [...]  run these parts
#   benchmarks/gpu.sh OUTDIR --part all         every part not yet done in OUTDIR, in order
#   benchmarks/gpu.sh OUTDIR [--quick]          the same as --part all (shorter benchmark sizes with --quick)
# OUTDIR carries state between parts and calls: cache/ (the tuner's choices, Triton's and the
# extension's builds: FASTNETS_CACHE_DIR), parts/<name>.log and parts/<name>.status (rc of
# each completed part; `all` skips parts whose status is 0), and the merged benchmark results
# <device>.json / <device>.md / <family>.png (commit these under benchmarks/results/, unedited).
# Copy a previous OUTDIR back in to resume. Nothing stops at the first failure: every test
# failure and every failing benchmark case is reported, and the exit status says if any part failed.
# Uses only the machine's preinstalled packages (torch, triton, pytest, matplotlib); no network.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu.sh OUTDIR [--list | --part NAME... | --quick]}
shift
cd "$(dirname "$0")/.."
ROOT=$PWD
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
PART_LIMIT=${FASTNETS_PART_LIMIT:-470}   # seconds: a hung part is stopped and reported, the rest still run

# name | what it runs | budget on an H100 (minutes)
PARTS=(
  "tests-kernels|pytest: norms, activations, conv, BN, pooling, rope, losses (CUDA tensors, fp16/bf16/fp32)|6"
  "tests-attention|pytest: flash attention, decode, SDPA semantics|6"
  "tests-models|pytest: modules, swap, models, transformers integration, compile, examples|7"
  "bench-norm|benchmark: layer_norm, rms_norm, group_norm+SiLU, bias+activation vs torch / compile / Liger|5"
  "bench-conv|benchmark: conv2d (ResNet-50 shapes), fused block, dgrad, wgrad, conv_transpose2d vs cuDNN / compile|7"
  "bench-bn_pool|benchmark: BatchNorm+ReLU, max pool, global average pool|3"
  "bench-attention|benchmark: flash attention fwd/bwd, 1k-16k, causal and not, vs SDPA / FlashAttention-2|7"
  "bench-transformer|benchmark: decode, rope, cross-entropy, fused LM head|6"
  "bench-rnn|benchmark: 2-layer LSTM / GRU fwd and fwd+bwd, packed, proj_size, decode step vs cuDNN / compile|7"
  "bench-diffusion|benchmark: sampler steps vs diffusers, q_sample, 50-step loops (CUDA graph), UNet2D train step|6"
  "bench-gan|benchmark: upfirdn2d, filtered_lrelu, GAN losses, R1 discriminator step, VAE sample / KL|4"
  "bench-clip|benchmark: clip_loss 32k and 256k vs the unfused loss (time, peak memory), CLIP ViT-B/16 train step vs HF eager / compile|6"
  "bench-model|benchmark: ResNet-50 and GPT-2 124M training steps vs eager / torch.compile|7"
)

usage_list() {
  echo "parts of benchmarks/gpu.sh (each under ${PART_LIMIT}s; state in OUTDIR):"
  for p in "${PARTS[@]}"; do
    IFS='|' read -r name what minutes <<<"$p"
    printf "  %-18s ~%s min  %s\n" "$name" "$minutes" "$what"
  done
}

QUICK=""
REQUESTED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --list) usage_list; exit 0 ;;
    --quick) QUICK="--quick" ;;
    --part) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do REQUESTED+=("$1"); shift; done; continue ;;
    *) echo "unknown argument: $1"; usage_list; exit 2 ;;
  esac
  shift
done
[ ${#REQUESTED[@]} -eq 0 ] && REQUESTED=(all)

export PYTHONUNBUFFERED=1
export FASTNETS_CACHE_DIR="$OUT/cache"
export TRITON_CACHE_DIR="$OUT/cache/triton"
mkdir -p "$OUT/parts" "$FASTNETS_CACHE_DIR"

install() {
  # Editable install against the image's torch and triton. Skipped when fastnets already
  # imports from this tree (a warm machine).
  if $PY -c "import fastnets, os, sys; sys.exit(0 if os.path.dirname(os.path.dirname(fastnets.__file__)) == '$ROOT' else 1)" 2>/dev/null; then
    return 0
  fi
  echo "== install (builds fastnets._C when nvcc and a CUDA torch are here)"
  local start=$(date +%s)
  if ! $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3; then
    echo "!! extension build failed; installing without it (the cuda backend will JIT-build or say why)"
    FASTNETS_BUILD_EXT=0 $PY -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -3 || return 1
  fi
  echo "install took $(( $(date +%s) - start )) s"
}

run_part() {
  local name=$1
  case "$name" in
    tests-kernels)
      $PY -m pytest tests/test_norm.py tests/test_activation.py tests/test_conv.py tests/test_batchnorm.py \
        tests/test_pool.py tests/test_rope.py tests/test_loss.py -q -p no:cacheprovider --durations=5 ;;
    tests-attention)
      $PY -m pytest tests/test_attention.py -q -p no:cacheprovider --durations=5 ;;
    tests-models)
      $PY -m pytest tests -q -p no:cacheprovider --durations=5 \
        --ignore=tests/test_norm.py --ignore=tests/test_activation.py --ignore=tests/test_conv.py \
        --ignore=tests/test_batchnorm.py --ignore=tests/test_pool.py --ignore=tests/test_rope.py \
        --ignore=tests/test_loss.py --ignore=tests/test_attention.py ;;
    bench-norm)        $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops norm activation ;;
    bench-conv)        $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops conv ;;
    bench-bn_pool)     $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops bn_pool ;;
    bench-attention)   $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops attention ;;
    bench-transformer) $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops decode rope cross_entropy lm_head ;;
    bench-rnn)         $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops rnn ;;
    bench-diffusion)   $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops diffusion ;;
    bench-gan)         $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops gan vae ;;
    bench-clip)        $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops contrastive clip ;;
    bench-model)       $PY -m fastnets bench --merge --out "$OUT" $QUICK --ops model ;;
    *) echo "unknown part: $name"; return 2 ;;
  esac
}

known=" all "
for p in "${PARTS[@]}"; do known+="${p%%|*} "; done
for r in "${REQUESTED[@]}"; do
  [[ "$known" == *" $r "* ]] || { echo "unknown part: $r"; usage_list; exit 2; }
done

names=()
for r in "${REQUESTED[@]}"; do
  if [ "$r" = all ]; then
    for p in "${PARTS[@]}"; do
      name=${p%%|*}
      if [ "$(cat "$OUT/parts/$name.status" 2>/dev/null)" = 0 ]; then
        echo "skip $name (done: $OUT/parts/$name.status)"
      else
        names+=("$name")
      fi
    done
  else
    names+=("$r")
  fi
done

status=0
install 2>&1 | tee -a "$OUT/parts/install.log" || status=1
{
  echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>/dev/null
  $PY -m fastnets info
} 2>&1 | tee "$OUT/parts/info.log"
for name in "${names[@]}"; do
  echo; echo "== part $name (limit ${PART_LIMIT}s)"
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$PART_LIMIT" bash -c "$(declare -f run_part); PY='$PY'; QUICK='$QUICK'; OUT='$OUT'; run_part $name" \
    2>&1 | tee "$OUT/parts/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "!! part $name stopped at its ${PART_LIMIT}s limit" | tee -a "$OUT/parts/$name.log"
  echo "$rc" > "$OUT/parts/$name.status"
  echo "== part $name: exit $rc after $(( $(date +%s) - start )) s"
  [ "$rc" = 0 ] || status=1
done
echo; echo "parts run: ${names[*]:-none}; status:"; for f in "$OUT"/parts/*.status; do [ -e "$f" ] && echo "  $(basename "$f" .status): $(cat "$f")"; done
exit $status
