#!/usr/bin/env bash
# The GPU check: build the extension for this GPU, run the GPU tests, and print the
# microbenchmarks and meta-step timings, writing raw output under $RESULTS (default
# benchmarks/results/<gpu name>/). On one H100 the build, tests and kernel/meta-step benchmarks
# took about 5 minutes; the peers comparison and the memory figure add about 4. On one H200
# "tests memory compare20 precision dense" took 5.5 minutes (build 26 s, tests 37 s, memory
# 113 s, compare20 110 s, precision 11 s, dense 31 s) and "tf32 train" with 3 training
# minutes 6.3: more than one 10-minute call in all. Split it: GPU_CHECK_ONLY="tests compare meta"
# (about 8 minutes: the peers comparison, then the meta step's 17 variants), then
# GPU_CHECK_ONLY="memory triton compare20 cg kernels
# precision dense profile" (about 6). Every step has its
# own time limit, and the most important ones run first, so that a run cut short still
# leaves what it finished. The memory step now also runs memory_vs_chunk.py (memory and time
# against task_chunk; not yet timed on a GPU, limited to 3 minutes).
#
#   bash benchmarks/gpu_check.sh            # then commit benchmarks/results/<gpu>/
#
# Environment: PYTHON (default python3); RESULTS (the output folder); GPU_CHECK_ONLY="tests
# compare" runs the build and only these steps (of: tests triton meta compare compare20
# memory cg kernels precision dense profile; and tf32, the 5-way step with TF32 on then off
# (about 2.5 minutes), train, minutes of Omniglot
# training (GPU_CHECK_TRAIN_MINUTES, default 6; GPU_CHECK_TRAIN_PRESET, default omniglot-5w1s;
# GPU_CHECK_TRAIN_TF32=1 for TF32 convolutions, as the H200's first run had; OMNIGLOT_ROOT),
# and inner, benchmarks/inner_convergence.py on GPU_CHECK_TRAIN_PRESET (default
# there omniglot-20w1s) for GPU_CHECK_INNER_STEPS meta-steps (default 300), which only run
# when named);
# GPU_CHECK_ARCHIVE=FILE
# also packs the results folder into FILE (.tgz) after every step, for machines from which
# only a few files can be copied back. The machine needs torch, triton, pybind11, cmake,
# ninja and nvcc; nothing is downloaded. The peers of compare.py (torchopt, betty-ml, higher)
# are used where installed and skipped otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || {
  echo "no CUDA GPU visible to torch"; exit 1; }
RESULTS=${RESULTS:-benchmarks/results/${gpu}}
mkdir -p "$RESULTS"
t_start=$(date +%s)
log() { echo; echo "=== $* ($(date -u +%H:%M:%S), +$(( $(date +%s) - t_start )) s)"; }
pack() { [ -n "${GPU_CHECK_ARCHIVE:-}" ] && tar -czf "$GPU_CHECK_ARCHIVE" -C "$RESULTS" . ; true; }
status=0
# Each step is one pipeline ending in `|| fail NAME; pack` (pipefail: a step fails when its
# command does, whatever tee and tail do), so that `status` is set in this shell.
fail() { echo "FAILED: $*"; status=1; }
ONLY=${GPU_CHECK_ONLY:-all}
data=${OMNIGLOT_ROOT:-../shared/data/omniglot}  # the real Omniglot copy (tests, train, inner)
named() { [[ " $ONLY " == *" $1 "* ]]; }    # a step asked for by name
want() { [ "$ONLY" = all ] || named "$1"; }  # a step of the default run, or asked for

log "build (CUDA kernels for this GPU's architecture)"
cc=$($PY -c "import torch; a,b=torch.cuda.get_device_capability(); print(f'{a}{b}')")
env IMAML_FAST_CUDA_ARCHS="$cc" IMAML_FAST_FORCE_CUDA=1 MAX_JOBS=8 \
  timeout 300 $PY -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3 \
  || fail "build"; pack
