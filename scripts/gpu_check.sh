#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go (a few minutes on one H100/H200):
#   1. tests/test_cuda.py: the DeePMD-kit fixtures on the GPU (float64 to round-off, float32), the training
#      gradients equal to the CPU's, a training step with no host synchronisation
#      (`torch.cuda.set_sync_debug_mode("error")`), a 12288-atom supercell, `trainer=gpu` and `trainer=ddp` runs;
#      tests/test_parity.py: the fast model on the GPU against the reference model (its `cuda` path);
#   2. scripts/benchmark.py on the GPU, float64 and float32: training step (batch 1 and 4), inference,
#      neighbor lists, and 192 / 1536 / 12288-atom water supercells (time and peak GPU memory per atom).
# Needs ../shared (water data and fixtures) beside the repository, as the tests and benchmark do.
#   bash scripts/gpu_check.sh [out_dir]          (default outputs/gpu_check)
set -uo pipefail
out=${1:-outputs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1   # (on a GPU every model runs the static backend: the compiled kernels are CPU-only)
py=${PYTHON:-python3}

"$py" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv

"$py" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_parity.py 2>&1 | tee "$out/pytest_cuda.log"

"$py" scripts/benchmark.py --device cuda --kernels off --frames 16 --repeat 5 --scaling 1 2 4 --scaling-train \
    --json "$out/benchmark_cuda_b1.json" 2>&1 | tee "$out/benchmark_cuda_b1.log"
"$py" scripts/benchmark.py --device cuda --kernels off --frames 16 --repeat 5 --batch-size 4 \
    --json "$out/benchmark_cuda_b4.json" 2>&1 | tee "$out/benchmark_cuda_b4.log"
# the step with its loss and backward through torch.compile (static shapes, full graph)
"$py" scripts/benchmark.py --device cuda --kernels off --frames 16 --repeat 5 --compile \
    --json "$out/benchmark_cuda_compile.json" 2>&1 | tee "$out/benchmark_cuda_compile.log"
