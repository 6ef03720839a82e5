import json
import subprocess
import sys

import pytest
import torch

from pyengine.cli import main
from pyengine.methods.prune_run import PruneConfig, run_prune
from pyengine.train.checkpoint import load_model_export


def _cfg(tmp_path, **kw):
    base = dict(model="resnet18", dataset="digits", image_size=8, epochs=1, rounds=1, batch_size=128,
                out=str(tmp_path / "run"), progress=False, entropy_batches=3)
    base.update(kw)
    return PruneConfig(**base)


def test_cli_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["prune", "--model", "resnet18", "--image-size", "8", "--epochs", "1", "--rounds", "1",
               "--batch-size", "128", "--entropy-batches", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["sparsity"] > 0
    assert report["params"]["effective"] < report["params"]["dense"]
    assert (out / "entropy_per_layer.png").stat().st_size > 1000
    assert (out / "accuracy_vs_sparsity.png").exists()
    text = capsys.readouterr().out
    assert "accuracy" in text and "sparsity" in text
    # the exported model loads without executing code and carries the masks
    model, masks, desc = load_model_export(out / "final")
    for name, m in masks.items():
        w = model.get_submodule(name.rsplit(".", 1)[0]).weight
        assert (w[~m] == 0).all()
    assert desc["sparsity"] == pytest.approx(report["final_sparsity"])
    # a second run into the same folder without --resume is refused
    assert main(["prune", "--image-size", "8", "--epochs", "1", "--rounds", "1", "--out", str(out), "--no-progress"]) == 2


def test_cli_bad_input(capsys):
    assert main(["prune", "--sparsity", "1.5", "--no-progress"]) == 2
    assert "--sparsity" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--method", "nope"])


def test_resume_equals_uninterrupted(tmp_path):
    full = run_prune(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "a")), log=lambda *a: None)

    class Stop(Exception):
        pass

    def stop_at(rnd, ep):
        if (rnd, ep) == (1, 1):
            raise Stop

    with pytest.raises(Stop):
        run_prune(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b")), on_epoch=stop_at, log=lambda *a: None)
    resumed = run_prune(_cfg(tmp_path, method="imp", epochs=2, out=str(tmp_path / "b"), resume=True), log=lambda *a: None)
    assert resumed["final_acc"] == full["final_acc"]
    assert resumed["final_sparsity"] == full["final_sparsity"]
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k])


def test_magnitude_one_shot_hits_target(tmp_path):
    rep = run_prune(_cfg(tmp_path, method="magnitude", sparsity=0.8), log=lambda *a: None)
    assert rep["final_sparsity"] == pytest.approx(0.8, abs=1e-6)


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "pyengine", "prune", "--help"], capture_output=True, text=True, check=True)
    for flag in ("--method", "--dataset", "--preset", "--rounds", "--sparsity", "--epochs", "--out", "--resume", "--device", "--seed"):
        assert flag in out.stdout


def test_weight_rewinding_restarts_from_epoch_k(tmp_path):
    from pyengine.models import build_model

    cfg = _cfg(tmp_path, method="imp", epochs=2, rewind="weights", rewind_epoch=1)
    seen = {}

    def grab(rnd, ep):
        if (rnd, ep) == (0, 1):
            seen["rewind"] = torch.load(tmp_path / "run" / "rewind.pt", weights_only=True)
            seen["state"] = torch.load(tmp_path / "run" / "state.pt", weights_only=True)

    run_prune(cfg, on_epoch=grab, log=lambda *a: None)
    assert seen["rewind"]["epoch"] == 1
    for k, v in seen["state"]["model"].items():  # the weights after dense epoch 1
        assert torch.equal(seen["rewind"]["init"][k], v), k
    torch.manual_seed(0)
    init = build_model("resnet18", num_classes=10, in_channels=1, image_size=8).state_dict()
    assert not torch.equal(seen["rewind"]["init"]["conv1.weight"], init["conv1.weight"])
    with pytest.raises(ValueError, match="rewind-epoch"):
        PruneConfig(rewind_epoch=5, epochs=2).validate()
