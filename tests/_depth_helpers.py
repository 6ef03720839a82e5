"""Shared set-up of the depth-method tests: a tiny ResNet-18 (width 8) on 8x8 digits, fast latency."""
import functools

import pytest
import torch

from pyengine.methods import RunConfig

quiet = dict(log=lambda *a: None)


def capture_fold(monkeypatch) -> dict:
    """Makes every run's final fold record the eval-mode network before and after it ("before",
    "after") and the run's test loader ("test"), in the dict returned."""
    import copy

    from pyengine.methods import runner as R

    seen = {}
    fold = R.RunContext.fold_collapsed

    def keep(self, summary):
        seen["before"] = copy.deepcopy(self.model).eval()
        rec = fold(self, summary)
        seen["after"], seen["test"] = copy.deepcopy(self.model).eval(), self.loaders["test"]
        return rec

    monkeypatch.setattr(R.RunContext, "fold_collapsed", keep)
    return seen


def tiny_cfg(tmp_path, method, name="run", **kw):
    base = dict(model="resnet18", method=method, dataset="digits", image_size=8, epochs=1, batch_size=128,
                out=str(tmp_path / name), no_progress=True, entropy_batches=3, model_opts={"width": 8})
    base.update(kw)
    return RunConfig(**base)


@pytest.fixture
def fast_latency(monkeypatch):
    """Latency still measured, but in blocks of 0.02 s instead of 0.5 s (the numbers are not what
    these tests check)."""
    import pyengine.graph as g

    monkeypatch.setattr(g, "measure_latency", functools.partial(g.measure_latency, warmup=1, min_run_time=0.02))


class Stop(Exception):
    pass


def stop_at(point):
    def hook(rnd, ep):
        if (rnd, ep) == point:
            raise Stop

    return hook


def onnx_matches(folder, model, shape):
    """The exported ONNX network in ``folder`` gives ``model``'s outputs in onnxruntime."""
    import onnxruntime as ort

    x = torch.randn(*shape)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    return abs(got - ref).max() <= 1e-4 * max(1.0, abs(ref).max())
