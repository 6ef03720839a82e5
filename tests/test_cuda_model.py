"""CUDA kernel sources run without a GPU: tests/cuda_model/model.h models the CUDA execution model
on the CPU (a std::thread per CUDA thread, block and warp barriers, WMMA with opaque fragments),
and the kernels of csrc/masked/bitmap_cuda.cu run in it against a plain product and an independent
packing - under AddressSanitizer + UBSan (out-of-bounds global and shared memory, misaligned
vector accesses) and under ThreadSanitizer (a missing __syncwarp / __syncthreads shows as a race).

This checks the kernels' indexing, synchronisation and error reporting, not the compiler or the
hardware: the CUDA tests (test_ops_masked.py, ``-k cuda``) still have to pass on a GPU.
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


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return Path(c) / "include"
    return None


def _build_and_run(source: Path, sanitizer: str, out_dir: Path) -> subprocess.CompletedProcess:
    exe = out_dir / f"{source.stem}_{sanitizer.replace(',', '_')}"
    cmd = [
        os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-g", f"-fsanitize={sanitizer}", "-pthread",
        "-Wno-tsan", f"-I{MODEL / 'shim'}", f"-I{MODEL}", f"-I{ROOT / 'csrc'}", f"-I{_cuda_include()}",
        str(source), "-o", str(exe),
    ]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if build.returncode != 0:
        return build
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1", ASAN_OPTIONS="detect_leaks=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA headers (cuda_bf16.h) on this machine")
def test_bitmap_kernels_in_the_cpu_model_of_cuda(tmp_path):
    source = MODEL / "bitmap_model.cpp"
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda s: (s, _build_and_run(source, s, tmp_path)), ["address,undefined", "thread"]))
    for sanitizer, r in runs:
        out = (r.stdout or "") + (r.stderr or "")
        assert r.returncode == 0, f"{sanitizer}:\n{out[-6000:]}"
        assert "all ok" in r.stdout and "FAIL" not in r.stdout, f"{sanitizer}:\n{out[-6000:]}"
        assert "ThreadSanitizer" not in out and "runtime error" not in out, f"{sanitizer}:\n{out[-6000:]}"
