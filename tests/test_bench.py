"""The helpers of the ladder pages (04a–04c): listings of the installed source, timing on this device,
and reading the recorded benchmarks, on a small synthetic record."""
import json
import math
import textwrap

import pytest
import torch
from matplotlib.figure import Figure

from lecture_kit import bench, plots, retnet, ssd
from lecture_kit.bench import (bench_constant, bench_defaults, calls_to, load_record, median_ms,
                               record_notes, run_label, time_forms)
from lecture_kit.kernels import scalar_decay
from lecture_kit.listing import ROOT, Listing, show
from lecture_kit.testing import random_inputs

RUN = dict(device="NVIDIA H200", torch="2.11.0", triton="3.6.0", fla="0.6.0", python="3.12",
           date="2026-11-28T22:12:31+00:00")


@pytest.fixture
def record():
    rows = [dict(mixer="gla", impl="lecture_kit kernel", mode="fwd", B=2, T=1024, ms=1.0, run=0),
            dict(mixer="gla", impl="lecture_kit kernel", mode="fwdbwd", B=2, T=1024, ms=3.0, run=0),
            dict(mixer="gla", impl="lecture_kit kernel", mode="fwd", B=1, T=2048, ms=2.0, run=1),
            dict(mixer="gla", impl="fla chunk_gla", mode="fwd", B=2, T=1024, ms=0.5, run=0),
            dict(mixer="gla", impl="fla chunk_gla", mode="fwdbwd", B=2, T=1024, error="RuntimeError: no", run=0),
            dict(mixer="gla", impl="lecture_kit chunked", mode="fwd", B=1, T=4096, error="OOM", run=1),
            dict(mixer="attention", impl="torch sdpa", mode="fwd", B=2, T=1024, ms=0.2, run=0),
            dict(mixer="ssd", impl="lecture_kit kernel", mode="fwd", B=1, T=8192, ms=4.0, run=0)]
    return {"runs": [RUN, dict(RUN, device="NVIDIA H100", date="2026-12-01T00:00:00+00:00")], "records": rows}


# --- listing -----------------------------------------------------------------------------------------

def test_show_lists_a_whole_function_with_its_file_and_lines():
    listing = show(ssd.recurrent)
    assert isinstance(listing, Listing)
    assert listing.code.startswith("def recurrent(")
    assert listing.title.startswith("lecture_kit/ssd.py, lines ")
    first, last = map(int, listing.title.split("lines ")[1].split("–"))
    source = (ROOT / "lecture_kit/ssd.py").read_text().splitlines()
    assert textwrap.dedent("\n".join(source[first - 1:last])).rstrip() == listing.code
    assert repr(listing).startswith(listing.title + "\n")
    html = listing._repr_html_()
    assert "white-space: pre" in html and listing.title in html


def test_show_finds_a_marked_block_of_a_triton_kernel():
    whole = show(scalar_decay._chunk_output_kernel)             # a JITFunction, unwrapped
    block = show(scalar_decay._chunk_output_kernel, "i_v, n, i_bh", "for i_h in range(HEADS)")
    lines = block.code.splitlines()
    assert "i_v, n, i_bh" in lines[0] and not any("for i_h in range(HEADS)" in line for line in lines)
    assert block.code.splitlines()[0].strip() in whole.code and len(lines) < len(whole.code.splitlines())
    tail = show(scalar_decay._chunk_output_kernel, "for i_h in range(HEADS)")   # to the end
    assert tail.code.splitlines()[-1].strip() == whole.code.splitlines()[-1].strip()
    assert tail.title.startswith("lecture_kit/kernels/scalar_decay.py, lines ")


@pytest.mark.parametrize("start, stop, missing", [("no such marker", None, "no such marker"),
                                                  ("def recurrent", "no such stop", "no such stop")])
