"""The sdd method's parts against independent references: the distillation loss by hand, the frozen
teacher, the sparsity schedule, the dip/peak detection, DSD2's VGG-like model, human-noise label
files."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from pyengine.methods.sdd.curves import analyse, detect_double_descent
from pyengine.methods.sdd.method import SDD, KDLoss, SDDOptions, kd_loss, load_teacher, target_kept

pytestmark = pytest.mark.usefixtures("one_thread")


def _softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def test_kd_loss_matches_a_hand_computation():
    zs = [[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]]
    zt = [[2.0, 0.0, -1.0], [-0.5, 1.5, 0.25]]
    y = [2, 0]
    alpha, T = 0.8, 10.0
    kl = ce = 0.0
    grad = []
    for s_row, t_row, yi in zip(zs, zt, y):
        ps = _softmax([v / T for v in s_row])
        pt = _softmax([v / T for v in t_row])
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        p1 = _softmax(s_row)
        ce += -math.log(p1[yi])
        # d/dz_s of alpha T^2 KL / B + (1 - alpha) CE / B
        grad.append([(alpha * T * (ps[k] - pt[k]) + (1 - alpha) * (p1[k] - (k == yi))) / len(y) for k in range(3)])
    ref = alpha * T * T * kl / len(y) + (1 - alpha) * ce / len(y)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    out = kd_loss(s, torch.tensor(zt, dtype=torch.float64), torch.tensor(y), alpha, T)
    assert abs(out.detach().item() - ref) < 1e-12
    out.backward()
    assert torch.allclose(s.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-12)
    # alpha = 0 is plain cross-entropy; alpha = 1 ignores the labels
    s = s.detach()
    assert abs(float(kd_loss(s, torch.tensor(zt, dtype=torch.float64), torch.tensor(y), 0.0, T)) - ce / 2) < 1e-12
    a = kd_loss(s, torch.tensor(zt, dtype=torch.float64), torch.tensor(y), 1.0, T)
    b = kd_loss(s, torch.tensor(zt, dtype=torch.float64), torch.tensor([0, 1]), 1.0, T)
    assert float(a) == float(b)


def _tiny_cnn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10))


def test_teacher_stays_frozen_through_training():
    from pyengine.train.loop import TrainConfig, make_optimizer, make_scheduler, train_epochs

    teacher = _tiny_cnn(0)
    with torch.no_grad():  # non-trivial BN statistics, which a train-mode forward would move
        teacher[1].running_mean.uniform_(-1, 1)
        teacher[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.train()  # whatever mode it comes in, the callback measures it in eval mode
    cb = KDLoss(teacher, 0.8, 10.0)
    assert all(not p.requires_grad for p in teacher.parameters())
    student = _tiny_cnn(1)
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, schedule="constant", amp=False)
    opt = make_optimizer(student, cfg)
    teacher.train()
    train_epochs(student, loader, torch.device("cpu"), cfg, opt, make_scheduler(opt, cfg, len(loader)),
                 callbacks=[cb], progress=False)
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN buffers (running stats, batch count)
    assert all(p.grad is None for p in teacher.parameters())
    assert any(not torch.equal(v, s_before[k]) for k, v in student.state_dict().items())


def test_load_teacher_checks_and_freezes(tmp_path):
    from pyengine.models import build_model

    arch = {"name": "vgglike", "kwargs": {"num_classes": 10, "in_channels": 1, "image_size": 8, "depth": 2, "width": 2}}
    m = build_model(arch["name"], **arch["kwargs"])
    torch.save(m.state_dict(), tmp_path / "w.pt")
    t = load_teacher(tmp_path / "w.pt", arch, torch.zeros(1, 1, 8, 8), 10)
    assert not t.training and all(not p.requires_grad for p in t.parameters())
    with pytest.raises(ValueError, match="kd-teacher"):
        load_teacher(tmp_path / "w.pt", arch, torch.zeros(1, 1, 8, 8), 7)  # another number of classes
    with pytest.raises(FileNotFoundError, match="kd-teacher"):
        load_teacher(tmp_path / "missing.pt", arch, torch.zeros(1, 1, 8, 8), 10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="pyengine export"):
        load_teacher(tmp_path / "empty", arch, torch.zeros(1, 1, 8, 8), 10)


def test_target_kept_is_the_closed_form():
    n = 11_173_962  # ResNet-18's prunable weights: the schedule never drifts from 1 - (1 - r)^i
    for i in range(35):
        k = target_kept(n, 0.2, i)
        assert abs((1 - k / n) - (1 - 0.8 ** i)) <= 0.5 / n + 1e-15
    # compounding round(r * remaining) drifts; the closed form does not
    kept, drift = 4964, 0
    for i in range(1, 20):
        kept -= round(0.3 * kept)
        drift = max(drift, abs(kept - target_kept(4964, 0.3, i)))
    assert drift > 0


def test_detection_finds_the_dip_and_the_second_peak():
    sp = [0, 0.2, 0.36, 0.49, 0.59, 0.67, 0.74, 0.79]
    acc = [90.0, 88.0, 84.0, 83.0, 87.0, 91.0, 89.0, 70.0]
    d = detect_double_descent(sp, acc, tol=1.0)
    assert d["double_descent"] and d["dip"]["index"] == 3 and d["peak"]["index"] == 5 and d["before"]["index"] == 0
    assert d["prominence"] == pytest.approx(7.0) and d["final_drop"] == pytest.approx(21.0)
    assert not detect_double_descent(sp, sorted(acc, reverse=True), tol=1.0)["double_descent"]  # monotone
    assert not detect_double_descent(sp, acc, tol=7.5)["double_descent"]  # shallower than the tolerance
    loss = [1.0, 1.1, 1.4, 1.5, 1.2, 0.9, 1.0, 2.0]
    dl = detect_double_descent(sp, loss, higher_is_better=False, tol=0.0)
    assert dl["double_descent"] and dl["dip"]["index"] == 3 and dl["dip"]["value"] == 1.5
    rows = [{"sparsity": s, "test_acc": a, "test_loss": l} for s, a, l in zip(sp, acc, loss)]
    a = analyse(rows)
    assert a["best"]["index"] == 5 and a["dense_acc"] == 90.0 and a["final"]["test_acc"] == 70.0
    with pytest.raises(ValueError, match="length"):
        detect_double_descent(sp, acc[:-1])


def _loss_peak_markers(monkeypatch, tmp_path, rows, tol=1.0):
    """The (x, y) of every '^' marker plot_curves draws on the test-loss panel of one curve."""
    from pyengine.methods.sdd import plots

    seen = {}
    save = plots._save

    def keep(fig, path):
        ax = fig.axes[1]  # the loss panel
        seen["loss"] = [(float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in ax.get_lines()
                        if l.get_marker() == "^"]
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_curves([{"label": "run", "rows": rows, "analysis": analyse(rows, tol)}], tmp_path / "c.png")
    return seen["loss"]


def test_a_tiny_test_loss_bump_is_no_peak(monkeypatch, tmp_path):
    # the loss peak was detected with tolerance 0, so any bump of noise height was marked
    sp = [0, 0.2, 0.36, 0.49, 0.59, 0.67, 0.74, 0.79]
    rem = [1 - s for s in sp]
    acc = [90.0, 88.0, 84.0, 83.0, 87.0, 91.0, 89.0, 70.0]  # a double descent: 7 points deep
    # rises from 0.5 to 2.5 with one bump 0.004 high at index 3 (its prominence: 0.004)
    flat_bump = [0.5, 0.6, 0.7, 0.704, 0.7, 0.8, 0.9, 2.5]
    rows = [{"sparsity": s, "remaining": r, "test_acc": a, "test_loss": l} for s, r, a, l in zip(sp, rem, acc, flat_bump)]
    # by hand: the loss range is 2.0, so a peak needs 0.2; the bump's prominence is 0.004
    assert _loss_peak_markers(monkeypatch, tmp_path, rows) == []
    a = analyse(rows)
    assert a["test_loss"]["prominence"] == pytest.approx(0.004)
    assert not a["test_loss"]["double_descent"] and a["test_acc"]["double_descent"]
    assert a["loss_tol"] == pytest.approx(0.1 * (2.5 - 0.5))
    # a real loss peak: 1.5 at index 3, 0.5 above the best loss before (1.0) and 0.6 above after
    # (0.9); range 1.1, so the tolerance 0.11 is met; marked at x = remaining[3], y = 1.5
    peak = [1.0, 1.1, 1.4, 1.5, 1.2, 0.9, 1.0, 2.0]
    rows = [{"sparsity": s, "remaining": r, "test_acc": a, "test_loss": l} for s, r, a, l in zip(sp, rem, acc, peak)]
    assert analyse(rows)["test_loss"]["dip"]["index"] == 3
    assert _loss_peak_markers(monkeypatch, tmp_path, rows) == [(pytest.approx(rem[3]), 1.5)]
    # the same loss peak on a run whose accuracy falls monotonically: the report and the table
    # call it no double descent, so the plot marks no loss peak either
    mono = sorted(acc, reverse=True)
    rows = [{"sparsity": s, "remaining": r, "test_acc": a, "test_loss": l} for s, r, a, l in zip(sp, rem, mono, peak)]
    a = analyse(rows)
    assert not a["test_acc"]["double_descent"] and not a["test_loss"]["double_descent"]
    assert _loss_peak_markers(monkeypatch, tmp_path, rows) == []


def test_vgglike_matches_dsd2_structure():
    from pyengine.graph import activation_map
    from pyengine.models import build_model

    m = build_model("vgglike", num_classes=10, image_size=32, depth=3, width=8)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32] and all(c.bias is not None for c in convs)
    names = [n for n, _ in m.features.named_children()]
    assert names[:4] == ["conv1_1", "relu1_1", "bn1_1", "conv1_2"]  # ReLU before BN, as the authors'
    # parameters by hand: convs (3x3 + bias), BN (2 per channel), fc on the 7x7 pooled map
    chans = [(3, 8), (8, 8), (8, 16), (16, 16), (16, 32), (32, 32)]
    n = sum(9 * a * b + b + 2 * b for a, b in chans) + 7 * 7 * 32 * 10 + 10
    assert sum(p.numel() for p in m.parameters()) == n
    sites = activation_map(m, example_input=torch.zeros(1, 3, 32, 32))
    assert [s.producer for s in sites] == [f"features.conv{k}_{j}" for k in (1, 2, 3) for j in (1, 2)]
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth"):
        build_model("vgglike", num_classes=10, image_size=8, depth=4)
    with pytest.raises(ValueError, match="width"):
        build_model("vgglike", num_classes=10, width=0)


def test_human_label_files(tmp_path):
    from pyengine.data import build_dataset, build_loaders
    from pyengine.data.human_noise import apply_label_file, read_label_file

    b = build_dataset("digits", image_size=8, val_fraction=0.1, seed=0)
    n_src = len(b.train.source)
    clean_src = torch.zeros(n_src, dtype=torch.int64)
    clean_src[b.train.indices] = b.train.clean_targets
    human = clean_src.clone()
    flip = torch.arange(0, n_src, 7)
    human[flip] = (human[flip] + 3) % 10
    # the CIFAR-N release: a torch.save'd dict of NumPy arrays, read without running code
    torch.save({"clean_label": clean_src.numpy(), "noisy_label": human.numpy(), "worse_label": human.numpy()},
               tmp_path / "human.pt")
    np.save(tmp_path / "human.npy", human.numpy())
    (tmp_path / "human.json").write_text(json.dumps({"aggre_label": human.tolist()}))
    (tmp_path / "human.csv").write_text("id,aggre_label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(human.tolist())))
    for path, key in (("human.pt", None), ("human.npy", None), ("human.json", "aggre_label"), ("human.csv", "aggre_label")):
        assert torch.equal(read_label_file(tmp_path / path, key), human), path
    assert torch.equal(read_label_file(tmp_path / "human.pt", "clean_label"), clean_src)
    with pytest.raises(KeyError, match="no key 'nope'"):
        read_label_file(tmp_path / "human.pt", "nope")
    loader = build_loaders(b, 4096).train  # built before the labels change, as in a run
    noisy = apply_label_file(b.train, human, 10)
    expected = (human[b.train.indices] != b.train.clean_targets).nonzero().flatten()
    assert torch.equal(noisy, expected) and noisy.numel() > 0
    ys = torch.cat([y for _, y in loader])
    assert torch.equal(ys.sort().values, human[b.train.indices].sort().values)
    with pytest.raises(ValueError, match="labels"):
        apply_label_file(b.train, human[:10])
    # through the method (its options): the run's bundle gets the labels, and synthetic noise is refused
    b2 = build_dataset("digits", image_size=8, seed=0)
    run = SimpleNamespace(bundle=b2, cfg=SimpleNamespace(noise=0.0))
    SDD(SDDOptions(human_labels=f"{tmp_path / 'human.pt'}:noisy_label"), run)
    assert torch.equal(b2.train.targets, human[b2.train.indices])
    assert b2.info.noise == pytest.approx(float((b2.train.targets != b2.train.clean_targets).float().mean()))
    with pytest.raises(ValueError, match="--noise 0"):
        SDD(SDDOptions(human_labels=str(tmp_path / "human.pt")), SimpleNamespace(bundle=b2, cfg=SimpleNamespace(noise=0.2)))


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_act_follows_the_schedule_exactly(scope):
    """Round after round (no training needed), the masks keep round(N (1 - r)^i) weights - per layer
    with scope=layerwise - and the smallest-magnitude weights go first."""
    from pyengine.nn.masks import MaskSet

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(73, 68), nn.Linear(68, 10))  # 4964 + 680 weights
    masks = MaskSet(model, "linear")
    m = SDD(SDDOptions(rate=0.3, scope=scope), SimpleNamespace(masks=masks))
    n = masks.total()
    for i in range(1, 20):
        before = {k: v.clone() for k, v in masks.masks.items()}
        rec = m.act({"round": i - 1})  # masks only: the weights keep their magnitudes for the check below
        assert rec["target_sparsity"] == pytest.approx(1 - 0.7 ** i)
        if scope == "global":
            assert masks.kept() == round(n * 0.7 ** i), i
            w = torch.cat([p.detach().abs().flatten() for p in masks.params.values()])
            kept = torch.cat([v.flatten() for v in masks.masks.values()])
            gone = torch.cat([(b & ~a).flatten() for b, a in zip(before.values(), masks.masks.values())])
            assert float(w[gone].max()) <= float(w[kept].min())  # one global ranking, smallest first
        else:
            for name, mk in masks.masks.items():
                assert int(mk.sum()) == round(mk.numel() * 0.7 ** i), (i, name)
    # a target sparsity stops the schedule there
    masks2 = MaskSet(model, "linear")
    m2 = SDD(SDDOptions(rate=0.3, sparsity=0.5), SimpleNamespace(masks=masks2))
    m2.act({"round": 0})
    m2.act({"round": 1})
    assert masks2.sparsity() == pytest.approx(0.5, abs=1 / n) and m2.should_stop([]) is not None


def test_stop_drop_stops_below_the_best_round_and_keeps_the_last_good_one():
    """--stop-drop: IMP stops when validation accuracy falls more than the drop below the best round
    so far (test accuracy without a validation split), and the last round before that is the result."""
    import pyengine

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    comp = pyengine.Compressor(net, "sdd", example_input=torch.zeros(1, 4), options={"stop_drop": 1.0},
                               log=lambda *a: None)
    m = comp.method
    assert m.keeps_best

    def rounds(*accs, key="val_acc"):
        return [{"round": i, key: a, "test_acc": 50.0 if key == "val_acc" else a} for i, a in enumerate(accs)]

    assert m.should_stop(rounds(90.0, 91.0, 90.5)) is None  # 0.5 below the best: go on
    reason = m.should_stop(rounds(90.0, 91.0, 89.9))
    assert reason and "validation accuracy 89.90% fell more than 1 points below the best round's 91.00%" in reason
    assert m.select(rounds(90.0, 91.0, 90.5, 89.9)) == 2
    assert "test (no validation split)" in m.should_stop(rounds(90.0, 88.0, key="test_acc"))
    plain = pyengine.Compressor(net, "sdd", example_input=torch.zeros(1, 4), log=lambda *a: None).method
    assert plain.should_stop(rounds(90.0, 10.0)) is None and plain.select(rounds(90.0, 10.0)) == 1
    assert not plain.keeps_best


def test_distilled_run_resumed_after_a_kill_equals_an_uninterrupted_one(tmp_path):
    """The teacher is loaded when a process first trains: in a resumed run that is after the saved
    random state was restored, so the teacher's (discarded) random initialisation used to shift every
    later augmentation draw - a KD run resumed in round 1 ended with other weights than one never
    interrupted."""
    from pyengine.methods import Run, RunConfig
    from pyengine.models import build_model

    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(123)
    torch.save(build_model("vgglike", num_classes=10, in_channels=1, image_size=8, depth=2, width=2).state_dict(),
               teacher)

    def cfg(out, **kw):
        return RunConfig(model="vgglike", dataset="digits", image_size=8, epochs=1, rounds=1, batch_size=256,
                         method="sdd", no_progress=True, device="cpu", model_opts={"depth": 2, "width": 2},
                         options={"kd_teacher": str(teacher), "rate": 0.3}, out=str(tmp_path / out), **kw)

    Run(cfg("full"), log=lambda *a: None).run()

    class Kill(Exception):
        pass

    def kill(rnd, ep):
        if rnd == 0:
            raise Kill

    with pytest.raises(Kill):
        Run(cfg("killed"), on_epoch=kill, log=lambda *a: None).run()
    Run(cfg("killed", resume=True), log=lambda *a: None).run()
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
