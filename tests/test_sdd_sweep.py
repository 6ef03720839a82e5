"""`pyengine sdd` sweeps on tiny settings: the sparsity schedule and the recorded curves, grid
bookkeeping, the dense network reused exactly, a killed sweep resumed to the same curves, worker
claims, and the command line."""
import json

import pytest
import torch

from pyengine.cli import main
from pyengine.methods import Run, RunConfig
from pyengine.methods.options import OptionError
from pyengine.methods.sdd import Sweep, read_curve, run_status
from pyengine.methods.runner import FileLock
from pyengine.methods.sdd.sweep import _worker_main, config_key

quiet = dict(log=lambda *a: None)
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: extra threads only wait for each other
# a 2-block VGG-like net of width 2 on 8x8 digits: a run (dense, 2 rounds) takes a few seconds here
TINY = dict(model="vgglike", dataset="digits", image_size=8, epochs=1, rounds=2, batch_size=256, no_progress=True,
            entropy_batches=2, model_opts={"depth": 2, "width": 2}, device="cpu")
OPTIONS = {"rate": 0.3, "entropy": True, "kd_teacher": "dense"}
GRID = {"noise_grid": [0.0, 0.2]}


def _base(out, **kw):
    d = dict(TINY, out=str(out), options=dict(OPTIONS))
    d.update(kw)
    return RunConfig(**d)


@pytest.fixture(scope="module")
def full(tmp_path_factory, one_thread):
    """One uninterrupted sweep: noise 0 and 0.2, vanilla and KD (teacher: each dense network)."""
    out = tmp_path_factory.mktemp("sdd") / "full"
    summary = Sweep(_base(out), GRID, **quiet).run()
    return out, summary


def test_sweep_records_the_schedule_and_the_curves(full):
    out, summary = full
    names = [r["name"] for r in summary["runs"]]
    assert names == ["noise0_wd0.0005_seed0-vanilla", "noise0_wd0.0005_seed0-kd",
                     "noise0.2_wd0.0005_seed0-vanilla", "noise0.2_wd0.0005_seed0-kd"]
    for name in names:
        rows = read_curve(out / "curves" / f"{name}.csv")
        assert [r["round"] for r in rows] == [0, 1, 2]
        n = rows[0]["total"]
        for i, r in enumerate(rows):  # 1 - (1 - r)^i, to the nearest weight
            assert r["kept"] == round(n * 0.7 ** i)
            assert abs(r["sparsity"] - (1 - 0.7 ** i)) <= 0.5 / n
            assert r["target_sparsity"] == pytest.approx(1 - 0.7 ** i)
            for k in ("test_acc", "test_loss", "train_acc", "train_loss", "train_clean_acc", "train_clean_loss",
                      "entropy_mean"):
                assert r[k] is not None and r[k] == r[k], (name, k)
            assert 0 <= r["entropy_mean"] <= 1 and sum(1 for k in r if k.startswith("H:")) == 4
        if "noise0_" in name:  # without noise the clean and the trained-on labels are the same
            assert all(r["train_acc"] == r["train_clean_acc"] for r in rows)
        else:
            assert any(r["train_acc"] != r["train_clean_acc"] for r in rows)
        js = json.loads((out / "curves" / f"{name}.json").read_text())
        assert js["meta"]["kind"] in ("vanilla", "kd") and "test_acc" in js["analysis"]
    # the KD student is its own network (trained with distillation from the start), not the dense one
    v = read_curve(out / "curves" / f"{names[0]}.csv")
    k = read_curve(out / "curves" / f"{names[1]}.csv")
    assert v[0]["test_loss"] != k[0]["test_loss"]
    # dense runs stop after round 0; the vanilla run starts from that very network
    dense = json.loads((out / "dense" / "noise0_wd0.0005_seed0" / "report.json").read_text())
    assert len(dense["rounds"]) == 1 and dense["rounds"][0]["test_loss"] == v[0]["test_loss"]
    cfg = json.loads((out / "runs" / names[1] / "config.json").read_text())
    assert cfg["options"]["kd_teacher"].endswith("dense/noise0_wd0.0005_seed0/final")
    for p in ("accuracy_noise0_seed0.png", "accuracy_noise0.2_seed0.png", "entropy_noise0.2_seed0.png",
              "noise_wd0.0005_seed0_vanilla.png", "noise_wd0.0005_seed0_kd.png"):
        assert (out / "plots" / p).stat().st_size > 5000, p
    assert json.loads((out / "summary.json").read_text())["runs"][0]["name"] == names[0]


