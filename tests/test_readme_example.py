"""The README's own-model example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_model_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- example:own-model -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its own-model example"
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(2)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)  # noqa: S102 - our own README
    comp, x = scope["comp"], scope["x"]
    # three EGP rounds pruned the model, the fold kept its function, the export loads back
    assert comp.masks.sparsity() > 0.5
    assert torch.allclose(scope["before"], comp.model(x[:5]), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "my-net" / "model.onnx").stat().st_size > 0
    from pyengine.graph import load_export

    net, masks, desc = load_export(tmp_path / "my-net", lambda arch: scope["Net"]())
    net.eval()
    assert torch.allclose(net(x[:5]), comp.model(x[:5]), atol=1e-6)
    assert desc["method"] == "egp" and masks
