"""benchmarks/records.py: a bench script's --record writes its figures into a
results file that scripts/benchmark_table.py renders and merges."""
import argparse
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def modules(repo_module):
    return repo_module("records", "benchmarks"), repo_module("benchmark_table")


def recorder(records, argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    records.add_arguments(parser)
    return records.Recorder(parser.parse_args(argv), argv)


def test_record_writes_figures_and_machine(modules, tmp_path):
    records, benchmark_table = modules
    out = tmp_path / "out.json"
    rec = recorder(records, ["--record", str(out)])
    rec.add("find_paths trace", "10 tokens", "4.4 s", baseline="11.4 s", ratio=records.speedup(11.4, 4.4),
            trace_s=4.4, cuda=None)
    assert rec.save() == out
    results = json.loads(out.read_text())
    (row,) = results["records"]
    key = f"cpu-{__import__('os').cpu_count()}"
    assert row["machine"] == key and key in results["machines"]
    assert row["ratio"] == "2.6× faster" and row["figures"] == {"trace_s": 4.4}
    assert row["command"].endswith(f"--record {out}")
    assert row["date"].endswith("Z") and row["cpu"] and row["torch"]
    assert set(row["load_average"]) == {"start", "end"}
    # A rerun of the same machine, benchmark and size replaces the row; another size is added.
    rec = recorder(records, ["--record", str(out), "--machine", "box"])
    rec.add("find_paths trace", "10 tokens", "9.9 s")
    rec.save()
    rec = recorder(records, ["--record", str(out), "--machine", "box"])
    rec.add("find_paths trace", "10 tokens", "3.0 s")
    rec.add("find_paths trace", "20 tokens", "6.0 s")
    rec.save()
    rows = json.loads(out.read_text())["records"]
    assert [(r["machine"], r["size"], r["time"]) for r in rows] == [
        (key, "10 tokens", "4.4 s"), ("box", "10 tokens", "3.0 s"), ("box", "20 tokens", "6.0 s")]
    # Merged into another results file, the records render as that machine's table.
    into = tmp_path / "results.json"
    into.write_text(json.dumps({"about": "", "machines": {"old": "an old machine"}, "records": []}))
    benchmark_table.merge_files([out], into=into)
    table = benchmark_table.render(json.loads(into.read_text()))
    assert "| find_paths trace | 20 tokens | 6.0 s |" in table and "**an old machine**" not in table


def test_without_record_nothing_is_written(modules, tmp_path, monkeypatch):
    records, _ = modules
    monkeypatch.chdir(tmp_path)
    rec = recorder(records, [])
    rec.add("x", "y", "1 s")
    assert rec.save() is None and not list(tmp_path.iterdir())


def test_every_bench_script_offers_record():
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        text = script.read_text()
        assert "records.add_arguments(" in text and "recorder.save()" in text, script.name
