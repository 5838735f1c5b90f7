"""Smoke test of the benchmark suite (fastconv.bench, also benchmarks/run.py and
`fastconv bench`): a --quick run of the LeNet cases writes a JSON file with fastconv's times
and the machine description.  Passes with or without PyTorch / ONNX Runtime installed."""
import importlib.util
import json
import math
import os
import sys

import pytest

@pytest.fixture
def bench():
    import fastconv as fc
    from fastconv.bench import run

    threads = fc.get_num_threads()
    yield run
    assert fc.get_num_threads() == threads, "main() must restore fastconv's thread count"


def _load(path):
    with open(path) as f:
        return json.load(f)


def _check_common(doc):
    m = doc["machine"]
    assert m["cpu_model"] and m["cpu_count"] >= 1
    assert m["versions"]["numpy"] and m["versions"]["fastconv"]
    assert doc["results"], "no results"
    for r in doc["results"]:
        assert r["threads"] == 1 and r["dtype"] == "float32"
        fc = r["libs"]["fastconv"]
        assert fc["median_ms"] > 0 and math.isfinite(fc["median_ms"]) and fc["n"] >= 3
        assert r["env"]["versions"]["fastconv"] == m["versions"]["fastconv"]
        for lib, v in r["libs"].items():
            assert v.get("check") != "MISMATCH", (r["case"], r["mode"], lib, v)
            if "median_ms" in v:
                assert v["faults_per_call"] >= 0


def test_quick_lenet(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--cases", "lenet", "--threads", "1", "--dtypes", "float32",
                     "--json", str(out)])
    assert rc == 0
    doc = _load(out)
    _check_common(doc)
    assert {(r["case"], r["mode"]) for r in doc["results"]} == {
        ("conv.lenet", "fwd"), ("conv.lenet", "fwdbwd"),
        ("model.lenet", "fwd"), ("model.lenet", "fwdbwd"),
        ("model.lenet.b1", "fwd"), ("model.lenet.b1", "fwdbwd")}
    conv = next(r for r in doc["results"] if r["case"] == "conv.lenet" and r["mode"] == "fwd")
    assert conv["flops"] == 2 * 64 * 32 * 28 * 28 * 1 * 5 * 5
    assert conv["libs"]["fastconv"]["gflops"] > 0
    for peer in doc["peers"]:                 # whatever baselines are installed ran too
        assert "median_ms" in conv["libs"][peer]
        assert conv["ratios"][peer] > 0
    printed = capsys.readouterr().out
    assert "conv.lenet" in printed and "fc ms" in printed


def test_missing_baselines_leave_out_their_columns(bench, tmp_path, monkeypatch, capsys):
    for name in ("torch", "onnx", "onnxruntime"):
        monkeypatch.setitem(sys.modules, name, None)       # "import torch" now fails
    out = tmp_path / "bench.json"
    rc = bench.main(["--quick", "--cases", "conv.lenet", "--modes", "fwd", "--threads", "1",
                     "--dtypes", "float32", "--json", str(out), "--no-roofline"])
    assert rc == 0
    doc = _load(out)
    _check_common(doc)
    assert doc["peers"] == ["numpy"]
    assert set(doc["peers_missing"]) == {"torch", "onnxruntime"}
    (r,) = doc["results"]
    assert set(r["libs"]) == {"fastconv", "numpy"}
    assert r["ratios"]["best_peer"] is None
    printed = capsys.readouterr().out
    assert "torch ms" not in printed and "ort ms" not in printed and "numpy ms" in printed


def test_bad_arguments(bench, capsys):
    assert bench.main(["--cases", "no-such-case"]) == 2
    assert bench.main(["--threads", "0"]) == 2
    assert bench.main(["--list"]) == 0
    assert "conv.resnet" in capsys.readouterr().out


def test_fastconv_bench_command(capsys):
    from fastconv.__main__ import main

    assert main(["bench", "--list"]) == 0
    assert "conv.lenet" in capsys.readouterr().out


def test_interleaved_counts_page_faults_per_call():
    """timing.interleaved's faults: a runner that touches a fresh anonymous mapping every call
    shows about one minor fault a page; one that touches nothing new shows (almost) none."""
    import mmap

    from fastconv.bench import timing

    if timing.resource is None:
        pytest.skip("no resource module here: no fault counts")
    pages, size = 64, 64 * mmap.PAGESIZE

    def fresh():
        m = mmap.mmap(-1, size)
        for i in range(0, size, mmap.PAGESIZE):
            m[i] = 1
        m.close()

    buf = bytearray(size)

    def same():
        for i in range(0, size, mmap.PAGESIZE):
            buf[i] = 1

    faults = {}
    times = timing.interleaved({"fresh": fresh, "same": same}, warmup=1, min_repeats=20,
                               min_time=0.0, faults=faults)
    assert len(times["fresh"]) >= 20 and len(times["same"]) >= 20
    assert 0.9 * pages <= faults["fresh"] <= 2 * pages + 8, faults
    assert faults["same"] < 0.2 * pages, faults
