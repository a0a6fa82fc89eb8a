"""How long `mauctl demo` takes on this machine, and by how much the pretrained encoder wins.

    python benchmarks/demo_time.py [--keep DIR]

Runs `python -m mauctl demo` (the command a user types, process start-up included) in a fresh
temporary --out and prints a markdown table row: date, machine, torch version, the demo's
precision, total wall seconds (command start to exit), each stage's seconds as the demo timed
them (<out>/demo-summary.json), the CPU seconds of all its processes, both linear top-1s and
the margin. The digits image folder comes from MAUCTL_CACHE as usual (built once).

The load average before and after goes beside it: on a shared machine wall seconds depend on
what else runs, so compare figures taken at a low load.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLUMNS = ["date", "machine", "torch", "precision", "total s", "pretrain s", "lincls s", "export s",
           "random init s", "report s", "CPU s", "load before / after", "pretrained %", "random %", "margin"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_version() -> str:
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def run_demo(out: Path) -> tuple[float, float, dict]:
    """Wall and CPU seconds of `mauctl demo --out OUT`, and the summary it wrote."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mauctl", "demo", "--out", str(out)],
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"mauctl demo exited with status {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads((out / "demo-summary.json").read_text())


def table(wall: float, cpu: float, summary: dict, load: tuple[float, float], torch: str) -> str:
    t = summary["timings_s"]
    trained, random = summary["pretrained_top1"], summary["random_top1"]
    row = [datetime.date.today().isoformat(), f"{cpu_model()}, {os.cpu_count()} cores", torch,
           summary.get("precision") or "-", f"{wall:.0f}",
           *(f"{t.get(stage, float('nan')):.0f}" for stage in ("pretrain", "lincls", "export", "random init", "report")),
           f"{cpu:.0f}", f"{load[0]:.2f} / {load[1]:.2f}", f"{trained:.2f}", f"{random:.2f}", f"{trained - random:+.2f}"]
    return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), "| " + " | ".join(row) + " |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="Run the demo in this new folder and keep it (default: a temporary one).")
    args = parser.parse_args()
    torch = torch_version()
    load_before = os.getloadavg()[0]
    if args.keep:
        if args.keep.exists():
            raise SystemExit(f"--keep {args.keep} exists: give a new folder (the demo would resume from it)")
        wall, cpu, summary = run_demo(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="mauctl-demo-time-") as tmp:
            wall, cpu, summary = run_demo(Path(tmp) / "runs")
    print(table(wall, cpu, summary, (load_before, os.getloadavg()[0]), torch))


if __name__ == "__main__":
    main()
