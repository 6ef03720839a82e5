"""LaCoOT: the regulariser against POT, the monitored pairs per architecture, the replace_block edit,
block ranking and removal, the user's-loop path (Compressor), and a run through the CLI with resume
and ONNX export."""
import copy
import json

import pytest
import torch
from torch import nn

from _depth_helpers import Stop, onnx_matches, quiet, stop_at
from _depth_helpers import fast_latency  # noqa: F401 (a fixture, used by name)
from pyengine.graph import Edit, apply_edit, map_masks, replay
from pyengine.methods import run
from pyengine.methods.depth.lacoot import ARCH_DEFAULTS, find_block_pairs, lacoot_regulariser
from pyengine.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_regulariser_equals_pot_for_the_same_directions():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(0)
    # four pairs shaped like a ResNet's stages (batch 6), float64
    shapes = [(6, 4, 8, 8), (6, 8, 4, 4), (6, 16, 2, 2), (6, 32, 1, 1)]
    xs = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    ys = [(x.detach() * 0.7 + 0.3 * torch.randn(s, generator=g, dtype=torch.float64)).requires_grad_() for x, s in
          zip(xs, shapes)]
    dirs = []
    for x in xs:
        t = torch.randn(50, x[0].numel(), generator=g, dtype=torch.float64)
        dirs.append(t / t.norm(dim=1, keepdim=True))
    mean, per = lacoot_regulariser(list(zip(xs, ys)), directions=dirs)
    ref_per = torch.stack([ot.sliced.max_sliced_wasserstein_distance(x.flatten(1), y.flatten(1), projections=t.T)
                           for x, y, t in zip(xs, ys, dirs)])
    torch.testing.assert_close(per, ref_per, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, ref_per.mean(), rtol=1e-12, atol=1e-12)
    # the gradient into both point sets as well
    gx = torch.autograd.grad(mean, xs + ys)
    gr = torch.autograd.grad(ref_per.mean(), xs + ys)
    for a, b in zip(gx, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # random directions: K unit vectors from the generator, reproducible from its seed
    a = lacoot_regulariser(list(zip(xs, ys)), n_directions=50, generator=torch.Generator().manual_seed(3))[1]
    b = lacoot_regulariser(list(zip(xs, ys)), n_directions=50, generator=torch.Generator().manual_seed(3))[1]
    c = lacoot_regulariser(list(zip(xs, ys)), n_directions=50, generator=torch.Generator().manual_seed(4))[1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="pair 0"):
        lacoot_regulariser([(xs[0], xs[1])])


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_packed_pairs_equal_separate_calls_and_pot(device, reduce):
    """All pairs in one call (each pair on its own column block of the directions, the default)
    gives the distances and gradients of one call per pair, and POT's, for the same directions."""
    ot = pytest.importorskip("ot")
    from pyengine.ops import grouped_directions

    g = torch.Generator().manual_seed(1)
    shapes = [(7, 4, 6, 6), (7, 8, 3, 3), (7, 16, 2, 2), (7, 40)]
    xs = [torch.randn(s, generator=g, dtype=torch.float64).to(device).requires_grad_() for s in shapes]
    ys = [(x.detach() * 0.5 + torch.randn(s, generator=g, dtype=torch.float64).to(device)).requires_grad_() for x, s in
          zip(xs, shapes)]
    dims = [x[0].numel() for x in xs]
    theta = grouped_directions(dims, 30, generator=g, dtype=torch.float64).to(device)
    blocks = list(torch.split(theta, dims, dim=1))
    # every block of every row is a unit vector
    for t in blocks:
        torch.testing.assert_close(t.norm(dim=1), torch.ones(30, dtype=torch.float64, device=device), rtol=1e-12,
                                   atol=1e-12)
    pairs = list(zip(xs, ys))
    mp, dp = lacoot_regulariser(pairs, directions=blocks, reduce=reduce, packed=True)
    ms, ds = lacoot_regulariser(pairs, directions=blocks, reduce=reduce, packed=False)
    torch.testing.assert_close(dp, ds, rtol=1e-12, atol=1e-12)
    pot = ot.sliced.max_sliced_wasserstein_distance if reduce == "max" else ot.sliced.sliced_wasserstein_distance
    ref = torch.stack([pot(x.flatten(1), y.flatten(1), projections=t.T) for x, y, t in zip(xs, ys, blocks)])
    torch.testing.assert_close(dp, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(mp, xs + ys), torch.autograd.grad(ms, xs + ys)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # drawn directions: seeded, and the same pairs give the same value packed or not for one draw
    a = lacoot_regulariser(pairs, n_directions=20, generator=torch.Generator(device).manual_seed(5), packed=True)[1]
    b = lacoot_regulariser(pairs, n_directions=20, generator=torch.Generator(device).manual_seed(5), packed=True)[1]
    assert torch.equal(a, b) and a.shape == (4,) and bool((a > 0).all())
    with pytest.raises(ValueError, match="one batch size"):
        lacoot_regulariser([(xs[0], ys[0]), (xs[1][:3], ys[1][:3])], packed=True)


def test_monitored_pairs_per_architecture():
    arch, pairs = find_block_pairs(build_model("resnet18", num_classes=10, width=8))
    assert arch == "resnet" and [p.block for p in pairs] == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert all(p.src == p.dst == p.block for p in pairs)
    _, pairs = find_block_pairs(build_model("resnet34", num_classes=10, width=8))
    assert len(pairs) == 2 + 3 + 5 + 2
    # MobileNetV2 (CIFAR strides): the depthwise unit of every stride-1 expanding block, as the
    # authors' 13 (features.2, 3, 5, 6, 8-13, 15-17 = our blocks.1, 2, 4, 5, 7-12, 14-16)
    arch, pairs = find_block_pairs(build_model("mobilenet_v2", num_classes=10, width_mult=0.25))
    assert arch == "mobilenet_v2"
    assert [p.block for p in pairs] == [f"blocks.{i}.dw" for i in (1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 14, 15, 16)]
    # Swin-T: each of the 12 blocks, its input against its MLP branch's output
    arch, pairs = find_block_pairs(build_model("swin_t", num_classes=10, image_size=32, embed_dim=8,
                                               num_heads=(1, 1, 1, 1)))
    assert arch == "swin" and len(pairs) == 12
    assert pairs[0].block == pairs[0].src == "features.1.0" and pairs[0].dst == "features.1.0.mlp"
    arch, pairs = find_block_pairs(build_model("vit", num_classes=10, dim=16, depth=3, heads=2, mlp_dim=16))
    assert arch == "vit" and [p.dst for p in pairs] == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    assert ARCH_DEFAULTS["resnet"]["lambda_reg"] == 5.0 and ARCH_DEFAULTS["mobilenet_v2"]["lambda_reg"] == 9.0
    assert ARCH_DEFAULTS["swin"]["lambda_reg"] == 0.1
    with pytest.raises(ValueError, match="--monitor-blocks"):
        find_block_pairs(build_model("vgg11_bn", num_classes=10))
    with pytest.raises(KeyError, match="nope"):
        find_block_pairs(build_model("vgg11_bn", num_classes=10), ["features.conv1_1", "nope"])


def test_replace_block_is_the_block_replaced_by_identity():
    torch.manual_seed(0)
    for name, kw, blocks in [("resnet18", dict(width=8), ["layer1.1", "layer3.1"]),
                             ("mobilenet_v2", dict(width_mult=0.25), ["blocks.2.dw"]),
                             ("vit", dict(dim=16, depth=2, heads=2, mlp_dim=16), ["blocks.1"])]:
        model = build_model(name, num_classes=10, in_channels=1, image_size=8, **kw).double().eval()
        x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
        ref = copy.deepcopy(model)
        for b in blocks:
            parent, _, leaf = b.rpartition(".")
            setattr(ref.get_submodule(parent), leaf, nn.Identity())
        net, history = model, []
        for b in blocks:
            e = Edit("replace_block", b)
            net = apply_edit(net, e, x[:1])
            history.append(e.to_dict())
        assert torch.equal(net(x), ref(x)), name
        assert not any(n.startswith(blocks[-1] + ".") for n, _ in net.named_parameters())
        assert f"{blocks[-1]}" in history[-1]["args"]["removed"][0]
        # replay rebuilds the same structure from the base model and the records
        again = replay(build_model(name, num_classes=10, in_channels=1, image_size=8, **kw).double(), history, x[:1])
        again.load_state_dict(net.state_dict())
        assert torch.equal(again.eval()(x), net(x))
        # masks of the removed layers go, the others stay
        masks = {n: torch.rand_like(p) > 0.5 for n, p in model.named_parameters() if p.dim() > 1}
        mapped = map_masks(masks, model, history, x[:1])
        assert set(mapped) == {n for n, p in net.named_parameters() if p.dim() > 1}
        assert all(torch.equal(mapped[k], masks[k]) for k in mapped)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=8)
    with pytest.raises(ValueError, match="output shape"):
        apply_edit(model, Edit("replace_block", "layer2.0"), torch.zeros(1, 1, 8, 8))  # a stride-2 block
    with pytest.raises(KeyError, match="layer9"):
        apply_edit(model, Edit("replace_block", "layer9"), torch.zeros(1, 1, 8, 8))
    assert "identity" in Edit("replace_block", "layer1.1").describe()


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _regulariser_step(device):
    from pyengine import Compressor

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=8).to(device)
    comp = Compressor(model, "lacoot", example_input=torch.zeros(1, 1, 8, 8, device=device), **quiet)
    cb = comp.step_callbacks()[0]
    cb.on_train_start(comp.model)
    cb.on_epoch_start(0, 1)
    return comp, cb


