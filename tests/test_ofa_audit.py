"""`pyengine ofa` fixes from a user audit: the run folder's lock, --resume with the saved options,
values refused up front, quiet logs, one-element subnet lists, exportable extracts, budgets no
subnet meets. Tiny settings throughout (digits, 8-12 px, one or two steps per phase)."""
import json
import os

import pytest

from pyengine.methods.ofa.command import main as ofa_main
from pyengine.methods.ofa.train import OFATrainConfig, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(space="moofa", width_mult=0.25, resolutions=(8, 12), dataset="digits", epochs=1, steps_per_epoch=1,
            batch_size=16, calib_images=32, progress=False)


def _cfg(out, **kw):
    return OFATrainConfig(**{**TINY, "out": str(out), **kw})


def _quiet(*_a):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ofa_audit") / "moofa"
    run_train(_cfg(out, phases=("full", "kernel"), eval_every_epoch=False), log=_quiet)
    return out


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------ 1. the folder lock


def test_train_locks_its_folder(tmp_path, capsys):
    from pyengine.methods.runner import RunLock

    out = tmp_path / "locked"
    other = RunLock(out)
    other.acquire()  # another run holds the folder
    try:
        with pytest.raises(FileExistsError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            run_train(_cfg(out), log=_quiet)
        assert ofa_main(["ofa", "train", "--out", str(out), "--width-mult", "0.25", "--resolutions", "8,12", "--epochs", "1",
                         "--steps-per-epoch", "1", "--phases", "full", "--calib-images", "32", "--no-progress"]) == 2
        assert "in use by another run" in _one_line(capsys.readouterr().err)
    finally:
        other.release()
    assert not (out / "state.pt").exists()  # nothing was trained into it
    # released on an error, and at the end of a run
    with pytest.raises(Exception):
        run_train(_cfg(out, dataset="imagefolder:" + str(tmp_path / "no-such-folder")), log=_quiet)
    probe = RunLock(out)
    assert probe.try_acquire()
    probe.release()


# ------------------------------------------------------------------------------ 3. --resume


def test_resume_takes_the_saved_options_and_names_every_difference(tmp_path, capsys):
    out = tmp_path / "cut"

    class Kill(Exception):
        pass

    def on_epoch(phase, epoch):
        raise Kill

    with pytest.raises(Kill):  # `ofa train --space moofa --width-mult 0.25 ...` interrupted after one epoch
        run_train(_cfg(out, phases=("full", "kernel"), eval_every_epoch=False, final_eval=False), on_epoch=on_epoch,
                  log=_quiet)
    # options given that differ from the saved run: refused, each named, before anything is built
    assert ofa_main(["ofa", "train", "--out", str(out), "--resume", "--width-mult", "0.5", "--space", "ofa",
                     "--calib-images", "64"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--width-mult: 0.25 -> 0.5" in err and "--space: 'moofa' -> 'ofa'" in err and "--calib-images: 32 -> 64" in err
    # options left out come from the saved run; the same value given again is fine
    assert ofa_main(["ofa", "train", "--out", str(out), "--resume", "--seed", "0"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["width_mult"] == 0.25 and rep["config"]["space"] == "moofa"
    assert [h["phase"] for h in rep["history"]] == ["full", "kernel"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["phase"] for ln in lines] == ["full", "kernel"]


# ------------------------------------------------------------------------------ 4. values checked up front


@pytest.mark.parametrize("argv,flag", [
    (["train", "--lr-scale", "nan"], "--lr-scale"),
    (["train", "--lr-scale", "-1"], "--lr-scale"),
    (["train", "--lr-scale", "0"], "--lr-scale"),
    (["train", "--calib-images", "-1"], "--calib-images"),
    (["train", "--width-mult", "inf"], "--width-mult"),
    (["train", "--val-fraction", "nan"], "--val-fraction"),
    (["memory", "--resolution", "32", "--width-mult", "nan"], "--width-mult"),
    (["memory", "--resolution", "32", "--width-mult", "inf"], "--width-mult"),
    (["memory", "--resolution", "32", "--width-mult", "0"], "--width-mult"),
    (["memory", "--resolution", "32", "--divisor", "0"], "--divisor"),
])
def test_bad_values_are_refused_naming_the_flag(tmp_path, capsys, argv, flag):
    out = tmp_path / "never"
    # tiny settings, so that a value let through trains for seconds only (and the test fails)
    tiny = ["--space", "moofa", "--resolutions", "8,12", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size",
            "16", "--phases", "full", "--no-progress"]
    extra = ["--out", str(out), *tiny] + (["--width-mult", "0.25"] if "--width-mult" not in argv else []) \
        + (["--calib-images", "32"] if "--calib-images" not in argv else []) if argv[0] == "train" else []
    assert ofa_main(["ofa", *argv, *extra]) == 2
    assert flag in _one_line(capsys.readouterr().err)
    assert not out.exists()  # refused before any folder or data


def test_search_values_are_refused(tmp_path, capsys):
    for flag, value in (("--predictor-lr", "nan"), ("--macs-budget", "nan"), ("--population", "1")):
        assert ofa_main(["ofa", "search", "--run", str(tmp_path), "--budgets", "1000", flag, value]) == 2
        assert flag in _one_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------ 5. one-element lists


def test_one_element_subnet_lists_broadcast(capsys):
    from pyengine.models.ofa_mbv3 import OFA_ARCH, normalize_subnet

    assert normalize_subnet(OFA_ARCH, {"ks": [3], "e": [3], "d": [2]}) == normalize_subnet(OFA_ARCH, {"ks": 3, "e": 3, "d": 2})
    with pytest.raises(ValueError, match="needs 1 or 20 values, got 2"):
        normalize_subnet(OFA_ARCH, {"ks": [3, 5]})
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "224", "--arch", '{"ks":[3],"e":[3],"d":[2]}',
                     "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert ofa_main(["ofa", "memory", "--space", "ofa", "--resolution", "224", "--kernel", "3", "--expand", "3",
                     "--depth", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == listed


# ------------------------------------------------------------------------------ 6. export of an extract


def test_an_extracted_subnet_exports_to_onnx(run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from _depth_helpers import onnx_matches

    from pyengine.cli import main as cli_main
    from pyengine.methods.ofa.search import load_extracted

    net_dir = tmp_path / "net"
    assert ofa_main(["ofa", "extract", "--run", str(run), "--kernel", "5", "--expand", "3", "--depth", "2",
                     "--resolution", "8", "--out", str(net_dir), "--device", "cpu", "--no-eval"]) == 0
    desc = json.loads((net_dir / "model.json").read_text())
    assert desc["input_shape"] == [1, 8, 8] and desc["preprocessing"]["image_size"] == 8
    assert len(desc["preprocessing"]["mean"]) == 1
    onnx_dir = tmp_path / "onnx"
    capsys.readouterr()
    assert cli_main(["export", str(net_dir), "--format", "onnx", "--out", str(onnx_dir)]) == 0, capsys.readouterr().err
    net, _ = load_extracted(net_dir)
    assert onnx_matches(onnx_dir, net, (2, 1, 8, 8))
    # the supernet is not one network: exporting it is refused with one line
    for folder in (run / "supernet", run):  # the supernet, or its run folder: both point to `ofa extract`
        assert cli_main(["export", str(folder), "--format", "onnx", "--out", str(tmp_path / "sup")]) == 2
        err = capsys.readouterr().err
        _one_line(err)
        assert "not one network" in err and "pyengine ofa extract --run" in err, err


# ------------------------------------------------------------------------------ 2. + 7. the search


SEARCH = ["--samples", "8", "--predictor-epochs", "2", "--population", "4", "--generations", "2", "--device", "cpu"]


def test_search_is_quiet_when_stderr_is_not_a_terminal(run, tmp_path, capsys):
    # stderr is captured here (not a terminal): no progress bars even without --no-progress
    assert ofa_main(["ofa", "search", "--run", str(run), "--budgets", "60000", "--out", str(tmp_path / "s"), *SEARCH]) == 0
    assert capsys.readouterr().err == ""


def test_search_budgets_no_subnet_meets(run, tmp_path, capsys):
    out = tmp_path / "search"
    # 9000 elements is below the smallest subnet, 60000 above the largest
    assert ofa_main(["ofa", "search", "--run", str(run), "--budgets", "9000,60000", "--out", str(out), "--no-progress",
                     *SEARCH]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("moofa")]
    assert len(rows) == 2 and "none fits" in rows[0] and "none fits" not in rows[1]
    md = (out / "search.md").read_text()
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 4  # head, rule, one row per budget
    assert all(ln.count("|") == 3 for ln in table)
    cells = [c.strip() for ln in table for c in ln.strip("|").split("|")]
    assert all(cells) and "none fits" in table[2] and "9,000" in table[2]
    rec = json.loads((out / "search.json").read_text())
    assert [r["budget"] for r in rec["results"]] == [60000]
    assert [u["budget"] for u in rec["unmet"]] == [9000]
    # no budget met at all: one line, exit status 2, nothing measured
    out2 = tmp_path / "search2"
    assert ofa_main(["ofa", "search", "--run", str(run), "--budgets", "100,200", "--out", str(out2), "--no-progress",
                     *SEARCH]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "no subnet fits any budget" in err and "--budgets" in err and "peak_memory" in err
    assert not out2.exists()


def test_search_tables_without_a_sampled_subnet_or_any_result():
    from pyengine.methods.ofa.report import format_search_markdown, format_search_table

    sub = {"ks": [3] * 20, "e": [2] * 20, "d": [2] * 5, "r": 8}
    row = {"space": "moofa", "budget": 20000, "subnet": sub, "predicted_acc": 50.0, "test_acc": 51.0,
           "peak_memory": 15000, "macs": 1000}  # no sampled subnet fits the budget
    table = format_search_table([row])
    assert "nan" not in table and " - " in table.splitlines()[2]
    md = format_search_markdown([], spaces=["ofa"], budgets=[100])
    assert md.splitlines()[:3] == ["| peak-memory budget (elements) | OFA test acc % (peak, MACs; best sampled) |",
                                   "|---|---|", "| 100 | none fits |"]
    assert "|  |" not in format_search_markdown([]) and "---" not in format_search_markdown([])
