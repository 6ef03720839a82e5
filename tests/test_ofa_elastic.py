"""Elastic layers and the once-for-all MobileNetV3 supernet, checked against plain PyTorch in float64."""
import random

import pytest
import torch
import torch.nn.functional as F

from pyengine.models.ofa_mbv3 import (
    MOOFA_ARCH,
    OFA_ARCH,
    MobileNetV3Subnet,
    get_arch,
    normalize_subnet,
    ofa_mbv3,
    subnet_layout,
)
from pyengine.nn.elastic import (
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticDepthwiseConv2d,
    ElasticLinear,
    ElasticSE,
    importance_order,
    make_divisible,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kernel_transform_chain_matches_hand_computation():
    torch.manual_seed(0)
    conv = ElasticDepthwiseConv2d(4, (3, 5, 7)).double()
    with torch.no_grad():
        conv.transform_7to5.copy_(torch.randn(25, 25, dtype=torch.float64))
        conv.transform_5to3.copy_(torch.randn(9, 9, dtype=torch.float64))
    w = conv.weight.detach()
    # 7 -> 5: centre 5x5 window, flattened row-major, times M^T (OFA: F.linear(window, M))
    w5 = (w[:, 0, 1:6, 1:6].reshape(4, 25) @ conv.transform_7to5.detach().t()).reshape(4, 1, 5, 5)
    w3 = (w5[:, 0, 1:4, 1:4].reshape(4, 9) @ conv.transform_5to3.detach().t()).reshape(4, 1, 3, 3)
    torch.testing.assert_close(conv.active_weight(4, 5), w5, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.active_weight(4, 3), w3, rtol=0, atol=1e-12)
    torch.testing.assert_close(conv.active_weight(2, 7), w[:2], rtol=0, atol=0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    conv.active_kernel_size = 3
    torch.testing.assert_close(conv(x), F.conv2d(x, w3[:3], None, 1, 1, 1, 3))
    # identity matrices at initialisation: the small kernel is the large kernel's centre
    fresh = ElasticDepthwiseConv2d(2, (3, 5, 7))
    torch.testing.assert_close(fresh.active_weight(2, 3), fresh.weight[:, :, 2:5, 2:5].detach())
    with pytest.raises(ValueError, match="kernel_size 4"):
        fresh.active_weight(2, 4)


def test_elastic_conv_bn_se_linear_equal_their_static_slices():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 6, 6, dtype=torch.float64)
    conv = ElasticConv2d(8, 12, 3, stride=2).double()
    conv.active_out_channels = 7
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight[:7, :5].detach(), None, 2, 1))

    bn = ElasticBatchNorm2d(9).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_var.uniform_(0.5, 2)
    ref = torch.nn.BatchNorm2d(5).double()
    ref.load_state_dict({k: (v[:5] if v.dim() else v) for k, v in bn.state_dict().items()})
    before_tail = bn.running_mean[5:].clone()
    for mode in (True, False):  # training (batch statistics, running update) and eval
        bn.train(mode)
        ref.train(mode)
        torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean[:5], ref.running_mean)
    torch.testing.assert_close(bn.running_var[:5], ref.running_var)
    assert torch.equal(bn.running_mean[5:], before_tail)  # unused channels untouched

    se = ElasticSE(16, reduction=4, divisor=2).double()
    mid = make_divisible(5 // 4, 2)
    y = x.mean((2, 3), keepdim=True)
    y = F.relu(F.conv2d(y, se.reduce_weight[:mid, :5], se.reduce_bias[:mid]))
    y = F.hardsigmoid(F.conv2d(y, se.expand_weight[:5, :mid], se.expand_bias[:5]))
    torch.testing.assert_close(se(x), x * y)

    lin = ElasticLinear(10, 6).double()
    lin.active_out_features = 4
    v = torch.randn(2, 7, dtype=torch.float64)
    torch.testing.assert_close(lin(v), v @ lin.weight[:4, :7].t() + lin.bias[:4])
    with pytest.raises(ValueError, match="outside"):
        lin(torch.randn(2, 11, dtype=torch.float64))


def test_importance_order_keeps_trained_width_groups():
    imp = torch.tensor([1.0, 9.0, 3.0, 8.0, 2.0, 7.0])
    assert importance_order(imp).tolist() == [1, 3, 5, 2, 4, 0]
    # widths 6 > 4 > 2, stage 1: channels 4, 5 stay behind the first four whatever their importance
    assert importance_order(imp, [6, 4, 2], 1).tolist() == [1, 3, 2, 0, 5, 4]
    # stage 2: groups [0, 2), [2, 4), [4, 6) each sorted within
    assert importance_order(imp, [6, 4, 2], 2).tolist() == [1, 0, 3, 2, 5, 4]
    with pytest.raises(ValueError, match="nested widths"):
        importance_order(imp, [6], 1)


def _randomise(net):
    """Non-trivial BN statistics and kernel transforms, so equality checks mean something."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "transform" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bn.weight") or name.endswith("bn.bias") or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
        for name, b in net.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)


@pytest.mark.parametrize("arch", ["ofa", "moofa"])
def test_extracted_subnet_equals_supernet_in_float64(arch):
    torch.manual_seed(2)
    net = ofa_mbv3(7, 3, arch=arch, width_mult=0.25).double()
    _randomise(net)
    net.eval()
    rng = random.Random(3)
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    for i in range(4):
        sub = net.sample(rng) if i else net.set_min()
        static = net.extract()
        assert isinstance(static, MobileNetV3Subnet) and not any("transform" in n for n, _ in static.named_parameters())
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x), rtol=1e-12, atol=1e-12)
        # the static network has exactly the active blocks, with the layout's shapes
        lay = subnet_layout(net.arch, sub, 3, 7)
        assert len(static.blocks) == 1 + sum(sub["d"])
        for blk, spec in zip(list(static.blocks)[1:], lay["blocks"][1:]):
            assert blk.dw.conv.weight.shape == (spec["mid"], 1, spec["kernel"], spec["kernel"])
            assert blk.project.conv.weight.shape == (spec["out"], spec["mid"], 1, 1)
    # rebuilt from its JSON layout and loaded state dict, it still matches (the export path)
    rebuilt = ofa_mbv3(7, 3, arch=net.arch.to_dict(), subnet=sub).double().eval()
    rebuilt.load_state_dict(static.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=1e-12, atol=1e-12)


def test_middle_channel_reorganisation_keeps_the_function():
    torch.manual_seed(4)
    net = ofa_mbv3(5, 3, arch="ofa", width_mult=0.25).double()
    _randomise(net)
    net.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        before = net(x)
        net.reorganize_middle_channels(0)
        torch.testing.assert_close(net(x), before, rtol=1e-12, atol=1e-12)
    # afterwards the middle channels are in decreasing importance (L1 of the project weights)
    blk = net.blocks[0]
    imp = blk.project.conv.weight.abs().sum((0, 2, 3))
    assert torch.all(imp[:-1] >= imp[1:])


def test_subnet_validation_errors_name_the_problem():
    net = ofa_mbv3(10, 3, arch="moofa", width_mult=0.25)
    with pytest.raises(ValueError, match="'e'.*6 is not one of"):
        net.set_active({"e": 6})
    with pytest.raises(ValueError, match="'d' needs 1 or 5"):
        net.set_active({"d": [2, 3]})
    with pytest.raises(KeyError, match="unknown subnet key"):
        net.set_active({"kernel": 3})
    with pytest.raises(ValueError, match="'d' must be a number or a list of 5, got True"):
        net.set_active({"d": True})
    with pytest.raises(KeyError, match="unknown arch"):
        get_arch("resnet")
    with pytest.raises(ValueError, match="stage_acts"):
        type(OFA_ARCH)(**{**OFA_ARCH.__dict__, "stage_acts": ("relu",)})
    sub = normalize_subnet(MOOFA_ARCH, {"ks": 5, "e": 3.0, "d": 2})
    assert sub["ks"] == [5] * 20 and sub["e"] == [3] * 20 and sub["d"] == [2] * 5


def test_sampling_is_a_function_of_the_rng_state():
    net = ofa_mbv3(10, 3, arch="ofa", width_mult=0.25)
    a = [net.sample(random.Random(11), (3, 5), (4,), (2, 3)) for _ in range(2)]
    assert a[0] == a[1]
    assert set(a[0]["ks"]) <= {3, 5} and set(a[0]["e"]) == {4} and set(a[0]["d"]) <= {2, 3}
    assert net.active_subnet == a[1]


def test_same_conv_on_inputs_smaller_than_the_kernel_is_exact():
    from pyengine.nn.elastic import same_conv2d

    torch.manual_seed(5)
    for h, w in ((1, 1), (2, 3), (3, 3), (4, 2), (9, 9)):
        for k in (3, 5, 7):
            for s in (1, 2):
                x = torch.randn(2, 4, h, w, dtype=torch.float64)
                wt = torch.randn(4, 1, k, k, dtype=torch.float64)
                torch.testing.assert_close(same_conv2d(x, wt, None, s, 4), F.conv2d(x, wt, None, s, k // 2, 1, 4))