$PY -c "import json, torch, triton, imaml_fast; from imaml_fast import _ext; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(json.dumps(_ext.build_info(), indent=1)); [print(b['name'], b['available'], b['reasons']) for b in imaml_fast.backend_info('cuda')]" 2>&1 | tee "$RESULTS/build_info.txt" \
  || fail "backend info"; pack
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv | tee "$RESULTS/nvidia_smi.txt"

if want tests; then
log "GPU tests: the GPU-marked tests, then the Triton kernels' tests on the GPU (not the interpreter)"
# the data tests among them read the real Omniglot copy (tests/_data_helpers.py)
[ -d "$data" ] || echo "note: no Omniglot copy at $data (set OMNIGLOT_ROOT): the data tests will fail"
timeout 150 $PY -m pytest -q -m gpu tests 2>&1 | tee "$RESULTS/gpu_tests.txt" | tail -n 25 \
  || fail "GPU-marked tests"; pack
fi
if want triton; then
timeout 90 $PY -m pytest -q -m "not gpu" tests/test_kernels_triton.py 2>&1 | tee -a "$RESULTS/gpu_tests.txt" | tail -n 15 \
  || fail "Triton tests on the GPU"; pack
fi

if want compare; then
log "imaml_fast against the reference and the installed peers (Omniglot 5-way 1-shot)"
timeout 240 $PY benchmarks/compare.py --device cuda --settings omniglot-5w1s --repeats 3 \
  --only "imaml_fast default" "imaml_fast uncaptured" "imaml_fast reference" "TorchOpt cg" \
  "TorchOpt normal_cg" "betty cg" \
  --out "$RESULTS" 2>&1 | grep -v "\[INFO\]" | tee "$RESULTS/compare_speed.txt" \
  || fail "compare.py"; pack
fi

if want meta; then
log "meta-step per backend (Omniglot 5-way 1-shot, T=32, K=16, 5 CG steps), CUDA graphs and bf16 too"
# 17 variants, each in a process of its own (10 took 143 s on an H100)
timeout 360 $PY benchmarks/bench_meta_step.py --device cuda --repeats 5 --amp bf16 \
  --json "$RESULTS/bench_meta_step.json" 2>&1 | tee "$RESULTS/bench_meta_step.txt" \
  || fail "bench_meta_step"; pack
fi

if named tf32; then  # a diagnostic, only when asked for by name
log "what TF32 convolutions buy: default (captured), uncaptured and the reference, TF32 on then off (Omniglot 5-way 1-shot)"
for mode in on off; do
timeout 90 $PY benchmarks/compare.py --device cuda --settings omniglot-5w1s --repeats 3 --tf32 $mode \
  --check-tasks 0 --only "imaml_fast default" "imaml_fast uncaptured" "imaml_fast reference" \
  --name compare_speed_tf32$mode --out "$RESULTS" 2>&1 | grep -v "\[INFO\]" \
  | tee "$RESULTS/compare_speed_tf32$mode.txt" || fail "compare.py --tf32 $mode"; pack
done
fi

if want memory; then
log "peak GPU memory against inner steps K: iMAML flat, unrolled MAML (higher) growing"
timeout 150 $PY benchmarks/memory_vs_steps.py --device cuda --tasks 32 --steps 5 20 80 \
  --impls "imaml_fast default" "higher unrolled MAML" --out "$RESULTS" 2>&1 \
  | tee "$RESULTS/memory_vs_steps.txt" || fail "memory_vs_steps"; pack
log "peak GPU memory and time against task_chunk (tasks in flight), T = 32"
timeout 180 $PY benchmarks/memory_vs_chunk.py --device cuda --chunks 0 16 8 4 1 --out "$RESULTS" \
  2>&1 | tee "$RESULTS/memory_vs_chunk.txt" || fail "memory_vs_chunk"; pack
fi

if want compare20; then
log "the same for Omniglot 20-way 1-shot (25 inner steps): imaml_fast, the reference, TorchOpt cg"
timeout 240 $PY benchmarks/compare.py --device cuda --settings omniglot-20w1s --repeats 3 \
  --only "imaml_fast default" "imaml_fast uncaptured" "imaml_fast reference" "TorchOpt cg" \
  --name compare_speed_20w1s \
  --out "$RESULTS" 2>&1 | grep -v "\[INFO\]" | tee "$RESULTS/compare_speed_20w1s.txt" \
  || fail "compare.py 20w1s"; pack
