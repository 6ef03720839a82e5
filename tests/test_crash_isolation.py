"""Every op's bad-input cases (tests/bad_input_cases.py) on every available device, each device
in a child process: a crash (segfault, abort, a dead CUDA context) fails this test and names the
case, instead of killing the whole test session. After a crash the child is restarted at the next
case, so one run reports every failing case."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DEVICES

SCRIPT = Path(__file__).resolve().parent / "bad_input_cases.py"


def _run(device, start, timeout, env=None):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", device, "--start", str(start)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    recs = []
    for line in proc.stdout.splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return proc, recs


def _run_all(dev, env=None):
    """(failures, cases done, finished) over restarts after crashes."""
    failures, done, start, finished = [], 0, 0, False
    for _ in range(100):  # one restart per crash at most
        proc, recs = _run(dev, start, timeout=300, env=env)
        if any("skip" in r for r in recs):
            return None, 0, True
        started = [r for r in recs if "start" in r]
        for r in recs:
            if "done" in r:
                done += 1
                if not r["ok"]:
                    failures.append(f"{r['name']}: {r.get('error')} (got {r.get('type')}: {r.get('msg')})")
        if any("finished" in r for r in recs):
            finished = True
            break
        if not started:
            failures.append(f"child failed before any case (exit {proc.returncode}): {proc.stderr[-2000:]}")
            break
        last = started[-1]
        failures.append(f"{last['name']}: CRASHED the process (exit {proc.returncode}): {proc.stderr[-600:]}")
        start = last["start"] + 1
    return failures, done, finished


@pytest.mark.parametrize("dev", DEVICES)
def test_bad_inputs_raise_clear_errors_in_a_child_process(dev):
    failures, done, finished = _run_all(dev)
    if failures is None:
        pytest.skip("native extension not built")
    assert finished, "the cases did not run to the end"
    assert done >= 50, f"only {done} cases ran"
    assert not failures, "\n".join(failures)


def test_a_crash_is_reported_and_the_other_cases_still_run():
    # a case that kills its process (SIGSEGV) fails the run by name; the cases after it still run
    import os

    failures, done, finished = _run_all("cpu", env=dict(os.environ, PYENGINE_CRASH_AT="3"))
    if failures is None:
        pytest.skip("native extension not built")
    assert finished and done >= 50
    assert len(failures) == 1 and "CRASHED" in failures[0] and "masked_linear mask shape" in failures[0]
