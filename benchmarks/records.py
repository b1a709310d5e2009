"""Benchmark records: how every bench script writes its own figures into
``benchmarks/results.json`` (the file the README's benchmark tables are
generated from by ``scripts/benchmark_table.py``).

Each bench script adds two options through :func:`add_arguments`::

    python benchmarks/bench_trace.py --record                 # into benchmarks/results.json, README regenerated
    python benchmarks/bench_trace.py --record out.json        # into another file (e.g. on a GPU machine)
    python benchmarks/bench_trace.py --record --machine h200  # under a named machine key

and, while it runs, hands each figure it prints to a :class:`Recorder`. A
record holds the table's columns (benchmark, size, time, baseline, ratio,
peak RSS, notes) and, beside them, the raw ``figures`` (numbers), the command
line, the date, and the machine it ran on: host name, CPU model and count, GPU
model, torch version, load average at the start and the end of the run. A
new record replaces an older one of the same machine, benchmark and size, so
the tables show the latest measurement. Records written to another file are
brought in with ``python scripts/benchmark_table.py --merge FILE``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import runpy
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"
ROOT = RESULTS.parents[1]
COLUMNS = ("benchmark", "size", "time", "baseline", "ratio", "peak_rss", "notes")


def add_arguments(parser) -> None:
    """The ``--record [FILE]`` and ``--machine KEY`` options of a bench script."""
    parser.add_argument("--record", nargs="?", const=str(RESULTS), default=None, metavar="RESULTS_JSON",
                        help="write this run's figures into benchmarks/results.json (and regenerate the "
                             "README's benchmark tables), or into RESULTS_JSON")
    parser.add_argument("--machine", default=None, metavar="KEY",
                        help="machine key of the records (default: 'cpu-<cores>', or the GPU's name "
                             "with --device cuda, e.g. 'h200')")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model(device: str) -> str | None:
    if not str(device).startswith("cuda"):
        return None
    import torch
    return torch.cuda.get_device_name(torch.device(device))


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_key(device: str) -> str:
    """``cpu-<cores>`` on CPU; on CUDA the GPU's name as a slug ("NVIDIA H200" -> ``h200``)."""
    gpu = gpu_model(device)
    if gpu:
        return re.sub(r"^nvidia-", "", re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-"))
    return f"cpu-{os.cpu_count()}"


def machine_description(device: str) -> str:
    gpu = gpu_model(device)
    cpus = f"{os.cpu_count()} CPU threads ({cpu_model()})"
    return f"one {gpu} GPU, {cpus} (--device {device})" if gpu else f"{cpus}, no GPU"


def speedup(baseline_s: float, seconds: float) -> str:
    """'2.6× faster' (or '1.2× slower') of ``seconds`` against ``baseline_s``."""
    return f"{baseline_s / seconds:.1f}× faster" if seconds <= baseline_s else f"{seconds / baseline_s:.1f}× slower"


def command_line(argv=None) -> str:
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join([script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


class Recorder:
    """Collects a run's records; :meth:`save` writes them when ``--record`` was given.

    Create it at the start of the run (it notes the load average then)."""

    def __init__(self, args, argv=None):
        self.path = Path(args.record) if getattr(args, "record", None) else None
        self.device = str(getattr(args, "device", "cpu"))
        self.machine = getattr(args, "machine", None)
        self.command = command_line(argv)
        self.load_at_start = load_average()
        self.records: list[dict] = []

    def add(self, benchmark: str, size: str, time: str, baseline: str = "", ratio: str = "",
            peak_rss: str = "", notes: str = "", **figures) -> None:
        """One row of the table (strings as shown) and its raw figures (numbers)."""
        self.records.append(dict(benchmark=benchmark, size=size, time=time, baseline=baseline,
                                 ratio=ratio, peak_rss=peak_rss, notes=notes,
                                 figures={k: v for k, v in figures.items() if v is not None}))

    def save(self) -> Path | None:
        if self.path is None or not self.records:
            return None
        import torch
        key = self.machine or machine_key(self.device)
        run = dict(command=self.command,
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   host=platform.node(), cpu=cpu_model(), cpu_count=os.cpu_count(),
                   gpu=gpu_model(self.device), torch=torch.__version__,
                   load_average={"start": self.load_at_start, "end": load_average()})
        results = read(self.path)
        results["machines"].setdefault(key, machine_description(self.device))
        merge(results, [dict(machine=key, **rec, **run) for rec in self.records])
        write(self.path, results)
        print(f"\nrecorded {len(self.records)} figures under machine '{key}' in {self.path}")
        if self.path.resolve() == RESULTS:
            runpy.run_path(str(ROOT / "scripts" / "benchmark_table.py"))["main"]([])    # scripts/ is no package
        else:
            print(f"bring them into the README with: python scripts/benchmark_table.py --merge {self.path}")
        return self.path


def read(path: Path) -> dict:
    if not Path(path).is_file():
        return {"about": "", "machines": {}, "records": []}
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write(path: Path, results: dict) -> None:
    """One record per line, as the file is kept (small diffs)."""
    head = json.dumps({k: v for k, v in results.items() if k != "records"}, indent=2, ensure_ascii=False)
    lines = [json.dumps(r, ensure_ascii=False) for r in results["records"]]
    body = ",\n    ".join(lines)
    text = head[:-2] + ',\n  "records": [\n    ' + body + "\n  ]\n}\n" if lines else \
        head[:-2] + ',\n  "records": []\n}\n'
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def merge(results: dict, new_records: list[dict]) -> None:
    """Add records, each replacing any older one of the same machine, benchmark and size
    (in its place, so the table keeps its order)."""
    for rec in new_records:
        same = [i for i, r in enumerate(results["records"])
                if (r["machine"], r["benchmark"], r["size"]) == (rec["machine"], rec["benchmark"], rec["size"])]
        if same:
            results["records"][same[0]] = rec
            for i in reversed(same[1:]):
                del results["records"][i]
        else:
            results["records"].append(rec)
