"""The generic runner through `pyengine prune` and the Python API: end to end, resume, run folders,
and the errors a careless or unlucky user meets."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from pyengine.cli import main
from pyengine.methods import Run, RunConfig, run
from pyengine.methods.options import OptionError
from pyengine.train.checkpoint import RunStateError

TINY = ["--image-size", "8", "--epochs", "1", "--rounds", "1", "--batch-size", "128", "--entropy-batches", "3",
        "--no-progress"]
quiet = dict(log=lambda *a: None)


def _cfg(tmp_path, **kw):
    base = dict(model="resnet18", dataset="digits", image_size=8, epochs=1, rounds=1, batch_size=128,
                out=str(tmp_path / "run"), no_progress=True, entropy_batches=3)
    base.update(kw)
    return RunConfig(**base)


def test_cli_tiny_end_to_end(tmp_path, capsys):
    from pyengine.train.checkpoint import load_model_export

    out = tmp_path / "cli"
    rc = main(["prune", "--model", "resnet18", *TINY, "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["sparsity"] > 0
    nets = report["networks"]
    assert nets["pruned"]["params_nonzero"] < nets["dense"]["params"]
    for name in ("dense", "pruned", "folded"):
        assert nets[name]["depth"] > 0 and nets[name]["macs"] > 0 and nets[name]["latency_ms_batch32"]["cpu"] > 0
    assert (out / "entropy_per_layer.png").stat().st_size > 1000
    assert (out / "accuracy_vs_sparsity.png").exists()
    text = capsys.readouterr().out
    assert "depth" in text and "folded" in text and "sparsity" in text
    # the exported network loads without executing code, from the base architecture + its edits
    model, masks, desc = load_model_export(out / "final")
    assert desc["preprocessing"]["image_size"] == 8 and len(desc["preprocessing"]["mean"]) == 1
    x = torch.randn(3, 1, 8, 8)
    assert model(x).shape == (3, 10)
    # a second run into the same folder without --resume is refused
    assert main(["prune", *TINY, "--out", str(out)]) == 2
    # the dense row counts the trained dense network's nonzero weights, not a fresh initialisation's
    assert nets["dense"]["params_nonzero"] == report["rounds"][0]["params_nonzero"]
    # what a run writes is readable as the umask allows, not owner-only (mkstemp's 0600)
    mask = os.umask(0)
    os.umask(mask)
    for f in ("report.json", "config.json", "state.pt", "final/model.safetensors", "final/model.json"):
        assert (out / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    capsys.readouterr()
    # a broken config.json: --resume takes the options from state.pt (the run is done: report again)
    (out / "config.json").write_text("{broken")
    assert main(["prune", "--out", str(out), "--resume"]) == 0
    # damaged files give one line naming them, never a traceback
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in ("model.json",):
        (cut / f).write_bytes((out / "final" / f).read_bytes())
    (cut / "model.safetensors").write_bytes((out / "final" / "model.safetensors").read_bytes()[:10000])
    (tmp_path / "empty.pt").write_bytes(b"")
    capsys.readouterr()
    for argv, msg in ((["export", str(cut)], "not a readable safetensors file"),
                      (["export", str(tmp_path / "nowhere")], "does not exist"),
                      (["prune", *TINY, "--weights", str(cut / "model.safetensors"), "--out", str(tmp_path / "w1")],
                       "--weights .* not a readable safetensors file"),
                      (["prune", *TINY, "--weights", str(tmp_path / "empty.pt"), "--out", str(tmp_path / "w2")],
                       "the file is empty")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(msg, err) and "Traceback" not in err, (argv, err)


def test_cli_bad_input(capsys, tmp_path):
    bad = [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--method", "imp", "--zeta", "0.3"], "--zeta"),
        (["--lr", "nan"], "--lr"),
        (["--image-size", "-4"], "--image-size"),
        (["--image-size", "0"], "--image-size"),
        (["--device", "foo"], "--device"),
        (["--finetune-epochs", "0"], "--finetune-epochs"),
        (["--entropy-batches", "0"], "--entropy-batches"),
        (["--rewind", "weights", "--rewind-epoch", "7", "--epochs", "2"], "--rewind-epoch"),
        (["--rewind-epoch", "1"], "--rewind weights"),
        (["--resume", "--out", str(tmp_path / "missing")], "no run to continue"),
    ]
    for argv, needle in bad:
        assert main(["prune", *argv, "--no-progress", "--out", str(tmp_path / "x")] if "--out" not in argv
                    else ["prune", *argv, "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit):
        main(["prune", "--method", "nope"])
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["prune", *TINY, "--out", str(f / "sub")]) == 2
    assert "afile" in capsys.readouterr().err


def test_options_are_one_declaration():
    from pyengine.methods.prune.egp import EGPConfig

    cfg = RunConfig(method="egp", options={"zeta": 0.25})
    cfg.validate()
    assert isinstance(cfg.options, EGPConfig) and cfg.options.zeta == 0.25
    saved = cfg.to_json()
    assert saved["options"]["zeta"] == 0.25 and saved["method"] == "egp"
    again = RunConfig.from_json(json.loads(json.dumps(saved)))
    again.validate()
    assert again.options == cfg.options
    with pytest.raises(OptionError, match="--zeta"):
        RunConfig(method="egp", options={"zeta": 0.0}).validate()
    with pytest.raises(OptionError, match="rate"):
        RunConfig(method="egp", options={"rate": 0.1}).validate()
    # the CLI builds the same object
    from pyengine.cli import build_parser, config_from_args

    args = build_parser().parse_args(["prune", "--zeta", "0.25"])
    assert config_from_args(args).to_json() == saved


def test_default_folders_differ_by_option():
    a = RunConfig().out_dir()
    assert a.as_posix() == "runs/resnet18-egp-digits"
    b = RunConfig(options={"zeta": 0.3}).out_dir()
    c = RunConfig(options={"zeta": 0.4}).out_dir()
    d = RunConfig(lr=0.05).out_dir()
    assert len({a, b, c, d}) == 4
    assert RunConfig(options={"zeta": 0.3}).out_dir() == b
    assert RunConfig(device="cpu", workers=0).out_dir() == a  # runtime-only options do not count
    assert RunConfig(epochs=3, batch_size=32).out_dir() == a  # the quick preset's own values
    # image folders whose paths sanitise to the same name still get folders of their own
    paths = ["imagefolder:/data/a/b", "imagefolder:/data/a_b", "imagefolder:/data/a:b"]
    dirs = {RunConfig(dataset=p).out_dir() for p in paths}
    assert len(dirs) == 3 and all(d.name.startswith("resnet18-egp-imagefolder__data_a_b-") for d in dirs)


def test_bad_options_are_named_before_anything_runs(tmp_path):
    for cfg, msg in ((RunConfig(seed=-1), "--seed"), (RunConfig(finetune_epochs=2), "--finetune-epochs only applies"),
                     (RunConfig(model_opts={"depth": 3}), r"model option\(s\) \['depth'\] do not apply to --model resnet18")):
        with pytest.raises(OptionError, match=msg):
            cfg.validate()


def test_resume_equals_uninterrupted(tmp_path):
    full = run(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "a")), **quiet)

    class Stop(Exception):
        pass

    def stop_at(rnd, ep):
        if (rnd, ep) == (1, 1):
            raise Stop

    with pytest.raises(Stop):
        run(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b")), on_epoch=stop_at, **quiet)
    # a kill between a metrics line and its checkpoint: an extra line and an orphan temporary file
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"seq": 999, "round": 1, "epoch": 2}) + "\n")
    (tmp_path / "b" / ".state.pt.abc.tmp").write_bytes(b"partial")
    resumed = run(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b"), resume=True), **quiet)
    assert resumed["final_acc"] == full["final_acc"]
    assert resumed["final_sparsity"] == full["final_sparsity"]
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k])
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    seqs = [x["seq"] for x in lines]
    assert seqs == sorted(set(seqs)) and 999 not in seqs
    assert len(lines) == len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    assert not list((tmp_path / "b").glob(".*.tmp"))
    # resuming a finished run keeps its wall time and rewrites the same report
    again = run(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b"), resume=True), **quiet)
    assert again["wall_seconds"] == resumed["wall_seconds"] > 0
    # changed options are refused, naming them
    with pytest.raises(OptionError, match="epochs"):
        run(_cfg(tmp_path, method="imp", epochs=3, out=str(tmp_path / "b"), resume=True), **quiet)
    with pytest.raises(OptionError, match="rate"):
        run(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b"), resume=True, options={"rate": 0.5}), **quiet)


def test_cli_resume_takes_saved_options(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert main(["prune", *TINY, "--method", "imp", "--rate", "0.3", "--rounds", "0", "--out", str(out)]) == 0
    capsys.readouterr()
    # the saved run's options are used; only the runtime flags are needed
    assert main(["prune", "--resume", "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["prune", "--resume", "--out", str(out), "--rate", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "options.rate: 0.3 -> 0.5" in err and "scope" not in err  # the one option that differs, not the dict
    # under torchrun every rank meets the same bad option: only rank 0 says so
    monkeypatch.setenv("RANK", "1")
    assert main(["prune", "--resume", "--out", str(out), "--rate", "0.5"]) == 2
    assert capsys.readouterr().err == ""


def test_run_folder_lock_and_stale_files(tmp_path):
    from pyengine.methods.runner import RunLock

    out = tmp_path / "locked"
    out.mkdir()
    lock = RunLock(out)
    lock.acquire()
    try:
        with pytest.raises(FileExistsError, match="in use"):
            run(_cfg(tmp_path, out=str(out)), **quiet)
    finally:
        lock.release()
    # a run killed before its first epoch leaves rewind.pt; a later, different run must not use it
    stale = tmp_path / "stale"
    stale.mkdir()
    torch.save({"init": {"bogus": torch.zeros(1)}}, stale / "rewind.pt")
    run(_cfg(tmp_path, out=str(stale), method="imp", rewind="weights", rounds=1, seed=1), **quiet)
    init = torch.load(stale / "rewind.pt", weights_only=True)["init"]
    assert "conv1.weight" in init and "bogus" not in init


@pytest.mark.parametrize("content", [b"", b"not a zip", "foreign"])
def test_bad_state_files_give_one_clear_error(tmp_path, capsys, content):
    out = tmp_path / "bad"
    out.mkdir()
    if content == "foreign":
        torch.save({"something": torch.zeros(2)}, out / "state.pt")
    else:
        (out / "state.pt").write_bytes(content)
    (out / "config.json").write_text(json.dumps({"model": "resnet18"}))
    with pytest.raises(RunStateError, match="state.pt"):
        run(_cfg(tmp_path, out=str(out), resume=True), **quiet)
    assert main(["prune", *TINY, "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "state.pt" in err and "Traceback" not in err


def test_full_disk_says_no_space(tmp_path, monkeypatch):
    import errno

    from pyengine import _io
    from pyengine.train import checkpoint

    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "fsync", full)
    with pytest.raises(OSError, match="no space left on device while writing .*x.pt"):
        checkpoint.atomic_torch_save({"a": torch.zeros(3)}, tmp_path / "x.pt")
    monkeypatch.setattr(_io.os, "fsync", real)
    assert not list(tmp_path.glob(".*.tmp"))


def test_diverging_loss_names_the_step(tmp_path, capsys):
    rc = main(["prune", *TINY, "--lr", "1e30", "--out", str(tmp_path / "div")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "step" in err and "epoch 1" in err and "--lr" in err and "Traceback" not in err


def test_log_is_one_line_per_epoch(tmp_path):
    lines = []
    run(_cfg(tmp_path, method="imp", epochs=2, rounds=0), log=lines.append)
    epoch_lines = [l for l in lines if "epoch" in l and "loss" in l]
    assert len(epoch_lines) == 2


def test_magnitude_one_shot_hits_target(tmp_path):
    rep = run(_cfg(tmp_path, method="magnitude", options={"sparsity": 0.8}, no_fold=True), **quiet)
    assert rep["final_sparsity"] == pytest.approx(0.8, abs=1e-6)


def test_egp_sparsity_is_stated_over_its_layers(tmp_path):
    rep = run(_cfg(tmp_path, method="egp", no_fold=True), **quiet)
    r = rep["rounds"][1]
    # EGP prunes the 17 producer layers only: the classifier and shortcuts stay dense
    names = {row["layer"] for row in r["layers"]}
    assert "fc.weight" not in names and len(names) == 17
    assert r["sparsity"] > r["sparsity_all_layers"] > 0


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pyengine", "prune", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--method", "--dataset", "--preset", "--rounds", "--sparsity", "--epochs", "--out", "--resume",
                 "--device", "--seed", "--zeta", "--rate", "--weights", "--no-fold"):
        assert flag in out.stdout


def test_weight_rewinding_restarts_from_epoch_k(tmp_path):
    from pyengine.models import build_model

    cfg = _cfg(tmp_path, method="imp", epochs=2, rewind="weights", rewind_epoch=1, no_fold=True)
    seen = {}

    def grab(rnd, ep):
        if (rnd, ep) == (0, 1):
            seen["rewind"] = torch.load(tmp_path / "run" / "rewind.pt", weights_only=True)
            seen["state"] = torch.load(tmp_path / "run" / "state.pt", weights_only=True)

    run(cfg, on_epoch=grab, **quiet)
    assert seen["rewind"]["epoch"] == 1
    for k, v in seen["state"]["model"].items():  # the weights after dense epoch 1
        assert torch.equal(seen["rewind"]["init"][k], v), k
    torch.manual_seed(0)
    init = build_model("resnet18", num_classes=10, in_channels=1, image_size=8).state_dict()
    assert not torch.equal(seen["rewind"]["init"]["conv1.weight"], init["conv1.weight"])
    # the schedule is rewound with the weights: round 1 trains the remaining epoch (2 of 2) at
    # the learning rate the dense run had in epoch 2, not the whole schedule again
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [(r["round"], r["epoch"], r["lr"]) for r in recs if "epoch" in r and "train_loss" in r]
    assert [(r, e) for r, e, _ in epochs] == [(0, 1), (0, 2), (1, 2)]
    assert epochs[2][2] == pytest.approx(epochs[1][2]) and epochs[1][2] != pytest.approx(epochs[0][2])
    for k in (5, 2):  # beyond the dense epochs, or at their end (nothing left to retrain)
        with pytest.raises(OptionError, match="--rewind-epoch .* must be below the 2 dense epochs"):
            Run(RunConfig(rewind="weights", rewind_epoch=k, epochs=2, out=str(tmp_path / "w")), **quiet).run()


def test_weights_start_from_a_local_file(tmp_path):
    from pyengine.models import build_model
    from pyengine.train.checkpoint import load_weights

    src = build_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    dst = build_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    load_weights(dst, tmp_path / "w.pt")
    assert torch.equal(dst.conv1.weight, src.conv1.weight)
    other = build_model("resnet18", num_classes=7, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"fc\.weight.*--reset-head"):
        load_weights(other, tmp_path / "w.pt")
    kept = load_weights(other, tmp_path / "w.pt", reset_head=True)
    assert kept == ["fc.weight", "fc.bias"] and torch.equal(other.conv1.weight, src.conv1.weight)
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv1.weight'\].*unexpected keys \['extra.weight'\]"):
        load_weights(dst, tmp_path / "bad.pt")
    # through the runner: the run starts from those weights
    r = Run(_cfg(tmp_path, weights=str(tmp_path / "w.pt"), rounds=0, out=str(tmp_path / "wr")), **quiet)
    r._setup()
    assert torch.equal(r.model.conv1.weight.cpu(), src.conv1.weight)


def test_resume_after_an_edit_equals_uninterrupted(tmp_path):
    """A method that changes the structure during the run (linearises one activation per round):
    a run killed after the edit is rebuilt from the base architecture plus the edit history."""
    from dataclasses import dataclass

    from pyengine.graph import Edit
    from pyengine.methods.base import METHODS, Method, register

    @dataclass
    class NoOptions:
        pass

    class LineariseFirst(Method):
        name = "test-linearise-first"
        Options = NoOptions
        uses_rewind = False
        default_rounds = {"*": 2}

        def act(self, summary):
            name = self.run.sites[0].name
            return {"edits": self.run.edit([Edit("linearise", name)])}

    register(LineariseFirst)
    try:
        kw = dict(method="test-linearise-first", epochs=2, rounds=2, no_fold=True)
        full = run(_cfg(tmp_path, out=str(tmp_path / "a"), **kw), **quiet)

        class Stop(Exception):
            pass

        def stop_at(rnd, ep):
            if (rnd, ep) == (2, 1):
                raise Stop

        with pytest.raises(Stop):
            run(_cfg(tmp_path, out=str(tmp_path / "b"), **kw), on_epoch=stop_at, **quiet)
        resumed = run(_cfg(tmp_path, out=str(tmp_path / "b"), resume=True, **kw), **quiet)
        assert [e["target"] for e in resumed["edits"]] == ["relu", "layer1.0.relu1"]
        assert resumed["rounds"][-1]["activations"] == 15
        a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), k
        assert resumed["final_acc"] == full["final_acc"]
    finally:
        METHODS.pop("test-linearise-first", None)


def test_paper_preset_uses_the_published_defaults(tmp_path):
    r = Run(RunConfig(preset="paper", out=str(tmp_path / "p"), image_size=8, epochs=1, device="cpu"), **quiet)
    r._setup()
    assert r.n_rounds() == 9  # EGP, ResNet-18 / CIFAR-10 (issue 7, methods.md section 2)
    assert isinstance(r.model.maxpool, torch.nn.MaxPool2d)  # the authors' CIFAR ResNet-18 keeps it
    q = Run(RunConfig(out=str(tmp_path / "q"), image_size=8, epochs=1), **quiet)
    q._setup()
    assert q.n_rounds() == 3 and isinstance(q.model.maxpool, torch.nn.Identity)



def test_other_presets_carry_the_published_settings(tmp_path):
    """IMP's 34 rounds (the SDD protocol), EGP's 4 rounds for Swin-T, the authors' MobileNetV2
    dropout 0.2, and SDD_ViT's batch 512 with dropout 0.1 - through the runner, not only the sweep."""
    def setup(name, **kw):
        r = Run(RunConfig(out=str(tmp_path / name), image_size=8, epochs=1, device="cpu", **kw), **quiet)
        r._setup()
        return r

    assert setup("imp", preset="paper", method="imp").n_rounds() == 34
    assert setup("egp-swin", preset="swin").n_rounds() == 4
    mb = setup("mb", preset="paper", model="mobilenet_v2")
    assert [m.p for m in mb.model.modules() if isinstance(m, torch.nn.Dropout)] == [0.2]
    v = setup("vit", preset="vit", model="vit", method="imp")
    assert v.train_cfg.batch_size == 512 and v.n_rounds() == 34
    assert {m.p for m in v.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


@pytest.mark.parametrize("main_rank", [True, False])
def test_only_the_main_rank_cleans_the_run_folder(tmp_path, main_rank):
    """Under DDP every rank starts the run; a non-main rank that swept the folder deleted the main
    rank's temporary config file between its write and its rename (a CI failure of test_ddp)."""
    r = Run(_cfg(tmp_path), **quiet)
    r.out.mkdir(parents=True)
    r.main = main_rank
    tmp = r.out / ".config.json.abc.tmp"
    tmp.write_text("{}")
    (r.out / "metrics.jsonl").write_text("")
    r._clean_folder(fresh=True)
    assert tmp.exists() != main_rank
    assert (r.out / "metrics.jsonl").exists() != main_rank


@pytest.mark.parametrize("method", ["easier", "nepenthe", "lacoot"])
@pytest.mark.parametrize("rewind", ["weights", "reinit"])
def test_weight_rewinding_is_refused_by_methods_that_go_on_from_current_weights(tmp_path, method, rewind):
    """EASIER and LaCoOT used to ignore --rewind weights silently while NEPENTHE refused it: every
    method whose rounds do not restart from earlier weights now refuses it up front, by name."""
    with pytest.raises(OptionError, match=f"--rewind {rewind} cannot be used with --method {method}"):
        _cfg(tmp_path, method=method, rewind=rewind).validate()
    _cfg(tmp_path, method=method, rewind="finetune").validate()
    _cfg(tmp_path, method="imp", rewind=rewind).validate()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_data_warning_is_said_once_under_torchrun(tmp_path, monkeypatch, rank):
    """Every rank builds the same dataset and meets the same unreadable image: only rank 0 says so
    (two ranks used to print the same warning twice)."""
    import warnings

    from PIL import Image

    for c in ("a", "b"):
        for i in range(4):
            p = tmp_path / "imgs" / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(p)
    (tmp_path / "imgs" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    monkeypatch.setenv("RANK", rank)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # a missing --weights file stops the run right after the dataset is built
        rc = main(["prune", "--model", "resnet18", "--dataset", f"imagefolder:{tmp_path / 'imgs'}", *TINY,
                   "--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "run")])
    assert rc == 2
    said = [w for w in seen if "broken.png" in str(w.message)]
    assert len(said) == (1 if rank == "0" else 0), [str(w.message) for w in seen]


@pytest.mark.usefixtures("one_thread")
def test_no_fold_summary_names_the_methods_own_edits(tmp_path, monkeypatch):
    # with --no-fold the summary said "the network keeps its dense shape" even when LaCoOT had
    # removed blocks (or EASIER linearised activations): the exported network was not dense
    import functools

    import pyengine.graph as g
    from pyengine.train.checkpoint import load_model_export

    monkeypatch.setattr(g, "measure_latency", functools.partial(g.measure_latency, warmup=1, min_run_time=0.02))
    lines = []
    rep = run(_cfg(tmp_path, method="lacoot", rounds=0, model_opts={"width": 8}, no_fold=True,
                   options={"remove_blocks": 2, "directions": 4}), log=lines.append)
    text = "\n".join(lines)
    model, _, _ = load_model_export(tmp_path / "run" / "final")
    names = {n for n, _ in model.named_modules()}
    removed = [b for b in ("layer1.1", "layer2.1", "layer3.1", "layer4.1") if f"{b}.conv1" not in names]
    assert len(removed) == 2  # the reference: the exported network itself
    assert "keeps its dense shape" not in text
    assert "no exact folds; the method's own edits are kept (2 replace_block)" in text
    assert [e["kind"] for e in rep["edits"]] == ["replace_block"] * 2
