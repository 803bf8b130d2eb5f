"""What the two-arm benchmarks (grpo_two_arms.py, ppo_vs_grpo.py) share: running a stage as a subprocess and the
cells of their summary tables."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], log: Path) -> float:
    """Run a stage as a subprocess with its output in ``log``; return its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - start


def mean_over_budgets(summary: list[dict], name: str) -> float:
    return statistics.fmean(s[name] for s in summary)


def seed_cell(values: list[float], fmt: str = ".3f") -> str:
    """A table cell: mean ± sd over seeds, then the per-seed values."""
    spread = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{fmt}}{spread} ({', '.join(format(v, fmt) for v in values)})"
