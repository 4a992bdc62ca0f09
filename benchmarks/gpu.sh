#!/usr/bin/env bash
# GPU figures for issue 15 in one go (< 5 min on one CUDA GPU): (a)/(b) for each grad_backend, the
# k-means backends vs scikit-learn, the selection share and images/s of a GReg+ step at the paper's batch
# (64 ID + 384 candidates -> 128), and whether channels_last / bf16 candidate scoring keeps the selected
# indices. All numbers come from benchmarks/bench_train_step.py.
#   benchmarks/gpu.sh                         # CUDA, paper sizes
#   benchmarks/gpu.sh --device cpu --small    # smoke test on a CPU (tiny sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
device=cuda
small=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --small) small=1; shift ;;
    *) echo "gpu.sh: unknown argument '$1' (use --device DEV, --small)" >&2; exit 2 ;;
  esac
done
if [ "$small" = 1 ]; then
  steps=(--model small_cnn --batch 4 --repeats 2 --warmup 1)
  plus=(--backends exact --model small_cnn --plus-batch 4 --plus-candidates 24 --plus-selected 8 --plus-clusters 4 --repeats 2 --warmup 1)
  km=(--kmeans-datasets 1 --kmeans-repeats 2)
else
  steps=(--model densenet100 --batch 64 --repeats 5 --warmup 2)
  plus=(--backends exact --model densenet100 --plus-batch 64 --plus-candidates 384 --plus-selected 128 --plus-clusters 64 --repeats 5 --warmup 2)
  km=(--kmeans-datasets 2 --kmeans-repeats 5)
fi
"$PY" -c "import torch, sys; d = sys.argv[1]; sys.exit(0 if d != 'cuda' or torch.cuda.is_available() else 2)" "$device" \
  || { echo "gpu.sh: no CUDA device visible (use --device cpu for a smoke test)" >&2; exit 2; }
echo "== (a) GReg step / energy step and (b) / official, per grad_backend"
"$PY" benchmarks/bench_train_step.py --device "$device" "${steps[@]}" --skip-kmeans
echo "== GReg+ step: selection share and images/s"
"$PY" benchmarks/bench_train_step.py --device "$device" "${plus[@]}" --skip-steps --skip-kmeans --greg-plus
echo "== GReg+ candidate scoring under channels_last / bf16 autocast: same selected indices?"
"$PY" benchmarks/bench_train_step.py --device "$device" "${plus[@]}" --skip-steps --skip-kmeans --selection-check
echo "== k-means (torch on $device, faiss-gpu if installed) vs scikit-learn"
"$PY" benchmarks/bench_train_step.py --device "$device" --skip-steps "${km[@]}"