def test_training_regulariser_leaves_nan_to_the_loop():
    """In training a NaN distance is not raised per pair (that read-back is a host sync on CUDA):
    the term is NaN, so the loss is, and the training loop's non-finite check names the step."""
    comp, cb = _regulariser_step("cpu")
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    cb.on_batch_start(0, x, y)
    out = comp.model(x)
    assert torch.isfinite(cb.extra_loss(out, y, x))
    h = comp.model.layer2[1].register_forward_hook(lambda m, i, o: o * float("nan"))
    try:
        cb.on_batch_start(1, x, y)
        out = comp.model(x)
        assert torch.isnan(cb.extra_loss(out, y, x))
    finally:
        h.remove()
    pairs = [(torch.randn(4, 6), torch.full((4, 6), float("nan")))]
    with pytest.raises(ValueError, match="NaN"):  # the default (scoring, user calls) still raises
        lacoot_regulariser(pairs, n_directions=3)


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and __import__("pyengine").CUDA_COMPILED), reason="no CUDA")
def test_training_regulariser_does_not_sync_on_cuda():
    comp, cb = _regulariser_step("cuda")
    x = torch.randn(8, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    cb.on_batch_start(0, x, y)
    comp.model(x)  # warm-up outside the check
    cb.capture.clear()
    out = comp.model(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = nn.functional.cross_entropy(out, y) + cb.extra_loss(out, y, x)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()


@pytest.mark.usefixtures("fast_latency")
def test_ranking_and_removal_in_a_users_loop():
    """A block whose residual branch outputs 0 is the identity: its distance is 0, it is ranked first,
    and removing it (and only it, with --remove-blocks 1) leaves the network's outputs unchanged."""
    from pyengine import Compressor

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, width=8)
    with torch.no_grad():  # layer3.1's body now adds 0 to its input, which is >= 0 (a ReLU output)
        model.layer3[1].bn2.weight.zero_()
        model.layer3[1].bn2.bias.zero_()
    comp = Compressor(model, "lacoot", example_input=torch.zeros(1, 1, 8, 8), options={"remove_blocks": 1}, **quiet)
    data = _batches()
    # the user's loop: the method's step callback adds lambda * mean distance to the loss
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.01)
    cbs = comp.step_callbacks()
    for cb in cbs:
        cb.on_train_start(comp.model)
        cb.on_epoch_start(0, 1)
    model.train()
    for step, (x, y) in enumerate(data[:2]):
        for cb in cbs:
            cb.on_batch_start(step, x, y)
        out = comp.model(x)
        extra = cbs[0].extra_loss(out, y, x)
        assert extra.requires_grad and float(extra.detach()) > 0
        opt.zero_grad()
        (nn.functional.cross_entropy(out, y) + extra).backward()
        assert model.layer1[1].conv1.weight.grad is not None
        for cb in cbs:
            cb.after_step(comp.model, opt)
    for cb in cbs:
        cb.on_train_end(comp.model)
    with torch.no_grad():  # keep the block exactly the identity after the steps
        model.layer3[1].bn2.weight.zero_()
        model.layer3[1].bn2.bias.zero_()
    assert comp.method.lam == 5.0  # the published ResNet value
    scores = comp.method.score(data)
    assert scores["layer3.1"] == 0.0 and all(v > 0 for k, v in scores.items() if k != "layer3.1")
    x = torch.randn(4, 1, 8, 8)
    before = comp.model.eval()(x)
    rec = comp.step()
    assert rec["ranking"][0] == "layer3.1" and rec["removed"] == ["layer3.1"] and rec["blocks_removed"] == 1
    assert [r["blocks_removed"] for r in rec["table"]] == [0, 1, 2, 3, 4]
    macs = [r["macs"] for r in rec["table"]]
    assert all(a > b for a, b in zip(macs, macs[1:])) and rec["table"][1]["val_acc"] == rec["table"][0]["val_acc"]
    assert [e["kind"] for e in comp.edits] == ["replace_block"]
    assert not any(n.startswith("layer3.1.") for n, _ in comp.model.named_parameters())
    torch.testing.assert_close(comp.model.eval()(x), before, rtol=0, atol=1e-6)
    # the tolerance rule: 0 points allows exactly the removals that keep the scoring accuracy
    comp2 = Compressor(copy.deepcopy(model), "lacoot", example_input=torch.zeros(1, 1, 8, 8),
                       options={"tolerance": 0.0}, **quiet)
    comp2.method.score(data)
    rec2 = comp2.step()
    accs = [r["val_acc"] for r in rec2["table"]]
    k = rec2["blocks_removed"]
    assert all(a >= accs[0] for a in accs[:k + 1]) and (k == 4 or accs[k + 1] < accs[0])


