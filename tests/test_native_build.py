"""The built extension uses the C++ runtime torch runs with.

A toolchain without the libstdc++.so development link makes the linker fall back to libstdc++.a;
the static copy inside pyengine._C then mixes with torch's shared one at run time. On the H100
machine (2026-11-27) that crashed every native error message holding a number (and apply_masks_ on
valid input, which formats tensor names); on this CPU machine the same build silently cut the
message at its first number ("x must have "). CMakeLists.txt links the library torch loaded.
"""
import shutil
import subprocess
import sys

import pytest
import torch

import pyengine

pytestmark = pytest.mark.skipif(not pyengine.HAS_NATIVE, reason="needs the built extension")


def _lib():
    from pyengine import _C

    return _C.__file__


def test_native_error_messages_keep_their_numbers():
    with pytest.raises(ValueError) as e:
        torch.ops.pyengine.masked_linear(torch.ones(4), torch.ones(5, 4), torch.ones(5, 4, dtype=torch.bool), None)
    assert str(e.value).splitlines()[0].endswith("x must have 2 dimensions (M, K), got shape (4,)"), str(e.value)
    with pytest.raises(IndexError) as e:
        torch.ops.pyengine.apply_masks_([torch.ones(3)], [torch.ones(3, dtype=torch.bool)], [3])
    assert "mask_index[0] = 3 is out of range for 1 masks" in str(e.value), str(e.value)
    t = [torch.ones(6), torch.ones(2, 3)]
    m = [torch.tensor([True, False] * 3), torch.tensor([[False, True, True], [True, True, False]])]
    torch.ops.pyengine.apply_masks_(t, m, [0, 1])  # valid input formats no message at all
    assert t[0].tolist() == [1, 0, 1, 0, 1, 0] and t[1].sum().item() == 4


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None or shutil.which("nm") is None,
                    reason="needs Linux binutils (readelf, nm)")
def test_extension_links_the_shared_cxx_runtime():
    dyn = subprocess.run(["readelf", "-d", _lib()], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[-1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), f"pyengine._C does not link libstdc++ dynamically: {needed}"
    syms = subprocess.run(["nm", "-D", "--defined-only", _lib()], capture_output=True, text=True, check=True).stdout
    # std::ostream::_M_insert<long> lives in libstdc++ (explicitly instantiated there, never in user code): defined
    # here only when a static copy of the runtime was linked in
    assert "_ZNSo9_M_insertIlEERSoT_" not in syms, "pyengine._C holds a static copy of the C++ runtime"