def test_show_names_a_missing_marker(start, stop, missing):
    with pytest.raises(ValueError, match=f"recurrent: no line contains '{missing}'"):
        show(ssd.recurrent, start, stop)


def test_show_looks_for_the_stop_marker_after_the_start():
    # "def" occurs on the first line only: a stop marker is searched for *after* the start line
    with pytest.raises(ValueError, match="'def recurrent'"):
        show(ssd.recurrent, "def recurrent", "def recurrent")


# --- live timing -------------------------------------------------------------------------------------

def test_median_ms_is_a_positive_float_and_runs_without_grad():
    seen = []
    ms = median_ms(lambda: seen.append(torch.is_grad_enabled()) or sum(range(1000)))
    assert isinstance(ms, float) and ms > 0 and math.isfinite(ms)
    assert seen and not any(seen)
    calls = []
    median_ms(lambda: calls.append(1), repeats=5, device="cpu")
    assert len(calls) == 6                                     # one warm-up, then five timed


def test_time_forms_times_each_form_up_to_its_longest_length():
    shape = dict(heads=1, key_dim=8, value_dim=8)
    longest = dict(recurrent=32, parallel=16, chunked=32, kernel=0)
    live = time_forms("retnet", retnet, shape, [16, 32], longest, torch.float32, device="cpu")
    assert set(live) == {"recurrent", "parallel", "chunked"}
    assert [T for T, _ in live["recurrent"]] == [16, 32] and [T for T, _ in live["parallel"]] == [16]
    assert all(ms > 0 for points in live.values() for _, ms in points)


def test_calls_to_counts_and_restores():
    original = retnet.chunked
    args, kw = random_inputs("retnet", batch=1, length=8, heads=1, key_dim=4, value_dim=4)
    with calls_to(retnet, "chunked") as calls:
        retnet.chunked(*args, **kw)
        retnet.chunked(*args, **kw)
    assert len(calls) == 2 and retnet.chunked is original
    with pytest.raises(RuntimeError), calls_to(retnet, "chunked"):
        raise RuntimeError
    assert retnet.chunked is original


# --- the record --------------------------------------------------------------------------------------

def test_load_record_reads_and_checks(tmp_path, record):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    assert load_record(path) == record
    path.write_text(json.dumps({"runs": []}))
    with pytest.raises(ValueError, match="'records'"):
        load_record(path)


def test_the_recorded_h200_results_load():
    real = load_record(ROOT / "benchmarks/results/h200.json")
    assert real["records"] and all(0 <= r["run"] < len(real["runs"]) for r in real["records"])
    assert run_label(real, 0).startswith("NVIDIA H200, torch ")


def test_run_label(record):
    assert run_label(record, 0) == "NVIDIA H200, torch 2.11.0, Triton 3.6.0, fla 0.6.0, 2026-11-28"
    assert run_label(record, 1).startswith("NVIDIA H100") and run_label(record, 1).endswith("2026-12-01")


def test_record_notes_summarises_one_mixer(record):
    glued = {}
    notes, failed = record_notes(record, "gla", glue=lambda name, value, display: glued.update({name: value}))
    assert notes["missing"] == "recurrent, parallel"             # kernel and chunked are named
    assert notes["lengths"] == "1024, 2048"                      # T=4096 failed
    assert notes["all_lengths"] == "1024, 2048, 4096, 8192"
    assert notes["labels"] == f"{run_label(record, 1)}; {run_label(record, 0)}"
    assert notes["failed"] == 2 and [r["error"] for r in failed] == ["RuntimeError: no", "OOM"]
    assert notes["failed_what"] == "fla chunk_gla (fwdbwd), lecture_kit chunked (fwd)"
    assert notes["pairs"] == "fla chunk_gla: fwd; lecture_kit kernel: fwd, fwdbwd"
    assert glued == {f"gla_rec_{key}": value for key, value in notes.items()}
    assert record_notes(record, "rwkv7") == ({"missing": "recurrent, parallel, chunked, kernel",
                                              "lengths": "", "all_lengths": "1024, 2048, 4096, 8192",
                                              "labels": "", "failed": 0, "failed_what": "none",
                                              "pairs": ""}, [])