@pytest.mark.usefixtures("fast_latency")
def test_lacoot_cli_run_resume_and_onnx_export(tmp_path, monkeypatch, capsys):
    from pyengine.cli import main
    from pyengine.methods import runner
    from pyengine.train.checkpoint import load_model_export

    # the CLI with a width-8 ResNet-18 (model options are API-only)
    monkeypatch.setitem(runner.PRESET_MODEL_OPTS, "quick", {"resnet18": {"width": 8}})
    argv = ["prune", "--method", "lacoot", "--image-size", "8", "--epochs", "2", "--batch-size", "128",
            "--directions", "20", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "blocks removed without fine-tuning" in text and "<- result" in text
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    mr = a["method_result"]
    assert mr["lambda"] == 5.0 and mr["directions"] == 20 and mr["val_reduce"] == "mean" and mr["scored_on"] == "val"
    assert sorted(mr["ranking"]) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    assert [mr["distances"][b] for b in mr["ranking"]] == sorted(mr["distances"].values())
    assert a["networks"]["pruned"]["test_acc"] == mr["test_acc"] == a["final_acc"]
    assert a["networks"]["folded"]["depth"] == a["networks"]["dense"]["depth"] - 2 * mr["blocks_removed"]
    assert (tmp_path / "a" / "accuracy_vs_macs.png").stat().st_size > 1000
    assert set(a["rounds"][0]["train_distances"]) == set(mr["ranking"])
    # killed after the first epoch and resumed: the same directions, the same network, the same removals
    from pyengine.cli import config_from_args
    from pyengine.cli import build_parser

    cfg = config_from_args(build_parser().parse_args([*argv, "--out", str(tmp_path / "b")]))
    with pytest.raises(Stop):
        run(cfg, on_epoch=stop_at((0, 1)), **quiet)
    assert main(["prune", "--resume", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert b["method_result"]["distances"] == mr["distances"] and b["final_acc"] == a["final_acc"]
    assert b["rounds"][0]["train_distances"] == a["rounds"][0]["train_distances"]
    assert b["edits"] == a["edits"]
    sa = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # pyengine export: the folded, block-removed network in onnxruntime
    capsys.readouterr()
    assert main(["export", str(tmp_path / "a"), "--format", "onnx"]) == 0
    model, _, desc = load_model_export(tmp_path / "a" / "final")
    assert any(e["kind"] == "replace_block" for e in desc["edits"]) == (mr["blocks_removed"] > 0)
    assert onnx_matches(tmp_path / "a" / "final", model, (5, 1, 8, 8))
    # bad input: clear errors naming the flag
    for bad, needle in ((["--lambda-reg", "-1"], "--lambda-reg"), (["--directions", "0"], "--directions"),
                        (["--monitor-blocks", "layer1.1,nope"], "nope"), (["--val-reduce", "median"], "median")):
        try:
            rc = main([*argv, *bad, "--out", str(tmp_path / "bad")])
        except SystemExit as exc:  # argparse's own choice check
            rc = exc.code
        assert rc == 2, bad
        assert needle in capsys.readouterr().err


def test_block_capture_keeps_each_pairs_input_and_output():
    """A pre-hook (input) and a hook (output) per pair, on one module (ResNet) or two (a split
    pair): the tensors kept are the block's own."""
    from pyengine.methods.depth.lacoot import BlockCapture, BlockPair

    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, width=8).eval()
    _, pairs = find_block_pairs(model)
    seen = {}
    hs = [model.get_submodule(p.block).register_forward_hook(
        lambda m, a, o, k=p.block: seen.__setitem__(k, (a[0].clone(), o.clone()))) for p in pairs]
    split = pairs + [BlockPair("l1split", "layer1.0.conv1", "layer1.0.bn1")]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), BlockCapture(model, split) as cap:
        model(x)
        got = cap.take()
        for p, (a, b) in zip(pairs, got):
            assert torch.equal(a, seen[p.block][0]) and torch.equal(b, seen[p.block][1])
        a, b = got[-1]
        assert a.shape[1] == model.layer1[0].conv1.in_channels and b.shape[1] == model.layer1[0].bn1.num_features
        assert not cap.inputs and not cap.outputs  # take() clears
    for h in hs:
        h.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_monitored_block_that_changes_shape_is_named():
    # the error came at the first training step, as "pair 0: the two point sets have shapes ...",
    # without the block's name
    import pyengine

    class TwoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
            self.wider = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU())
            self.fc = nn.Linear(6, 2)

        def forward(self, x):
            return self.fc(self.wider(self.same(x)).mean((2, 3)))

    x = torch.randn(1, 3, 6, 6)
    with pytest.raises(ValueError, match=r"wider \(\[3, 6, 6\] -> \[6, 6, 6\]\)"):
        pyengine.Compressor(TwoBlocks(), "lacoot", example_input=x, options={"monitor_blocks": ["same", "wider"]},
                            log=lambda s: None)
    comp = pyengine.Compressor(TwoBlocks(), "lacoot", example_input=x, options={"monitor_blocks": ["same"]},
                               log=lambda s: None)
    assert [p.block for p in comp.method.pairs] == ["same"]


