"""Export of an edited network: safetensors + JSON history + ONNX, and loading it back."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyengine.graph import Edit, EditHistory, apply_edits, export_model, fold_network
from pyengine.models import build_model
from pyengine.train.checkpoint import load_model_export, save_model_export

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"name": "resnet18", "kwargs": {"num_classes": 10, "width": 8}}


def _edited():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    masks = {}
    for b in model.layer3:  # the default EGP run's collapse
        for c in (b.conv1, b.conv2):
            c.weight.data.zero_()
    for name, p in model.named_parameters():
        if p.dim() == 4:
            masks[name] = p.detach() != 0
    x = torch.randn(2, 3, 8, 8)
    edited, hist = apply_edits(model, [Edit("linearise", "layer1.0.relu1")], x)
    folded, applied, refused = fold_network(edited, x)
    return model, folded, EditHistory(list(hist) + list(applied)), x


def test_export_and_load_round_trip(tmp_path):
    model, folded, history, x = _edited()
    written = export_model(folded, tmp_path, {"architecture": ARCH, "test_acc": 0.5}, history, x,
                           formats=("safetensors",), image_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    assert set(written) == {"safetensors", "json"}
    desc = json.loads((tmp_path / "model.json").read_text())
    assert desc["preprocessing"] == {"image_size": 8, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert EditHistory.from_list(desc["edits"]) == history
    assert desc["input_shape"] == [3, 8, 8] and desc["test_acc"] == 0.5
    loaded, masks, _ = load_model_export(tmp_path)
    loaded.eval()
    assert torch.equal(loaded(x), folded(x))
    assert not any(n.startswith("layer3.0.conv") for n, _ in loaded.named_modules())


def test_masks_are_checked_on_save_and_load(tmp_path):
    model, folded, history, x = _edited()
    good = {"conv1.weight": folded.conv1.weight.detach() != 0}
    with pytest.raises(ValueError, match="mask 'conv1.weight' has shape"):
        export_model(folded, tmp_path, {"architecture": ARCH}, history, x, ("safetensors",),
                     masks={"conv1.weight": torch.ones(2, 2, dtype=torch.bool)})
    save_model_export(tmp_path, folded, good, {"architecture": ARCH}, history=history,
                      example_input=x)
    _, masks, _ = load_model_export(tmp_path)
    assert torch.equal(masks["conv1.weight"], good["conv1.weight"])
    # a file whose mask no longer fits its weight is refused, naming the mask
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["mask::conv1.weight"] = torch.ones(3, 3, dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="mask 'conv1.weight'"):
        load_model_export(tmp_path)
    tensors.pop("mask::conv1.weight")
    tensors["fc.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="fc.weight"):
        load_model_export(tmp_path)


def test_export_argument_errors(tmp_path):
    model, folded, history, x = _edited()
    with pytest.raises(ValueError, match="formats"):
        export_model(folded, tmp_path, {"architecture": ARCH}, history, x, ("pickle",))
    with pytest.raises(ValueError, match="architecture"):
        export_model(folded, tmp_path, {}, history, x)
    with pytest.raises(ValueError, match="example_input"):
        export_model(folded, tmp_path, {"architecture": ARCH}, history, None)


def test_old_exports_with_a_linearised_list_still_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8).eval()
    model.layer1[0].relu1 = torch.nn.Identity()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "model.json").write_text(json.dumps(
        {"architecture": dict(ARCH, linearised=["layer1.0.relu1"])}))
    loaded, _, _ = load_model_export(tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), model(x))


def test_onnx_matches_pytorch_and_folding_shrinks_the_graph(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model, folded, history, x = _edited()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_model(model, tmp_path / "dense", {"architecture": ARCH}, [], x,
                     formats=("safetensors", "onnx"))
        export_model(folded, tmp_path / "folded", {"architecture": ARCH}, history, x,
                     formats=("safetensors", "onnx"))
    nodes = {}
    for which, net in (("dense", model), ("folded", folded)):
        path = tmp_path / which / "model.onnx"
        nodes[which] = len(onnx.load(str(path)).graph.node)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for batch in (2, 5):  # the batch dimension is dynamic
            xb = torch.randn(batch, 3, 8, 8)
            got = session.run(None, {session.get_inputs()[0].name: xb.numpy()})[0]
            with torch.no_grad():
                want = net.eval()(xb).numpy()
            assert abs(got - want).max() < 1e-4
    assert nodes["folded"] < nodes["dense"]


class _TokenNet(torch.nn.Module):
    """Token ids in (int64), an embedding, and an MLP."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.fc1 = torch.nn.Linear(8, 8)
        self.act = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(8, 8)
        self.act2 = torch.nn.ReLU()
        self.out = torch.nn.Linear(8, 3)

    def forward(self, ids):
        h = self.emb(ids).mean(1)
        return self.out(self.act2(self.fc2(self.act(self.fc1(h)))))


