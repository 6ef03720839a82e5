"""`pyengine ofa train|search|extract` end to end on tiny settings (digits, 8-12 px, one step per phase)."""
import json

import pytest
import torch

from pyengine.methods.ofa.command import main as ofa_main
from pyengine.methods.ofa.search import load_extracted
from pyengine.methods.ofa.train import Resized, load_supernet, recalibrate_bn

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--width-mult", "0.25", "--resolutions", "8,12", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "16",
        "--calib-images", "32", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ofa")
    assert ofa_main(["ofa", "train", "--space", "moofa", "--out", str(root / "moofa"), *TINY]) == 0
    assert ofa_main(["ofa", "train", "--space", "ofa", "--phases", "full,kernel", "--out", str(root / "ofa"), *TINY]) == 0
    return root


def test_train_writes_report_metrics_and_supernet(runs, capsys):
    rep = json.loads((runs / "moofa" / "report.json").read_text())
    assert [p["name"] for p in rep["phases"]] == ["full", "kernel", "depth-1", "depth-2", "expand-1", "expand-2"]
    assert [h["phase"] for h in rep["history"]] == [p["name"] for p in rep["phases"]]
    assert len(rep["final"]) == 6 and all(0 <= r["acc"] <= 100 for r in rep["final"])
    peaks = [r["peak_memory"] for r in rep["final"]]
    assert peaks[0] > peaks[-1]  # the largest subnet needs more memory than the smallest
    lines = (runs / "moofa" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and "eval" in json.loads(lines[-1])
    net, space, desc = load_supernet(runs / "moofa")
    assert space.name == "moofa" and space.resolutions == (8, 12) and desc["dataset"]["name"] == "digits"
    assert json.loads((runs / "ofa" / "report.json").read_text())["space"]["name"] == "ofa"
    # a finished run resumed again: nothing retrained, the report rewritten
    assert ofa_main(["ofa", "train", "--space", "ofa", "--phases", "full,kernel", "--out", str(runs / "ofa"), "--resume",
                     *TINY]) == 0
    assert "already complete" in capsys.readouterr().out
    assert ofa_main(["ofa", "train", "--space", "ofa", "--out", str(runs / "ofa"), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert ofa_main(["ofa", "train", "--width-mult", "-1", "--out", str(runs / "x")]) == 2
    assert "--width-mult" in capsys.readouterr().err


def test_search_compares_both_spaces(runs, capsys):
    out = runs / "search"
    args = ["ofa", "search", "--run", str(runs / "ofa"), "--run", str(runs / "moofa"), "--budgets", "9000,20000,60000",
            "--samples", "10", "--predictor-epochs", "3", "--population", "8", "--generations", "3", "--out", str(out),
            "--no-progress"]
    assert ofa_main(args) == 0
    text = capsys.readouterr().out
    rec = json.loads((out / "search.json").read_text())
    rows = rec["results"]
    assert {r["space"] for r in rows} == {"ofa", "moofa"}
    for r in rows:
        assert r["peak_memory"] <= r["budget"] and 0 <= r["test_acc"] <= 100
    # 9000 elements is below the smallest MOOFA subnet: reported, not searched
    assert not [r for r in rows if r["space"] == "moofa" and r["budget"] == 9000]
    assert "below the smallest subnet" in text
    assert (out / "accuracy_vs_peak_memory.png").stat().st_size > 1000
    assert "OFA test acc" in (out / "search.md").read_text()
    assert len((out / "accuracy_data_moofa.jsonl").read_text().splitlines()) == 10
    assert set(rec["predictors"]) == {"ofa", "moofa"}


def test_extract_writes_a_standalone_network(runs, capsys):
    out = runs / "net"
    assert ofa_main(["ofa", "extract", "--run", str(runs / "moofa"), "--kernel", "5", "--expand", "3", "--depth", "3",
                     "--resolution", "8", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "peak memory:" in text and "test accuracy" in text
    net, desc = load_extracted(out)
    assert desc["resolution"] == 8 and desc["bn_recalibrated"] and desc["cuda_peak"] is None
    assert len(net.blocks) == 1 + 5 * 3
    # the same subnet taken from the supernet, recalibrated the same way, computes the same
    sup, space, _ = load_supernet(runs / "moofa")
    from pyengine.methods.ofa.search import RunContext

    ctx = RunContext(runs / "moofa", torch.device("cpu"))
    sup.set_active(space.uniform(5, 3, 3, 8))
    recalibrate_bn(sup, ctx.calib_loader, torch.device("cpu"), 8)
    sup.eval()
    x = next(iter(ctx.loaders.test))[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(Resized(net, 8)(x), Resized(sup, 8)(x), rtol=1e-5, atol=1e-5)
    # bad input
    assert ofa_main(["ofa", "extract", "--run", str(runs / "moofa"), "--arch", '{"ks": 4}', "--out", str(out)]) == 2
    assert "'ks'" in capsys.readouterr().err
    assert ofa_main(["ofa", "extract", "--run", str(runs / "nothing"), "--out", str(out)]) == 2
    assert "no trained supernet" in capsys.readouterr().err
