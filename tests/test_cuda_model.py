"""CUDA kernel sources run without a GPU: tests/cuda_model/model.h models the CUDA execution model
on the CPU (a std::thread per CUDA thread, block and warp barriers, shuffles and ballots, WMMA
with opaque fragments, exact-size dynamic shared memory, the runtime calls the launchers make),
and the launchers and kernels of csrc/masked/bitmap_cuda.cu, sparse_cuda.cu, masked_cuda.cu,
csrc/entropy/entropy_cuda.cu and csrc/sliced/sliced_grouped_cuda.cu run in it against plain loops - under AddressSanitizer + UBSan
(out-of-bounds global and shared memory, misaligned vector accesses) and under ThreadSanitizer
(a missing __syncwarp / __syncthreads shows as a race; a smaller case set, MODEL_QUICK=1).

This checks indexing, synchronisation, launch configuration and error reporting, not the compiler
or the hardware: the CUDA tests (``-k cuda``) still have to pass on a GPU. The other sliced
kernels (CUB block sorts) are not modelled.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "cuda_model"
DRIVERS = ["bitmap_model", "sparse_model", "entropy_model", "masked_model", "grouped_model"]
SANITIZERS = ["address,undefined", "thread"]


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return Path(c) / "include"
    return None


def _build_and_run(driver: str, sanitizer: str, out_dir: Path) -> tuple[str, subprocess.CompletedProcess]:
    label = f"{driver} [{sanitizer}]"
    exe = out_dir / f"{driver}_{sanitizer.replace(',', '_')}"
    cmd = [
        os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", f"-fsanitize={sanitizer}", "-pthread",
        "-Wno-tsan", f"-I{MODEL / 'shim'}", f"-I{MODEL}", f"-I{ROOT / 'csrc'}", f"-I{_cuda_include()}",
        str(MODEL / f"{driver}.cpp"), "-o", str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if build.returncode != 0:
        return label, build
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", MODEL_QUICK="1" if sanitizer == "thread" else "0")
    return label, subprocess.run([str(exe)], capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA headers (cuda_bf16.h) on this machine")
def test_cuda_kernels_in_the_cpu_model_of_cuda(tmp_path):
    jobs = [(d, s) for d in DRIVERS for s in SANITIZERS]
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        runs = list(pool.map(lambda j: _build_and_run(j[0], j[1], tmp_path), jobs))
    failed = []
    for label, r in runs:
        out = (r.stdout or "") + (r.stderr or "")
        ok = (r.returncode == 0 and "all ok" in r.stdout and "FAIL" not in r.stdout
              and "ThreadSanitizer" not in out and "runtime error" not in out)
        if not ok:
            failed.append(f"{label}:\n{out[-4000:]}")
    assert not failed, "\n\n".join(failed)
