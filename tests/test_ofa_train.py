"""Progressive shrinking: the step, BN recalibration, the phase plan, two DDP ranks, kill + resume."""
import json
import math
import os
import random
import socket

import pytest
import torch
import torch.nn.functional as F

from pyengine.methods.ofa.spaces import get_space
from pyengine.methods.ofa.train import (
    RECIPES,
    OFATrainConfig,
    Phase,
    build_phases,
    ofa_train_step,
    phase_lr_lambda,
    recalibrate_bn,
    resize_batch,
    run_train,
    step_seed,
)
from pyengine.models.ofa_mbv3 import ofa_mbv3
from pyengine.nn.elastic import ElasticBatchNorm2d

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_cfg(tmp_path, name, **kw):
    base = dict(space="moofa", width_mult=0.25, resolutions=(8, 12), dataset="digits", epochs=1, steps_per_epoch=2,
                batch_size=16, calib_images=32, eval_batch_size=128, progress=False, out=str(tmp_path / name))
    base.update(kw)
    return OFATrainConfig(**base)


def test_step_accumulates_the_gradients_of_its_subnets():
    torch.manual_seed(0)
    net = ofa_mbv3(4, 1, arch="ofa", width_mult=0.25, dropout=0.0).double()
    teacher = net.extract({}).double()
    with torch.no_grad():  # a teacher different from the student
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    phase = Phase("expand-2", 1, 0.1, subnets_per_step=3, kernel_sizes=(3, 5, 7), expand_ratios=(3, 4, 6),
                  depths=(2, 3, 4), resolutions=(8, 12), label_smoothing=0.1, kd_ratio=0.7)
    net.train()
    stats = ofa_train_step(net, (x, y), teacher, phase, step_seed(0, 5, 1, 2))
    got = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    assert len(stats["subnets"]) == 3 and stats["n"] == 6
    # the same seed draws the same resolution and subnets; another seed draws others
    rng = random.Random(step_seed(0, 5, 1, 2))
    assert rng.choice((8, 12)) == stats["resolution"]
    again = [net.sample(rng, (3, 5, 7), (3, 4, 6), (2, 3, 4)) for _ in range(3)]
    assert again == stats["subnets"]
    other = random.Random(step_seed(0, 5, 1, 3))
    other.choice((8, 12))
    assert net.sample(other) != stats["subnets"][0]
    # reference: the sum over the subnets of the gradient of CE(smoothed) + 0.7 * CE(soft teacher)
    xr = resize_batch(x, stats["resolution"])
    teacher.train()
    with torch.no_grad():
        soft = F.softmax(teacher(xr), dim=1)
    params = dict(net.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = []
    for sub in stats["subnets"]:
        net.set_active(sub)
        out = net(xr)
        loss = F.cross_entropy(out, y, label_smoothing=0.1) + 0.7 * F.cross_entropy(out, soft)
        losses.append(float(loss.detach()))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                want[n] += g
    assert stats["loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)
    for n, g in got.items():
        torch.testing.assert_close(g, want[n], rtol=1e-10, atol=1e-12)
    for n, g in want.items():  # parameters no drawn subnet uses get no gradient
        assert n in got or g.abs().sum() == 0


def test_recalibration_sets_the_average_batch_statistics():
    torch.manual_seed(1)
    conv1, conv2 = torch.nn.Conv2d(2, 3, 3, padding=1).double(), torch.nn.Conv2d(3, 4, 1).double()
    bn1, bn2 = torch.nn.BatchNorm2d(3).double(), ElasticBatchNorm2d(6).double()
    net = torch.nn.Sequential(conv1, bn1, torch.nn.ReLU(), conv2, bn2)
    batches = [torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)]
    loader = [(b, torch.zeros(len(b))) for b in batches]
    bn2.running_mean[4:] = 7.0
    net.eval()
    n = recalibrate_bn(net, loader, torch.device("cpu"))
    assert n == 8 and not net.training
    # by hand: weighted mean over batches of the batch mean and biased variance, each BN seeing
    # the previous one normalised with batch statistics
    m1 = v1 = m2 = v2 = 0
    with torch.no_grad():
        for b in batches:
            h = conv1(b)
            m, v = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False)
            m1, v1 = m1 + len(b) * m, v1 + len(b) * v
            h = conv2(torch.relu((h - m.view(1, -1, 1, 1)) / torch.sqrt(v.view(1, -1, 1, 1) + bn1.eps) * bn1.weight.view(1, -1, 1, 1)
                                 + bn1.bias.view(1, -1, 1, 1)))
            m2, v2 = m2 + len(b) * h.mean((0, 2, 3)), v2 + len(b) * h.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(bn1.running_mean, m1 / 8)
    torch.testing.assert_close(bn1.running_var, v1 / 8)
    torch.testing.assert_close(bn2.running_mean[:4], m2 / 8)
    torch.testing.assert_close(bn2.running_var[:4], v2 / 8)
    assert torch.all(bn2.running_mean[4:] == 7.0)  # channels not in use are left alone