def test_an_export_of_integer_inputs_loads_back(tmp_path):
    # the recorded input was rebuilt as float zeros: replaying a remove_branch (which runs the
    # network) failed on the embedding, and ONNX export cast the token ids to float
    from pyengine.graph import load_export

    torch.manual_seed(0)
    model = _TokenNet().eval()
    model.fc1.weight.data.zero_()  # a constant branch: remove_branch runs the example on replay
    ids = torch.randint(0, 20, (4, 5))
    folded, applied, _ = fold_network(model, ids[:1])
    assert [e.kind for e in applied][0] == "remove_branch"
    formats = ("safetensors", "onnx") if _onnx_available() else ("safetensors",)
    export_model(folded, tmp_path, {"architecture": {"name": "user:TokenNet"}}, applied, ids[:1], formats=formats)
    loaded, _masks, _desc = load_export(tmp_path, lambda arch: _TokenNet())
    assert torch.equal(loaded.eval()(ids), folded(ids))
    assert json.loads((tmp_path / "model.json").read_text())["input_dtype"] == "int64"
    if "onnx" in formats:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        assert abs(got - folded(ids).detach().numpy()).max() < 1e-5


def _onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


class _MixedNet(torch.nn.Module):
    """float16 layers, then float64 layers with a BatchNorm, then a float32 head; the forward
    casts between them, as a mixed-precision model does."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.act1 = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(8, 8)
        self.act2 = torch.nn.ReLU()
        self.fc3 = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.act3 = torch.nn.ReLU()
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.act2(self.fc2(self.act1(self.fc1(x.to(torch.float16)))))
        h = self.act3(self.bn(self.fc3(h.to(torch.float64))))
        return self.out(h.to(torch.float32))


def _mixed_net():
    m = _MixedNet()
    m.fc1.half()
    m.fc2.half()
    m.fc3.double()
    m.bn.double()
    return m


@pytest.mark.parametrize("edited", [False, True])
@pytest.mark.parametrize("builder", ["float32", "mixed"])
def test_an_export_in_mixed_precision_loads_back_in_its_dtypes(tmp_path, edited, builder):
    # load_export cast the rebuilt base only when the file held one float dtype: the float16 and
    # float64 layers came back float32 (load_state_dict copies into the network's dtype) and the
    # forward failed on its first cast
    from pyengine.graph import load_export

    torch.manual_seed(0)
    model = _mixed_net().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 6)
    history = []
    if edited:  # linearise one activation, fold BatchNorm and the now adjacent linear layers
        model, history = apply_edits(model, [Edit("linearise", "act3")], x[:1])
        model, applied, _ = fold_network(model, x[:1])
        history = list(history) + list(applied)
    want_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {torch.float16, torch.float64, torch.float32} <= set(want_dtypes.values())
    with torch.no_grad():
        want = model(x)
    export_model(model, tmp_path, {"architecture": {"name": "user:MixedNet"}}, history, x[:1],
                 formats=("safetensors",))
    build = (lambda arch: _MixedNet()) if builder == "float32" else (lambda arch: _mixed_net())
    loaded, _, _ = load_export(tmp_path, build)
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == want_dtypes
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        got = loaded.eval()(x)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_a_float64_export_loads_back_in_float64(tmp_path):
    from pyengine.graph import load_export

    torch.manual_seed(0)
    model = _TokenNet().double().eval()
    ids = torch.randint(0, 20, (4, 5))
    export_model(model, tmp_path, {"architecture": {"name": "user:TokenNet"}}, [], ids[:1], formats=("safetensors",))
    loaded, _, _ = load_export(tmp_path, lambda arch: _TokenNet())  # built in float32
    assert all(v.dtype == torch.float64 for v in loaded.state_dict().values())
    assert torch.equal(loaded.eval()(ids), model(ids))
