"""The training loop: per-step callbacks, metrics kept on the device, non-finite losses named by step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyengine.train.loop as loop
from pyengine.methods.base import StepCallback
from pyengine.train.loop import TrainConfig, make_optimizer, make_scheduler, train_epochs


def _setup(lr=0.1, n=6, epochs=2):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(n)]
    cfg = TrainConfig(epochs=epochs, batch_size=5, lr=lr, schedule="constant", amp=False, workers=0)
    opt = make_optimizer(model, cfg)
    return model, data, cfg, opt, make_scheduler(opt, cfg, len(data))


class Recorder(StepCallback):
    def __init__(self):
        self.events = []

    def on_train_start(self, model):
        self.events.append("start")

    def on_epoch_start(self, epoch, total):
        self.events.append(f"epoch{epoch}/{total}")

    def on_batch_start(self, step, x, y):
        self.events.append(f"batch{step}")

    def loss(self, logits, y, x):
        self.events.append("loss")
        return None

    def extra_loss(self, logits, y, x):
        self.events.append("extra")
        return logits.pow(2).mean() * 0.0

    def after_backward(self, model):
        assert all(p.grad is not None for p in model.parameters())
        self.events.append("backward")

    def after_step(self, model, optimizer):
        self.events.append("step")

    def on_train_end(self, model):
        self.events.append("end")


def test_callbacks_run_in_order_and_metrics_match_a_plain_loop():
    model, data, cfg, opt, sched = _setup()
    rec = Recorder()
    hist = train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, callbacks=[rec], progress=False)
    assert rec.events[:8] == ["start", "epoch0/2", "batch0", "loss", "extra", "backward", "step", "batch1"]
    assert rec.events[-1] == "end" and rec.events.count("step") == 12
    # the same training by hand gives the same weights and the same epoch metrics
    model2, data2, cfg2, opt2, sched2 = _setup()
    for epoch in range(2):
        losses, correct = [], 0
        for x, y in data2:
            out = model2(x)
            loss = F.cross_entropy(out, y)
            opt2.zero_grad()
            loss.backward()
            opt2.step()
            sched2.step()
            losses.append(float(loss.detach()) * len(y))
            correct += int((out.argmax(1) == y).sum())
        assert hist[epoch]["train_loss"] == pytest.approx(sum(losses) / 30, rel=1e-12)
        assert hist[epoch]["train_acc"] == pytest.approx(100 * correct / 30)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


class ReplaceLoss(StepCallback):
    def loss(self, logits, y, x):
        return logits.sum() * 0 + 7.0


class TwoForwards(StepCallback):
    """Takes over the step: two forwards with accumulated gradients (as OFA does)."""

    def __init__(self):
        self.calls = 0

    def forward_backward(self, model, x, y):
        self.calls += 1
        total = 0.0
        for half in (x[: len(x) // 2], x[len(x) // 2:]):
            out = model(half)
            loss = out.pow(2).mean() / 2
            loss.backward()
            total = total + loss.detach()
        return total, model(x).detach()


def test_a_callback_can_replace_the_loss_or_the_whole_step():
    model, data, cfg, opt, sched = _setup(epochs=1)
    hist = train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, callbacks=[ReplaceLoss()], progress=False)
    assert hist[0]["train_loss"] == pytest.approx(7.0)
    model, data, cfg, opt, sched = _setup(epochs=1)
    tf = TwoForwards()
    before = [p.detach().clone() for p in model.parameters()]
    train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, callbacks=[tf], progress=False)
    assert tf.calls == len(data)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_loss_names_epoch_and_step(monkeypatch, deferred):
    """Every step on the CPU; once per epoch (no host sync per step) on a GPU - the deferred path is
    forced here to test it on the CPU."""
    monkeypatch.setattr(loop, "DEFER_NONFINITE_CHECK", deferred)
    model, data, cfg, opt, sched = _setup()

    class NaNAt(StepCallback):
        def extra_loss(self, logits, y, x):
            self.n = getattr(self, "n", 0) + 1
            return logits.sum() * (float("nan") if self.n == 3 else 0.0)

    with pytest.raises(FloatingPointError, match="^round 2/3: the loss became .* at epoch 1, step 3 of 6"):
        train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, callbacks=[NaNAt()], progress=False,
                     desc="round 2/3")


def test_one_line_per_epoch_without_a_terminal():
    model, data, cfg, opt, sched = _setup()
    lines = []
    train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, progress=False, log=lines.append, desc="dense")
    assert len(lines) == 2 and lines[0].startswith("dense epoch 1/2: loss")


def test_a_terminal_keeps_one_line_per_epoch_after_its_bar(capsys):
    # the bar is cleared at the end of each epoch (leave=False): without the line, a terminal user
    # saw no epoch's loss or accuracy once its bar was gone
    model, data, cfg, opt, sched = _setup()
    lines = []
    train_epochs(model, data, torch.device("cpu"), cfg, opt, sched, progress=True, log=lines.append, desc="dense")
    assert [x.split(":")[0] for x in lines] == ["dense epoch 1/2", "dense epoch 2/2"]
    assert "dense epoch 1/2" in capsys.readouterr().err  # the bar itself went to stderr
