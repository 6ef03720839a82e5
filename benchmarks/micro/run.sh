#!/usr/bin/env bash
# One device call: build the variant kernels (no torch headers, a few seconds) and time them.
#   OUT=/tmp/o bash benchmarks/micro/run.sh        (MICRO_ONLY=csr, csr16 or count: one of the tables)
set -euo pipefail
OUT=${OUT:-/tmp/pyengine_micro}
mkdir -p "$OUT"
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$NVCC" -O3 -arch=sm_90 -shared -Xcompiler -fPIC -o /tmp/variants.so benchmarks/micro/variants.cu
${PYTHON:-python3} benchmarks/micro/run_variants.py /tmp/variants.so --json "$OUT/variants.json" ${MICRO_ONLY:+--only "$MICRO_ONLY"} 2>&1 | tee "$OUT/variants.log"
