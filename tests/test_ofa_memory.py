"""The MOOFA spaces and peak-memory model: published numbers, widths, and two independent counts."""
import json
import random

import pytest
import torch

from pyengine.methods.ofa.command import main as ofa_main
from pyengine.methods.ofa.memory import (
    PUBLISHED_PEAKS,
    dtype_size,
    measure_cuda_peak,
    peak_memory,
    peak_memory_by_hooks,
    subnet_macs,
)
from pyengine.methods.ofa.spaces import get_space, memory_balanced_widths, moofa_space
from pyengine.models import count_flops
from pyengine.models.ofa_mbv3 import MOOFA_ARCH, get_arch, ofa_mbv3, subnet_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("space,which,res", sorted(PUBLISHED_PEAKS))
def test_published_peaks(space, which, res):
    sp = get_space(space)
    sub = sp.max_subnet(res) if which == "max" else sp.min_subnet(res)
    assert peak_memory(sp.arch, sub).peak_elements == PUBLISHED_PEAKS[(space, which, res)]


def test_published_values_by_hand():
    # OFA largest, first 24-channel block: the 7x7 depthwise conv on 96 x 112 x 112 -> 96 x 56 x 56
    assert PUBLISHED_PEAKS[("ofa", "max", 224)] == 96 * 112 * 112 + 96 * 56 * 56 + 96 * 49 == 1_509_984
    # OFA smallest at 128: the same block's 1x1 expansion, 16 -> 48 channels (expand 3) at 64 px
    assert PUBLISHED_PEAKS[("ofa", "min", 128)] == 16 * 64 * 64 + 48 * 64 * 64 + 48 * 16 == 262_912
    # MOOFA largest: a stride-1 block of the 96-channel stage (expand 4 -> 384) at 28 px, the
    # depthwise conv plus the 96 x 28 x 28 block input kept for the shortcut
    assert PUBLISHED_PEAKS[("moofa", "max", 224)] == 2 * 384 * 28 * 28 + 384 * 49 + 96 * 28 * 28 == 696_192


def test_memory_balancing_rule_gives_moofa_widths():
    w = memory_balanced_widths()
    assert w[:4] == [96, 288, 360, 384]
    assert [24] + w[:4] == [24, 96, 288, 360, 384]
    assert w[4:] == [392, 392]  # final expand and feature mix
    sp = moofa_space()
    assert sp.arch.stage_widths == (24, 96, 288, 360, 384)
    assert sp.arch == get_arch("moofa") == MOOFA_ARCH  # the model's preset is the rule's output
    assert sp.arch.expand_ratios == (2, 3, 4) and sp.arch.first_conv == 3 and sp.arch.first_block == 8
    assert get_space("ofa").arch.stage_widths == (24, 40, 80, 112, 160)
    assert get_space("ofa").arch.expand_ratios == (3, 4, 6)
    with pytest.raises(KeyError, match="unknown space"):
        get_space("proxyless")


@pytest.mark.parametrize("space", ["ofa", "moofa"])
def test_model_equals_hook_measurement_and_macs_equal_count_flops(space):
    sp = get_space(space, 0.25, resolutions=(8, 12, 20))
    rng = random.Random(0)
    for i in range(6):
        sub = sp.random_subnet(rng)
        est = peak_memory(sp.arch, sub, in_channels=1)
        net = ofa_mbv3(10, 1, arch=sp.arch.to_dict(), subnet=sub)
        hooks = peak_memory_by_hooks(net, sub["r"])
        assert est.peak_elements == hooks.peak_elements
        assert est.terms == hooks.terms
        lay = subnet_layout(sp.arch, sub, 1, 10)
        assert subnet_macs(lay, sub["r"]) == count_flops(net, (1, sub["r"], sub["r"]))
    # more of everything never lowers the peak
    small, big = sp.min_subnet(20), sp.max_subnet(20)
    assert peak_memory(sp.arch, small).peak_elements < peak_memory(sp.arch, big).peak_elements


def test_bytes_per_dtype():
    est = peak_memory(get_space("moofa").arch, get_space("moofa").max_subnet(224))
    assert est.bytes("float32") == 4 * 696_192 and est.bytes(torch.float16) == 2 * 696_192
    assert est.bytes("int8") == 696_192 and est.bytes("bf16") == 2 * 696_192
    assert dtype_size("float64") == 8
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_size("float7")


def test_cuda_peak_measurement_is_skipped_without_a_gpu():
    net = ofa_mbv3(10, 3, arch="ofa", width_mult=0.25, subnet={"ks": 3, "e": 3, "d": 2})
    got = measure_cuda_peak(net, 32, 3)
    if torch.cuda.is_available():
        assert got["activation_bytes"] > 0
    else:
        assert got is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_is_near_the_model():
    sp = get_space("moofa")
    sub = sp.max_subnet(224)
    net = ofa_mbv3(1000, 3, arch="moofa", subnet=sub)
    got = measure_cuda_peak(net, 224, 3)
    model = peak_memory(sp.arch, sub).bytes("float32")
    # activations only (all weights are resident anyway): same order as the model's figure
    assert 0.3 * model < got["activation_bytes"] < 4 * model


def test_memory_command(capsys):
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "224"]) == 0
    out = capsys.readouterr().out
    assert "1,509,984 elements" in out and "6,039,936 bytes" in out
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "128", "--kernel", "3", "--expand", "3",
                     "--depth", "2", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["peak_elements"] == 262_912 and rec["peak_bytes"] == 4 * 262_912
    arch = json.dumps({"ks": [7] * 20, "e": [4] * 20, "d": [4] * 5})
    assert ofa_main(["ofa", "memory", "--space", "moofa", "--resolution", "224", "--arch", arch, "--json",
                     "--dtype", "float16", "--terms", "--measure"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["peak_elements"] == 696_192 and rec["peak_bytes"] == 2 * 696_192 and len(rec["terms"]) == 23
    assert ("cuda" in rec) and (rec["cuda"] is None) == (not torch.cuda.is_available())
    # bad input: one error line naming the argument, exit status 2
    assert ofa_main(["ofa", "memory", "--space", "moofa", "--resolution", "224", "--expand", "6"]) == 2
    assert "'e'" in capsys.readouterr().err
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "0"]) == 2
    assert "--resolution" in capsys.readouterr().err
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "64", "--arch", "{bad"]) == 2
    assert "--arch" in capsys.readouterr().err
    # reachable through the top-level CLI (`pyengine ofa ...`)
    from pyengine.cli import main as cli_main

    assert cli_main(["ofa", "memory", "--space", "moofa", "--resolution", "224", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_elements"] == 696_192