fi

if named train; then  # only when named: minutes of training
mins=${GPU_CHECK_TRAIN_MINUTES:-6}
log "Omniglot meta-training (${GPU_CHECK_TRAIN_PRESET:-omniglot-5w1s}, the paper's settings, T=32, up to 30000 steps) for $mins minutes, then 600 meta-test tasks"
timeout $(( ${mins%.*} * 60 + 240 )) $PY benchmarks/train_omniglot_quick.py --device cuda \
  --preset "${GPU_CHECK_TRAIN_PRESET:-omniglot-5w1s}" --tasks 32 --steps 30000 \
  --minutes "$mins" ${GPU_CHECK_TRAIN_TF32:+--tf32} --data-root "$data" \
  --out "$RESULTS/omniglot_train" 2>&1 | tee "$RESULTS/omniglot_train.txt" \
  || fail "train_omniglot_quick"; pack
fi

if want cg; then
log "CG solve against the HVPs alone (Omniglot network, T=32, 5 iterations)"
timeout 60 $PY benchmarks/bench_cg_vs_hvp.py --device cuda --json "$RESULTS/bench_cg_vs_hvp.json" 2>&1 | tee "$RESULTS/bench_cg_vs_hvp.txt" \
  || fail "bench_cg_vs_hvp"; pack
fi

if want kernels; then
log "vector kernels against the device's copy bandwidth, dense CG"
timeout 60 $PY benchmarks/bench_kernels.py --out "$RESULTS/bench_kernels.md" 2>&1 | tee "$RESULTS/bench_kernels.txt" \
  || fail "bench_kernels"; pack
fi

if want precision; then
log "float32 against float64 with TF32 convolutions on and off, inner lr 0.1 (the benchmarks') and 0.03 (the presets')"
timeout 90 $PY benchmarks/precision.py --device cuda --json "$RESULTS/precision.json" 2>&1 \
  | tee "$RESULTS/precision.txt" || fail "precision"; pack
fi

if want dense; then
log "dense-Hessian path against matrix-free CG, sinusoid MLPs of P = 321 ... 4,353 (sets cg_dense=\"auto\"'s bound)"
timeout 120 $PY benchmarks/bench_dense_path.py --device cuda --repeats 20 \
  --json "$RESULTS/bench_dense_path.json" 2>&1 | tee "$RESULTS/bench_dense_path.txt" \
  || fail "bench_dense_path"; pack
fi

if named inner; then  # only when named: does the inner loop still solve its problem later on?
isteps=${GPU_CHECK_INNER_STEPS:-300}
log "inner-loop convergence along ${isteps} meta-steps of ${GPU_CHECK_TRAIN_PRESET:-omniglot-20w1s}, fixed step vs line search"
timeout $(( isteps * 2 + 120 )) $PY benchmarks/inner_convergence.py --device cuda \
  --preset "${GPU_CHECK_TRAIN_PRESET:-omniglot-20w1s}" --steps "$isteps" --every 20 \
  --data-root "$data" \
  --json "$RESULTS/inner_convergence.json" 2>&1 | tail -n 40 | tee "$RESULTS/inner_convergence.txt" \
  || fail "inner_convergence"; pack
fi

if want profile; then
log "where one batched HVP spends its time (profiler, by op and by kind), ATen's layer derivatives vs imaml_fast.layers"
timeout 90 $PY benchmarks/profile_hvp.py --device cuda --json "$RESULTS/profile_hvp.json" 2>&1 | tee "$RESULTS/profile_hvp.txt" \
  || fail "profile_hvp"; pack
log "where one whole 5-way meta-step spends its kernel time (profiler, uncaptured): what a captured step would gain from"
timeout 90 $PY benchmarks/profile_step.py --device cuda --json "$RESULTS/profile_step.json" 2>&1 | tee "$RESULTS/profile_step.txt" \
  || fail "profile_step"; pack
fi

log "done: results in $RESULTS (status $status)"
exit $status
