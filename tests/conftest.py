import os

import pytest
import torch

import pyengine

# Keep the 2-core machines responsive: the tests are small, threads beyond 2 only add noise.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CUDA_OK = torch.cuda.is_available() and pyengine.CUDA_COMPILED
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels in this build")])]


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