def test_a_second_step_after_the_removal_is_named_not_a_key_error(fast_latency):
    # after step() removed blocks, the scores and pairs still named them: a second step() raised
    # KeyError "the network has no block '1'", a new score() "has no module ..."
    import pyengine

    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())  # noqa: E731
    model = nn.Sequential(nn.Conv2d(3, 4, 1), block(), block(), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(8, 3, 4, 4)
    batches = [(x, torch.zeros(8, dtype=torch.long))]
    comp = pyengine.Compressor(model, "lacoot", example_input=x[:1],
                               options={"monitor_blocks": ["1", "2"], "remove_blocks": 1, "directions": 4},
                               log=lambda s: None)
    comp.method.score(batches)
    rec = comp.step()
    assert len(rec["removed"]) == 1 and set(rec["distances"]) == {"1", "2"}
    assert comp.step() is None  # nothing left to act on
    with pytest.raises(RuntimeError, match="removes blocks once"):
        comp.method.score(batches)


def test_removal_measures_a_float64_model(fast_latency):
    # the latency batch of each removal step was float32 whatever the model: a float64 (or
    # bfloat16) model crashed in step() with "Input type (torch.FloatTensor) and weight type ..."
    import pyengine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    comp = pyengine.Compressor(model.double(), "lacoot", example_input=x[:1],
                               options={"monitor_blocks": ["2"], "remove_blocks": 1, "directions": 4},
                               log=lambda s: None)
    comp.method.score([(x, torch.zeros(8, dtype=torch.long))])
    rec = comp.step()
    assert rec["removed"] == ["2"] and rec["table"][1]["latency_ms_batch32"] > 0


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

    def forward(self, x):
        return x + self.f(x)


class _ResMLP(nn.Module):
    """Three residual MLP blocks; ``after`` follows the first one (an in-place ReLU, or not);
    ``out`` picks what the forward returns: the logits, (logits, features) or {"logits": ...}."""

    def __init__(self, inplace=False, out="tensor"):
        super().__init__()
        self.inp = nn.Linear(16, 8)
        self.blocks = nn.ModuleList(_Res() for _ in range(3))
        self.after = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(8, 3)
        self.out = out

    def forward(self, x):
        h = self.after(self.blocks[0](self.inp(x)))
        for b in self.blocks[1:]:
            h = b(h)
        logits = self.head(h)
        return {"tensor": logits, "tuple": (logits, h), "dict": {"logits": logits, "features": h}}[self.out]


def test_a_block_output_changed_in_place_after_the_block_is_refused():
    # nn.ReLU(inplace=True) after a monitored block rewrote the kept output: the distance compared
    # the block's input with relu(output), silently
    from pyengine.methods.depth.lacoot import BlockCapture, BlockPair

    torch.manual_seed(0)
    x = torch.randn(5, 16)
    for inplace in (False, True):
        net = _ResMLP(inplace=inplace)
        pairs = [BlockPair("blocks.0", "blocks.0", "blocks.0")]
        with torch.no_grad(), BlockCapture(net, pairs) as cap:
            net(x)
            if inplace:
                with pytest.raises(RuntimeError, match="output of block 'blocks.0' was changed in place after the block"):
                    cap.take()
                continue
            (a, b), = cap.take()
            h = net.inp(x)  # the reference, in plain PyTorch
            assert torch.equal(a, h) and torch.equal(b, h + net.blocks[0].f(h))


def test_an_input_changed_in_place_inside_the_block_is_refused():
    from pyengine.methods.depth.lacoot import BlockCapture, BlockPair

    class Inplace(nn.Module):
        def forward(self, x):
            return x.mul_(2.0)

    net = nn.Sequential(nn.Linear(4, 4), Inplace(), nn.Linear(4, 2))
    with torch.no_grad(), BlockCapture(net, [BlockPair("1", "1", "1")]) as cap:
        net(torch.randn(3, 4))
        with pytest.raises(RuntimeError, match="input of block '1' was changed in place inside the block"):
            cap.take()


@pytest.mark.parametrize("out", ["tuple", "dict"])
def test_removal_of_a_model_returning_a_tuple_or_dict_measures_its_logits(fast_latency, out):
    # the accuracy after each removal read the output as a tensor: AttributeError "'tuple' object
    # has no attribute 'float'"
    import pyengine

    torch.manual_seed(0)
    net = _ResMLP(out=out)
    x, y = torch.randn(40, 16), torch.randint(0, 3, (40,))
    batches = list(zip(x.split(16), y.split(16)))
    comp = pyengine.Compressor(net, "lacoot", example_input=x[:1],
                               options={"monitor_blocks": ["blocks.1", "blocks.2"], "remove_blocks": 1, "directions": 4},
                               log=lambda s: None)
    with torch.no_grad():  # the reference: top-1 accuracy of the unedited network, by hand
        o = net.eval()(x)
        logits = o[0] if out == "tuple" else o["logits"]
        want = 100.0 * float((logits.argmax(1) == y).sum()) / len(y)
    comp.method.score(batches)
    rec = comp.step()
    assert rec["table"][0]["val_acc"] == pytest.approx(want) and len(rec["removed"]) == 1


def test_scoring_on_a_one_shot_iterator_is_refused(fast_latency):
    # score() used up a generator, and the accuracy of every removal was then measured on nothing:
    # 0% each, all "within the tolerance", so every block was removed
    import pyengine

    torch.manual_seed(0)
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    comp = pyengine.Compressor(_ResMLP(), "lacoot", example_input=x[:1],
                               options={"monitor_blocks": ["blocks.1", "blocks.2"], "directions": 4},
                               log=lambda s: None)
    with pytest.raises(TypeError, match="one-shot generator"):
        comp.method.score((a, b) for a, b in zip(x.split(16), y.split(16)))
    with pytest.raises(ValueError, match=r"\(inputs, labels\) pairs, got a Tensor"):
        comp.method.score(list(x.split(16)))  # scoring needs inputs only; the accuracy needs labels
        comp.step()