def test_dense_reuse_equals_a_plain_run(full, tmp_path):
    """Seeding the vanilla run with the dense run's state gives what one uninterrupted run gives."""
    out, _ = full
    cfg = RunConfig(**dict(TINY, out=str(tmp_path / "plain"), method="sdd", noise=0.2, weight_decay=5e-4,
                           no_fold=True, options={"rate": 0.3, "entropy": True}))
    rep = Run(cfg, **quiet).run()
    rows = read_curve(out / "curves" / "noise0.2_wd0.0005_seed0-vanilla.csv")
    assert [r["test_acc"] for r in rep["rounds"]] == [r["test_acc"] for r in rows]
    assert [r["train_loss"] for r in rep["rounds"]] == pytest.approx([r["train_loss"] for r in rows], rel=1e-9)
    a = torch.load(tmp_path / "plain" / "state.pt", weights_only=True)["model"]
    b = torch.load(out / "runs" / "noise0.2_wd0.0005_seed0-vanilla" / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_sweep_resumes_to_the_same_curves(full, tmp_path):
    ref, summary = full
    out = tmp_path / "killed"

    class Kill(Exception):
        pass


    def kill(name, rnd, ep):

        if name == "noise0_wd0.0005_seed0-vanilla" and rnd == 1:  # in the middle of the second run
            raise Kill

    with pytest.raises(Kill):
        Sweep(_base(out), GRID, on_epoch=kill, **quiet).run()
    st = Sweep(_base(out, resume=True), GRID, **quiet).status()
    assert st["noise0_wd0.0005_seed0-dense"] == "done" and st["noise0_wd0.0005_seed0-vanilla"] == "partial"
    assert st["noise0.2_wd0.0005_seed0-dense"] == "new"
    with pytest.raises(FileExistsError, match="--resume"):
        Sweep(_base(out), GRID, **quiet).run()
    resumed = []
    Sweep(_base(out, resume=True), GRID, on_epoch=lambda n, r, e: resumed.append((n, r, e)), **quiet).run()
    # the dense run is not trained again, and the interrupted run restarts after its last epoch
    assert not any(n == "noise0_wd0.0005_seed0-dense" for n, _, _ in resumed)
    assert [(r, e) for n, r, e in resumed if n == "noise0_wd0.0005_seed0-vanilla"] == [(2, 1)]
    for r in summary["runs"]:
        a = read_curve(ref / "curves" / f"{r['name']}.csv")
        b = read_curve(out / "curves" / f"{r['name']}.csv")
        assert a == b, r["name"]


def test_grid_bookkeeping(tmp_path):
    base = _base(tmp_path / "g", rounds=1)
    grid = {"noise_grid": [0.0, 0.1], "weight_decay_grid": [0.0, 5e-4], "seeds": [0, 1], "width_grid": [2, 4]}
    s = Sweep(base, grid, **quiet)
    assert len(s.configs) == 16 and len(s.run_names()) == 32 and len(set(s.run_names())) == 32
    c = s.configs[0]
    assert c["key"] == "noise0_wd0_seed0_width2" == config_key(c)
    assert [k for _, k in c["runs"]] == ["vanilla", "kd"]
    dense, van, kd = (s.config_for(c, k) for k in ("dense", "vanilla", "kd"))
    assert dense.rounds == 0 and van.rounds == 1 and dense.no_fold and van.method == "sdd"
    assert dense.model_opts == {"depth": 2, "width": 2} and van.weight_decay == 0.0 and van.noise == 0.0
    assert dense.options.kd_teacher is None and van.options.kd_teacher is None
    assert kd.options.kd_teacher == str((s.dense_dir(c) / "final").resolve())
    assert s.config_for(s.configs[-1], "vanilla").model_opts["width"] == 4
    # status from the folders: finished = report and export written; partial = a state to resume
    assert set(s.status().values()) == {"new"}
    d = s.run_dir(c["runs"][0][0])
    (d / "final").mkdir(parents=True)
    (d / "state.pt").write_bytes(b"x")
    assert run_status(d) == "partial"
    (d / "report.json").write_text("{}")
    (d / "final" / "model.json").write_text("{}")
    assert run_status(d) == "done" and s.status()[c["runs"][0][0]] == "done"
    # sweep.json: a second start needs --resume, a resume needs the same grid
    s._write_spec()
    with pytest.raises(FileExistsError):
        Sweep(base, grid, **quiet)._write_spec()
    with pytest.raises(OptionError, match="grid.seed"):
        Sweep(_base(tmp_path / "g", rounds=1, resume=True), {**grid, "seeds": [0, 2]}, **quiet)._write_spec()
    with pytest.raises(OptionError, match="rounds"):
        Sweep(_base(tmp_path / "g", rounds=2, resume=True), grid, **quiet)._write_spec()
    Sweep(_base(tmp_path / "g", rounds=1, resume=True, device="cuda"), grid, **quiet)._write_spec()  # runtime-only
    with pytest.raises(FileNotFoundError, match="no sweep"):
        Sweep(_base(tmp_path / "none", resume=True), grid, **quiet)._write_spec()
    with pytest.raises(OptionError, match="twice"):
        Sweep(base, {"seeds": [1, 1]}, **quiet)
    for bad, needle in (({"devices": ["gpu0"]}, "--devices"), ({"noise_grid": [1.5]}, "--noise-grid"),
                        ({"seeds": []}, "--seeds"), ({"seeds": [-1]}, "--seeds"), ({"width_grid": [0]}, "--width-grid")):
        with pytest.raises(OptionError, match=needle):
            Sweep(base, bad, **quiet)
    # no teacher: vanilla runs only; a saved sweep is rebuilt as its workers do
    s2 = Sweep(_base(tmp_path / "g2", options={"rate": 0.3}), {"seeds": [3]}, **quiet)
    assert s2.run_names() == ["noise0_wd0.0005_seed3-vanilla"]
    s2._write_spec()
    again = Sweep.from_folder(tmp_path / "g2", **quiet)
    assert again.spec() == s2.spec() and again.run_names() == s2.run_names()
    # a sweep that never reached a checkpoint (g2 holds only its spec) is taken over by a fresh one
    Sweep(_base(tmp_path / "g2", options={"rate": 0.3}), {"seeds": [4]}, **quiet)._write_spec()
    assert Sweep.from_folder(tmp_path / "g2", **quiet).run_names() == ["noise0_wd0.0005_seed4-vanilla"]


def test_workers_take_unclaimed_configurations(tmp_path):
    """What each worker process runs (--devices): configurations nobody else holds."""
    out = tmp_path / "w"
    s = Sweep(_base(out, rounds=1, options={"rate": 0.3}), {"seeds": [0, 1]}, **quiet)
    s._write_spec()
    held = FileLock(out / "claims" / f"{s.configs[0]['key']}.lock")  # another worker is busy with it
    assert held.try_acquire()
    try:
        assert s.work("cpu") == [s.configs[1]["key"]]
    finally:
        held.release()
    st = s.status()
    assert st[s.configs[0]["runs"][0][0]] == "new" and st[s.configs[1]["runs"][0][0]] == "done"
    # the worker entry point (what `--devices` starts in each process) finishes the rest
    assert _worker_main(["worker", str(out), "--device", "cpu"]) == 0
    assert set(s.status().values()) == {"done"}


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["sdd", "--model", "vgglike", "--depth", "2", "--width-grid", "2", "--image-size", "8", "--epochs", "1",
            "--rounds", "1", "--batch-size", "256", "--noise", "0.2", "--no-progress", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "noise0.2_wd0.0005_seed0_width2-vanilla" in text and "dense %" in text
    assert (out / "curves" / "noise0.2_wd0.0005_seed0_width2-vanilla.csv").exists()
    # resuming takes the saved options; a changed grid is refused, naming it
    assert main(["sdd", "--resume", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sdd", "--resume", "--out", str(out), "--seeds", "0,1"]) == 2
    assert "grid.seed" in capsys.readouterr().err
    for extra, needle in ((["--kd-alpha", "2"], "--kd-alpha"), (["--devices", "gpu"], "--devices"),
                          (["--weight-decay-grid", "-1"], "--weight-decay-grid"), (["--depth", "0"], "--depth"),
                          (["--kd-temperature", "0"], "--kd-temperature")):
        assert main(["sdd", *extra, "--out", str(tmp_path / "bad")]) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (extra, err)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_workers_end_with_a_killed_sweep(tmp_path, sig):
    """A sweep spread over worker processes (--devices cpu,cpu) that is killed - SIGTERM from `kill` or a
    scheduler, even SIGKILL - must not leave its workers training on, holding their claims, behind a
    sweep the user believes stopped (a resumed sweep would find every configuration claimed)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    argv = ["sdd", "--model", "vgglike", "--depth", "2", "--width-grid", "2", "--image-size", "8", "--epochs", "500",
            "--rounds", "1", "--batch-size", "256", "--noise-grid", "0,0.2", "--no-progress", "--device", "cpu",
            "--devices", "cpu,cpu", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-m", "pyengine", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env)
    pids, seen = [], ""
    try:
        deadline = time.time() + 120
        while len(pids) < 2 and time.time() < deadline:
            line = parent.stdout.readline()
            seen += line
            pids += [int(p) for p in re.findall(r"\(pid (\d+)\)", line)]
        assert len(pids) == 2, seen
        while time.time() < deadline and not list(out.glob("claims/*.lock")):
            time.sleep(0.2)
        time.sleep(1.0)  # the workers are importing or training now
        parent.send_signal(getattr(signal, sig))
        parent.wait(timeout=60)

        def alive(pid):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    return f.read().split(") ")[1][0] != "Z"
            except FileNotFoundError:
                return False

        deadline = time.time() + 15  # the workers' 500 epochs would take minutes
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
        assert not any(alive(p) for p in pids), f"workers {pids} outlived the sweep killed by {sig}"
    finally:
        for p in pids:  # only the workers this test's sweep started
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_human_labels_with_label_noise_in_the_grid_is_refused_up_front(tmp_path):
    """--human-labels needs --noise 0: a grid with noise used to train every noise-free configuration
    (dense, vanilla, KD) before its first noisy one failed."""
    labels = tmp_path / "labels.json"
    labels.write_text("[0, 1]")
    with pytest.raises(OptionError, match="--human-labels .* --noise 0"):
        Sweep(_base(tmp_path / "s", options={"human_labels": str(labels)}), {"noise_grid": [0.0, 0.2]}, **quiet)
    assert not (tmp_path / "s").exists()
    Sweep(_base(tmp_path / "s", options={"human_labels": str(labels)}), {"seeds": [0, 1]}, **quiet)  # noise 0: fine


def test_download_happens_once_before_the_workers_start(tmp_path, monkeypatch):
    """--download with --devices: every worker downloading into one folder at once corrupts the
    files, so the sweep fetches the dataset itself before it starts them."""
    import pyengine.data as data

    order = []
    real = data.build_dataset

    def build(name, *a, **kw):
        order.append(("fetch", name, kw.get("download")))
        return real(name, *a, **kw)

    monkeypatch.setattr(data, "build_dataset", build)
    monkeypatch.setattr(Sweep, "_spawn", lambda self, devices: order.append(("spawn", tuple(devices))))
    sweep = Sweep(_base(tmp_path / "s", download=True), {"devices": ["cpu", "cpu"]}, **quiet)
    with pytest.raises(RuntimeError, match="runs not finished"):  # the stand-in workers ran nothing
        sweep.run()
    assert order == [("fetch", "digits", True), ("spawn", ("cpu", "cpu"))]
    order.clear()
    sweep = Sweep(_base(tmp_path / "t"), {"devices": ["cpu", "cpu"]}, **quiet)
    with pytest.raises(RuntimeError, match="runs not finished"):
        sweep.run()
    assert order == [("spawn", ("cpu", "cpu"))]  # nothing to fetch without --download
