import os

import pytest
import torch

import pyengine

# Keep the 2-core machines responsive: the tests are small, threads beyond 2 only add noise.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CUDA_OK = torch.cuda.is_available() and pyengine.CUDA_COMPILED
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels in this build")])]


# PYENGINE_TEST_CUDA_MEM_LOG=FILE (benchmarks/gpu_check.sh sets it): each pytest-xdist worker gets
# its share of the GPU's memory (so one worker's cached blocks cannot starve the others: its
# allocator frees them when it reaches its share), and every test whose CUDA peak passes 1 GiB is
# written to FILE. On an H100, 2026-11-27, eight workers without shares ended with one holding
# 60 GiB and six tests failing for want of 32 MiB.
_CUDA_MEM_LOG = os.environ.get("PYENGINE_TEST_CUDA_MEM_LOG")


def pytest_sessionstart(session):
    if _CUDA_MEM_LOG and CUDA_OK:
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        torch.cuda.set_per_process_memory_fraction(min(1.0, 0.9 / max(workers, 1)))


@pytest.fixture(autouse=True)
def _cuda_memory_record(request):
    if not (_CUDA_MEM_LOG and CUDA_OK):
        yield
        return
    torch.cuda.reset_peak_memory_stats()
    yield
    peak = torch.cuda.max_memory_allocated()
    if peak > (1 << 30):
        with open(_CUDA_MEM_LOG, "a") as f:
            f.write(f"{peak / 2**30:.2f} GiB allocated at peak ({torch.cuda.max_memory_reserved() / 2**30:.2f} "
                    f"reserved): {request.node.nodeid}\n")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """The test machines are small and shared: one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poison():
    """Fills every freshly allocated tensor with NaN (ints: their max), so an output element a
    kernel forgot to write fails the comparison."""
    import torch.utils.deterministic as det

    old_fill, old_det = det.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det)


def rel_err(out, ref):
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm()
    return float((out - ref).norm() / denom) if denom > 0 else float((out - ref).norm())
