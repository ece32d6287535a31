#!/usr/bin/env bash
# One call on a lent CUDA machine: environment, the kernel tests on the GPU, then the step
# benchmark. Usage (repository root): bash benchmarks/gpu_session.sh PHASE OUTDIR
#   PHASE "tests": versions, tests/kernels/test_kernels.py on CUDA (slow tests included), tinyllama fp32
#   PHASE "sweep": the alpha sweep, the size sweep and tinyllama in bf16
#   PHASE "issue19": the current kernels in one call (about 9 min): versions, every kernel test on
#     CUDA, the hardware checks of benchmarks/gpu_checks.py (GPU bits == interpreter bits, a
#     captured backward + step replayed before and after churn, no sync with fresh gradients,
#     the fallback step on a 65.5M tensor, a > 2**31-entry bf16 tensor, two GPUs), then the step
#     tables against AdamW(fused=True): TinyLlama fp32 and bf16, alpha 0.01, 1M parameters
#   PHASE "issue10": the two-pass kernels in one call (about 8 min): kernel tests twice (races),
#     the CUDA-graph test, tinyllama fp32, alpha 0.01, 1M parameters, bf16 (with bf16 moments too),
#     FSDP2 on one GPU against the unsharded step, and a profile
# The machine has torch and triton but cannot install: maskopt runs from the tree, with
# maskopt.kernels made importable by a link (setuptools maps it to kernels/ in an install).
set -u
phase=${1:-tests}
out=${2:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
[ -e maskopt/kernels ] || ln -s ../kernels maskopt/kernels
python3 -c "import maskopt.kernels as k, torch; print('maskopt.kernels ok, fused available:', k.is_available(torch.device('cuda')))" || exit 1
if [ "$phase" = issue19 ]; then
  # about 9 min on an H200; predictions in benchmarks/RESULTS.md, written before any run
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
  git rev-parse HEAD 2>/dev/null || true
  timeout 200 python3 -m pytest -p no:cacheprovider -q -rs -m "" tests/kernels 2>&1 | tee "$out/test_kernels_cuda.log"
  timeout 240 python3 benchmarks/gpu_checks.py all 2>&1 | tee "$out/gpu_checks.log"
  timeout 120 python3 benchmarks/step_bench.py --cases tinyllama --methods "AdamW(fused=True),MoFO fused,MoFO(gradient) fused,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_fp32.csv" 2>&1 | tee "$out/step_bench_tinyllama_fp32.log"
  timeout 60 python3 benchmarks/step_bench.py --cases alpha --alphas 0.01 --methods "AdamW(fused=True),MoFO fused" --csv "$out/step_bench_alpha001.csv" 2>&1 | tee "$out/step_bench_alpha001.log"
  timeout 40 python3 benchmarks/step_bench.py --cases sweep --sizes 1e6 --methods "AdamW(fused=True),MoFO fused,RandomBCD fused" --csv "$out/step_bench_1m.csv" 2>&1 | tee "$out/step_bench_1m.log"
  timeout 90 python3 benchmarks/step_bench.py --cases tinyllama --dtype bf16 --methods "AdamW(fused=True),MoFO fused,MoFO(bf16m) fused,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_bf16.csv" 2>&1 | tee "$out/step_bench_bf16.log"
elif [ "$phase" = issue10 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true
  timeout 170 python3 -m pytest -p no:cacheprovider -q -rs -m "" tests/kernels/test_kernels.py 2>&1 | tee "$out/test_kernels_cuda.log"
  timeout 60 python3 -m pytest -p no:cacheprovider -q -rs -m "" tests/kernels/test_kernels.py -k "two_pass or capacity or window_follows or captured or nan" 2>&1 | tee "$out/test_kernels_cuda_again.log"
  timeout 150 python3 benchmarks/step_bench.py --cases tinyllama --methods "AdamW(fused=True),official loop+topk,MoFO fused,MoFO(gradient) fused,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_fp32.csv" 2>&1 | tee "$out/step_bench_tinyllama_fp32.log"
  timeout 60 python3 benchmarks/step_bench.py --cases alpha --alphas 0.01 --methods "AdamW(fused=True),MoFO fused" --csv "$out/step_bench_alpha001.csv" 2>&1 | tee "$out/step_bench_alpha001.log"
  timeout 40 python3 benchmarks/step_bench.py --cases sweep --sizes 1e6 --methods "AdamW(fused=True),MoFO fused,RandomBCD fused" --csv "$out/step_bench_1m.csv" 2>&1 | tee "$out/step_bench_1m.log"
  timeout 90 python3 benchmarks/step_bench.py --cases tinyllama --dtype bf16 --methods "AdamW(fused=True),MoFO fused,MoFO(bf16m) fused,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_bf16.csv" 2>&1 | tee "$out/step_bench_bf16.log"
  timeout 60 python3 benchmarks/fsdp_step.py 2>&1 | tee "$out/fsdp_step.log"
  timeout 60 python3 benchmarks/profile_step.py --methods "AdamW(fused=True),MoFO fused,RandomBCD fused" 2>&1 | tee "$out/profile.log"
elif [ "$phase" = tests ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  timeout 300 python3 -m pytest -p no:cacheprovider -q -rs -m "" tests/kernels/test_kernels.py 2>&1 | tee "$out/test_kernels_cuda.log"
  timeout 200 python3 benchmarks/step_bench.py --cases tinyllama --csv "$out/step_bench_tinyllama_fp32.csv" 2>&1 | tee "$out/step_bench_tinyllama_fp32.log"
elif [ "$phase" = final ]; then
  timeout 200 python3 -m pytest -p no:cacheprovider -q -rs -m "" tests/kernels/test_kernels.py 2>&1 | tee "$out/test_kernels_cuda.log"
  timeout 200 python3 benchmarks/step_bench.py --cases tinyllama --csv "$out/step_bench_tinyllama_fp32.csv" 2>&1 | tee "$out/step_bench_tinyllama_fp32.log"
  timeout 90 python3 benchmarks/step_bench.py --cases tinyllama --dtype bf16 --methods "AdamW(fused=True),official loop+topk,MoFO fused,MoFO torch,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_bf16.csv" 2>&1 | tee "$out/step_bench_bf16.log"
  timeout 90 python3 benchmarks/step_bench.py --cases alpha --alphas 0.01,0.5 --methods "AdamW(fused=True),MoFO fused,official loop+topk" --csv "$out/step_bench_alpha.csv" 2>&1 | tee "$out/step_bench_alpha.log"
elif [ "$phase" = sweep-profile ]; then
  timeout 100 python3 benchmarks/profile_step.py --methods "MoFO fused,RandomBCD fused" 2>&1 | tee "$out/profile.log"
  timeout 200 python3 benchmarks/step_bench.py --cases sweep --sizes 1e6,16e6,256e6 --methods "AdamW(fused=True),MoFO fused,MoFO torch,official loop+topk,RandomBCD fused" --csv "$out/step_bench_sweep.csv" 2>&1 | tee "$out/step_bench_sweep.log"
elif [ "$phase" = tune ]; then
  timeout 330 python3 benchmarks/tune_kernels.py 2>&1 | tee "$out/tune.log"
  timeout 100 python3 benchmarks/tune_kernels.py --filter gradient --grid "window_frac=5,window_bins_log2=9;window_frac=4,window_bins_log2=8" 2>&1 | tee "$out/tune_gradient.log"
elif [ "$phase" = profile ]; then
  timeout 120 python3 benchmarks/profile_step.py 2>&1 | tee "$out/profile.log"
  timeout 200 python3 benchmarks/step_bench.py --cases tinyllama --methods "AdamW(fused=True),MoFO torch,MoFO(gradient) torch,RandomBCD fused,RandomBCD torch,HalfAdam fused,HalfAdam torch" --csv "$out/step_bench_tinyllama_fp32_b.csv" 2>&1 | tee "$out/step_bench_tinyllama_fp32_b.log"
  timeout 120 python3 benchmarks/step_bench.py --cases tinyllama --dtype bf16 --methods "AdamW(fused=True),official loop+topk,MoFO fused,RandomBCD fused,HalfAdam fused" --csv "$out/step_bench_tinyllama_bf16.csv" 2>&1 | tee "$out/step_bench_bf16.log"
else
  timeout 250 python3 benchmarks/step_bench.py --cases alpha --csv "$out/step_bench_alpha_fp32.csv" 2>&1 | tee "$out/step_bench_alpha.log"
  timeout 150 python3 benchmarks/step_bench.py --cases tinyllama --dtype bf16 --csv "$out/step_bench_tinyllama_bf16.csv" 2>&1 | tee "$out/step_bench_bf16.log"
  timeout 150 python3 benchmarks/step_bench.py --cases sweep --sizes 1e6,16e6,256e6 --csv "$out/step_bench_sweep_fp32.csv" 2>&1 | tee "$out/step_bench_sweep.log"
fi
