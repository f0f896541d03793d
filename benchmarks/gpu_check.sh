#!/usr/bin/env bash
# The GPU check: build the extension for this GPU, run the GPU-marked tests, and print the
# microbenchmarks and meta-step timings, writing raw output under $RESULTS (default
# benchmarks/results/<gpu name>/). Sized to finish in well under 8 minutes on one H100.
#
#   bash benchmarks/gpu_check.sh            # then commit benchmarks/results/<gpu>/
#
# The machine needs torch, triton, pybind11, cmake, ninja and nvcc; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "no CUDA GPU visible to torch"; exit 1; }
RESULTS=${RESULTS:-benchmarks/results/${gpu}}
mkdir -p "$RESULTS"
log() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
status=0
step() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }

log "build (CUDA kernels for this GPU's architecture)"
cc=$(python -c "import torch; a,b=torch.cuda.get_device_capability(); print(f'{a}{b}')")
step env IMAML_FAST_CUDA_ARCHS="$cc" IMAML_FAST_FORCE_CUDA=1 \
  pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
step python -c "import json, imaml_fast; from imaml_fast import _ext; print(json.dumps(_ext.build_info(), indent=1)); [print(b['name'], b['available'], b['reasons']) for b in imaml_fast.backend_info('cuda')]"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$RESULTS/nvidia_smi.txt"

log "GPU-marked tests"
step timeout 240 python -m pytest -q -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests.txt" | tail -n 15

log "vector kernels against the device's copy bandwidth"
step timeout 90 python benchmarks/bench_kernels.py --out "$RESULTS/bench_kernels.md" 2>&1 | tee "$RESULTS/bench_kernels.txt"

log "CG solve against the HVPs alone (Omniglot network, T=32, 5 iterations)"
step timeout 90 python benchmarks/bench_cg_vs_hvp.py --device cuda --json "$RESULTS/bench_cg_vs_hvp.json" 2>&1 | tee "$RESULTS/bench_cg_vs_hvp.txt"

log "where one batched HVP spends its time (profiler, by op and by kind), ATen's layer derivatives vs imaml_fast.layers"
step timeout 120 python benchmarks/profile_hvp.py --device cuda --json "$RESULTS/profile_hvp.json" 2>&1 | tee "$RESULTS/profile_hvp.md"

log "meta-step per backend (Omniglot 5-way 1-shot, T=32, K=16, 5 CG steps), bf16 too"
step timeout 240 python benchmarks/bench_meta_step.py --device cuda --repeats 5 --amp bf16 \
  --json "$RESULTS/bench_meta_step.json" 2>&1 | tee "$RESULTS/bench_meta_step.txt"

log "done: results in $RESULTS (status $status)"
exit $status