def test_phase_plan_follows_ofa():
    for space, emin in (("ofa", 3), ("moofa", 2)):
        sp = get_space(space)
        ph = build_phases(sp, RECIPES["ofa-imagenet"], lr_scale=8)
        assert [p.name for p in ph] == ["full", "kernel", "depth-1", "depth-2", "expand-1", "expand-2"]
        emax = max(sp.arch.expand_ratios)
        assert (ph[0].kernel_sizes, ph[0].expand_ratios, ph[0].depths, ph[0].distill) == ((7,), (emax,), (4,), False)
        assert ph[1].kernel_sizes == (3, 5, 7) and ph[1].depths == (4,) and ph[1].subnets_per_step == 1
        assert ph[2].depths == (3, 4) and ph[3].depths == (2, 3, 4) and ph[3].expand_ratios == (emax,)
        assert ph[2].subnets_per_step == ph[3].subnets_per_step == 2
        assert len(ph[4].expand_ratios) == 2 and ph[5].expand_ratios[0] == emin and ph[5].subnets_per_step == 4
        assert (ph[4].reorganize_stage, ph[5].reorganize_stage) == (0, 1)
        assert (ph[1].epochs, ph[1].warmup_epochs, ph[1].total_epochs) == (120, 5, 125)
        assert ph[1].lr == pytest.approx(8 * 3e-2) and ph[2].lr == pytest.approx(8 * 2.5e-3)
    with pytest.raises(ValueError, match="unknown phase"):
        build_phases(get_space("ofa"), RECIPES["quick"], names=["width"])
    # the moofa recipe's rates are the authors' config values
    assert RECIPES["moofa-imagenet"].phases["kernel"] == (120, 3e-3, 5)


def test_learning_rate_warms_up_then_follows_a_cosine():
    ph = Phase("x", epochs=4, lr=0.2, warmup_epochs=1, warmup_lr=0.02)
    f = phase_lr_lambda(ph, steps_per_epoch=10)
    assert 0.2 * f(0) == pytest.approx(0.02 + 0.18 * 1 / 10)
    assert 0.2 * f(9) == pytest.approx(0.2)
    assert f(10) == pytest.approx(1.0)
    assert f(10 + 20) == pytest.approx(0.5)
    assert f(10 + 40) == pytest.approx(0.0, abs=1e-12)
    assert f(10 + 30) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    kw = dict(epochs=2, steps_per_epoch=1, phases=("full", "expand-1"), eval_every_epoch=False, final_eval=False)
    whole = run_train(_tiny_cfg(tmp_path, "whole", **kw), log=lambda *a: None)

    class Kill(Exception):
        pass

    for stop in (("full", 2), ("expand-1", 1)):  # a phase boundary, then mid-phase
        def on_epoch(phase, epoch, stop=stop):
            if (phase, epoch) == stop:
                raise Kill

        with pytest.raises(Kill):
            run_train(_tiny_cfg(tmp_path, "cut", resume=True, **kw), on_epoch=on_epoch, log=lambda *a: None)
    resumed = run_train(_tiny_cfg(tmp_path, "cut", resume=True, **kw), log=lambda *a: None)

    def strip(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]

    assert strip(resumed["history"]) == strip(whole["history"])
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "whole" / "supernet" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "supernet" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run resumed again only rewrites its report; a new run into it is refused
    run_train(_tiny_cfg(tmp_path, "cut", resume=True, **kw), log=lambda *a: None)
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(_tiny_cfg(tmp_path, "cut", **kw), log=lambda *a: None)
    with pytest.raises(ValueError, match="--width-mult: 0.25 -> 0.5"):
        run_train(_tiny_cfg(tmp_path, "cut", resume=True, **{**kw, "width_mult": 0.5}), log=lambda *a: None)


