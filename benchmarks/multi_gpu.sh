#!/usr/bin/env bash
# What to run on a multi-GPU node, one stage per call (each fits a 10-minute command limit), on every GPU of
# the node; results go to $OUT (default benchmarks/results), tagged with the GPU count.
#
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh tests    # fused expert parallelism over real symmetric memory
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh layer    # bench_moe_layer.py, the three shapes
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh train    # bench_train_step.py: eager, moecc without / with schedule
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh graphs   # the training step with and without moecc.graph_step
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh unfused  # the all-to-all path: counted, then padded and replayed
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh profile  # calibrate this node, then the training step again
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh kernels  # the layer's kernels with expert parallelism (rank 0's)
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh fused    # one GPU: the fused ops kernel by kernel (bench_fused_ops.py)
#   MOECC_COMMIT=<hash> benchmarks/multi_gpu.sh wgrad    # one GPU: dW, Gluon / Triton / torch._grouped_mm (bench_wgrad.py)
#
# Pass MOECC_COMMIT from the machine the tree came from: the node's copy may carry an older .git.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
OUT=${OUT:-benchmarks/results}
case "${1:-}" in
  tests) timeout 500 python3 -m pytest -q -p no:logging --tb=short tests/test_gpu_ep.py tests/test_gpu.py ;;
  layer) timeout 560 torchrun --nproc-per-node "$N" benchmarks/bench_moe_layer.py --out "$OUT" --tag "_${N}gpu" \
           --timeout-s 500 ;;
  train) timeout 560 torchrun --nproc-per-node "$N" benchmarks/bench_train_step.py --out "$OUT" --tag "_${N}gpu" \
           --variants eager moecc_noschedule moecc --interleave 3 --timeout-s 500 ;;
  graphs) timeout 560 torchrun --nproc-per-node "$N" benchmarks/bench_train_step.py --out "$OUT" \
            --tag "_${N}gpu_graphs" --variants moecc_noschedule moecc moecc_noschedule_graphed moecc_graphed \
            --interleave 2 --timeout-s 500 ;;
  unfused)
    MOECC_FUSED_EP=0 MOECC_EXCHANGE=counted timeout 280 torchrun --nproc-per-node "$N" benchmarks/bench_train_step.py \
      --out "$OUT" --tag "_${N}gpu_unfused_counted" --variants moecc_noschedule moecc --iters 5 --timeout-s 260
    MOECC_FUSED_EP=0 MOECC_EXCHANGE=padded timeout 280 torchrun --nproc-per-node "$N" benchmarks/bench_train_step.py \
      --out "$OUT" --tag "_${N}gpu_unfused_padded" --variants moecc_noschedule moecc moecc_noschedule_graphed moecc_graphed \
      --iters 5 --timeout-s 260 ;;
  profile)
    timeout 240 python3 -m moecc.cli calibrate --world-size "$N" --out "$OUT/profile_${N}gpu.json"
    MOECC_PROFILE="$OUT/profile_${N}gpu.json" timeout 300 torchrun --nproc-per-node "$N" \
      benchmarks/bench_train_step.py --out "$OUT" --tag "_${N}gpu_calibrated" --variants moecc --timeout-s 250 ;;
  kernels) timeout 300 torchrun --nproc-per-node "$N" benchmarks/profile_moe_layer.py --shapes qwen3 deepseek \
             --backends triton --out "$OUT" ;;
  fused) timeout 300 python3 benchmarks/bench_fused_ops.py --out "$OUT" --tag "_1gpu" ;;
  wgrad) timeout 300 python3 benchmarks/bench_wgrad.py --out "$OUT" --tag "_1gpu" ;;
  *) echo "usage: $0 tests|layer|train|graphs|unfused|profile|kernels|fused|wgrad" >&2; exit 2 ;;
esac
