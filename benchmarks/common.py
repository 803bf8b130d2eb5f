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


def machine_record() -> str:
    """The CPU as lscpu names it, the kind of its matrix units (AMX / AVX512-BF16 / AVX512 / AVX2), cores, torch."""
    import platform

    import torch

    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model, flags = fields.get("Model name", platform.processor()).strip(), set(fields.get("Flags", "").split())
    kind = next(
        (
            k
            for f, k in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2"))
            if f in flags
        ),
        "no AVX2",
    )
    return f"{model} ({kind}), {os.cpu_count()} cores, torch {torch.__version__}"