def test_resume_with_evaluation_every_epoch_equals_an_uninterrupted_run(tmp_path):
    """Evaluation (BN recalibration over a loader) draws from the global random state as much as
    its loaders need in this process - a resumed run loads them afresh. It runs on a forked state,
    so phases after a resume train exactly as in an uninterrupted run (a user audit found depth-2
    onwards differing after a kill at the end of the kernel phase)."""
    kw = dict(epochs=1, steps_per_epoch=2, phases=("full", "kernel", "depth-1", "depth-2"), eval_every_epoch=True,
              final_eval=False)
    whole = run_train(_tiny_cfg(tmp_path, "whole", **kw), log=lambda *a: None)

    class Kill(Exception):
        pass

    def on_epoch(phase, epoch):
        if phase == "kernel":
            raise Kill

    with pytest.raises(Kill):
        run_train(_tiny_cfg(tmp_path, "cut", **kw), on_epoch=on_epoch, log=lambda *a: None)
    resumed = run_train(_tiny_cfg(tmp_path, "cut", resume=True, **kw), log=lambda *a: None)

    def strip(h):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in h]

    assert [r["phase"] for r in resumed["history"]] == ["full", "kernel", "depth-1", "depth-2"]
    assert strip(resumed["history"]) == strip(whole["history"])


# ------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pyengine.methods.ofa.train import OFATrainConfig, average_gradients, run_train
    from pyengine.train.dist import init_distributed

    init_distributed("cpu")
    # 1) the step on different data per rank: same subnets, same weights after every update
    torch.manual_seed(0)
    net = ofa_mbv3(4, 1, arch="ofa", width_mult=0.25)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    phase = Phase("expand-2", 1, 0.01, subnets_per_step=2, kernel_sizes=(3, 5, 7), expand_ratios=(3, 4, 6),
                  depths=(2, 3, 4), resolutions=(8, 12), distill=False)
    g = torch.Generator().manual_seed(100 + rank)
    drawn = []
    for step in range(3):
        x, y = torch.randn(16, 1, 12, 12, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad(set_to_none=True)
        s = ofa_train_step(net, (x, y), None, phase, step_seed(0, 0, 0, step))
        average_gradients(net)
        opt.step()
        drawn.append([s["resolution"], s["subnets"]])
    params = torch.cat([p.detach().flatten() for p in net.parameters()])
    # 2) the trainer under torch.distributed: sharded data, rank 0 writes
    cfg = OFATrainConfig(space="ofa", width_mult=0.25, resolutions=(8, 12), epochs=1, steps_per_epoch=1, batch_size=16,
                         calib_images=32, phases=("depth-1",), eval_every_epoch=False, progress=False,
                         out=out, device="cpu")
    report = run_train(cfg, log=lambda *a: None)
    with open(os.path.join(os.path.dirname(out), f"rank{rank}.json"), "w") as f:
        json.dump({"drawn": drawn, "params": params.double().tolist(), "final": [r["acc"] for r in report["final"]],
                   "world": report["world_size"]}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_draw_the_same_subnets_and_keep_the_same_weights(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "run")), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["drawn"] == r1["drawn"]
    assert len({json.dumps(d) for d in r0["drawn"]}) == 3  # different steps draw differently
    assert r0["params"] == r1["params"]
    assert r0["final"] == r1["final"] and r0["world"] == 2
    assert json.loads((tmp_path / "run" / "report.json").read_text())["world_size"] == 2


def test_the_teacher_runs_without_dropout():
    """OFA's teacher has dropout_rate 0: in train mode (batch statistics) it gives the same soft
    targets twice for one batch, while the extracted subnet with its dropout 0.1 does not."""
    from pyengine.methods.ofa.train import _no_dropout

    torch.manual_seed(0)
    net = ofa_mbv3(4, 1, arch="ofa", width_mult=0.25)
    x = torch.randn(8, 1, 12, 12)
    plain = net.extract({}).train()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in plain.modules())
    with torch.no_grad():
        assert not torch.equal(plain(x), plain(x))
    teacher = _no_dropout(net.extract({})).train()
    with torch.no_grad():
        assert torch.equal(teacher(x), teacher(x))