def test_bench_script_shapes_and_constants(tmp_path):
    script = tmp_path / "b.py"
    script.write_text("import torch\nTOKENS = 16384\nA, B = 1, 2\n"
                      "def ssd_inputs(B, T, H=32, P=64, N=128, G=1):\n    pass\n")
    assert bench_defaults(script, "ssd_inputs") == dict(H=32, P=64, N=128, G=1)
    assert bench_constant(script, "TOKENS") == 16384
    with pytest.raises(ValueError, match="'gla_inputs'"):
        bench_defaults(script, "gla_inputs")
    with pytest.raises(ValueError, match="'LENGTHS'"):
        bench_constant(script, "LENGTHS")
    real = ROOT / "benchmarks/bench_kernels.py"
    assert set(bench_defaults(real, "ssd_inputs")) == {"H", "P", "N", "G"}
    assert isinstance(bench_constant(real, "TOKENS"), int)


# --- the plot ----------------------------------------------------------------------------------------

def test_plot_ladder_draws_live_and_recorded_timings(record):
    fig = Figure()
    axes = fig.subplots(1, 2)
    live = {"recurrent": [(16, 2.0), (32, 4.0)], "kernel": [(16, 1.0)]}
    live_lines, rec_lines = plots.plot_ladder(axes, live, record, "gla", title="here")
    assert [line.get_label() for line in live_lines] == ["recurrent", "kernel"]
    assert sorted(line.get_label() for line in rec_lines) == [
        "fla chunk_gla (fwd)", "lecture_kit kernel (fwd)", "lecture_kit kernel (fwdbwd)", "torch sdpa (fwd)"]
    kernel_fwd = next(line for line in rec_lines if line.get_label() == "lecture_kit kernel (fwd)")
    assert list(kernel_fwd.get_xdata()) == [1024, 2048] and list(kernel_fwd.get_ydata()) == [1.0, 2.0]
    sdpa = next(line for line in rec_lines if line.get_label().startswith("torch"))
    assert sdpa.get_color() == "0.6"
    assert axes[0].get_title() == "here" and axes[1].get_title().startswith("recorded: NVIDIA H")
    assert axes[0].get_xscale() == axes[1].get_yscale() == "log"
    assert bench.FORMS == ("recurrent", "parallel", "chunked", "kernel")


def test_merge_takes_single_runs_and_earlier_merges(tmp_path, capsys):
    """benchmarks/bench_kernels.py --merge: run indices are re-based so each record keeps its own run."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "benchmarks/bench_kernels.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)

    def rec(impl, ms, **extra):
        return dict(mixer="gla", impl=impl, mode="fwd", B=2, T=8192, ms=ms, p20=ms, p80=ms, GBps=1.0,
                    frac_of_copy=0.1, first_call_s=1.0, **extra)

    earlier = {"runs": [{"date": "a"}, {"date": "b"}],
               "records": [rec("fla chunk_gla", 1.0, run=0), rec("lecture_kit kernel", 2.0, run=1)]}
    single = {"meta": {"date": "c"}, "records": [rec("lecture_kit kernel", 3.0)]}
    paths = [tmp_path / "earlier.json", tmp_path / "single.json"]
    for path, data in zip(paths, (earlier, single)):
        path.write_text(json.dumps(data))
    bench_kernels.merge([str(p) for p in paths], str(tmp_path / "out.json"))
    merged = json.loads((tmp_path / "out.json").read_text())
    assert [r["date"] for r in merged["runs"]] == ["a", "b", "c"]
    assert [(r["ms"], r["run"]) for r in merged["records"]] == [(1.0, 0), (2.0, 1), (3.0, 2)]
    capsys.readouterr()
