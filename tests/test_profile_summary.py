"""The Nsight Compute summary of benchmarks/profile_kernels.py, on a raw CSV written here in ncu's
`--csv --page raw` layout (a header row, a units row, quoted values with thousands separators)."""
import csv
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_kernels as pk  # noqa: E402

SPIN = "at::cuda::(anonymous namespace)::spin_kernel(long)"
GEMV = ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>(cublasGemvParamsEx<int, "
        "cublasGemvTensorStridedBatched<const __nv_bfloat16>>, float, float)")
BITMAP = "void pyengine::cuda::(anonymous namespace)::bitmap_mma_kernel<__nv_bfloat16, 2, 1>(const T1 *, long)"


def _csv(rows, time_unit="nsecond"):
    head = ["ID", "Kernel Name", "gpu__time_duration.sum", "launch__registers_per_thread",
            "smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",
            "smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",
            "smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"]
    units = ["", "", time_unit, "register/thread", "ratio", "ratio", "ratio"]
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    for r in [head, units] + [[str(i)] + r for i, r in enumerate(rows)]:
        w.writerow(r)
    return "==PROF== Disconnected\n" + buf.getvalue()


def _table_rows(text):
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines()[2:] if ln.startswith("| ")]


def test_rows_labelled_by_case_with_units_and_top_stalls():
    text = _csv([[SPIN, "1,024", "16", "0.1", "0", "1"],
                 [GEMV, "12,345", "40", "5.5", "0.5", "1"],
                 [SPIN, "1,024", "16", "0.1", "0", "1"],
                 [BITMAP, "8,000", "62", "9.1", "2.5", "1"],
                 [BITMAP, "7,500", "62", "8.0", "3.0", "1"]])
    rows = _table_rows(pk.summarize(text, ["dense M=1", "bitmap M=1"]))
    assert [r[:3] for r in rows] == [["0", "dense M=1", "gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>"],
                                     ["1", "bitmap M=1", "bitmap_mma_kernel<__nv_bfloat16, 2, 1>"],
                                     ["2", "bitmap M=1", "bitmap_mma_kernel<__nv_bfloat16, 2, 1>"]]
    assert rows[0][3] == "12.3" and rows[1][3] == "8.0"  # nanoseconds to microseconds
    assert rows[1][-1] == "long_scoreboard 9.1, barrier 2.5"  # 'selected' is not a stall
    # microseconds as given, when ncu prints them so
    assert _table_rows(pk.summarize(_csv([[GEMV, "12.5", "40", "1", "0", "1"]], "usecond")))[0][3] == "12.5"


def test_case_labels_left_out_when_markers_and_cases_disagree():
    text = _csv([[SPIN, "1", "16", "0", "0", "1"], [GEMV, "2", "40", "1", "0", "1"]])
    out = pk.summarize(text, ["a", "b"])
    assert "case labels left out: 1 marker kernels for 2 cases" in out
    assert [r[1] for r in _table_rows(out.split("\n\n", 1)[1])] == ["-", "-"]
    assert "no ncu rows found" in pk.summarize("==PROF== nothing profiled\n")


def test_short_name():
    assert pk.short_name(SPIN) == "spin_kernel"
    assert pk.short_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
                         "std::array<char *, 1>>(int, T2, T3)") == (
        "vectorized_elementwise_kernel<4, FillFunctor<float>, array<char *, 1>>")
    assert len(pk.short_name("k<" + "a" * 200 + ">(int)")) == 72


def test_dram_column_under_either_metric_name():
    # the device machines' ncu (2026-11) names it gpu__dram_throughput; older ones dram__throughput
    for name in ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                 "dram__throughput.avg.pct_of_peak_sustained_elapsed"):
        text = _csv([[GEMV, "12,345", "40", "5.5", "0.5", "1"]]).replace(
            '"launch__registers_per_thread"', f'"{name}","launch__registers_per_thread"', 1)
        lines = text.splitlines()
        # the units row and the data row gain a value in the same column
        lines[2] = lines[2].replace('"register/thread"', '"%","register/thread"', 1)
        lines[3] = lines[3].replace('"40"', '"71.5","40"', 1)
        rows = _table_rows(pk.summarize("\n".join(lines)))
        assert rows[0][4] == "71.5", (name, rows)
        assert rows[0][7] == "40.0"  # the registers column is still the registers
