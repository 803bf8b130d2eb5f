"""What the frozen-layer cache saves a top-layer LenVM: `lenvm-rl train-lenvm` with `cache_frozen_layers` false and
true on the same rollouts, alternated, one thread each, and the held-out MRE of both (the cache must not change it).

    python benchmarks/trunk_cache.py --rollouts runs/smollm2/rollouts --eval_rollouts runs/smollm2/rollouts_eval

Writes docs/results/trunk_cache.json (with --results) and prints the table row of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

from common import ROOT, machine_record, run  # same folder

RECIPE = ROOT / "recipes" / "SmolLM2-135M-Instruct" / "lenvm" / "config_top_layers.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rollouts", type=Path, required=True)
    parser.add_argument("--eval_rollouts", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "trunk_cache")
    parser.add_argument("--repeats", type=int, default=1, help="pairs of runs (false, true), alternated")
    parser.add_argument("--results", type=Path, default=None)
    options = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    options.output.mkdir(parents=True, exist_ok=True)
    runs = {"false": [], "true": []}
    load = [os.getloadavg()]
    for repeat in range(options.repeats):
        for choice in ("false", "true") if repeat % 2 == 0 else ("true", "false"):
            out = options.output / f"{choice}_{repeat}"
            command = [
                sys.executable, "-m", "lenvm_rl", "train-lenvm", "--config", str(RECIPE),
                "--rollouts_path", str(options.rollouts), "--eval_rollouts_path", str(options.eval_rollouts),
                "--output_dir", str(out), "--overwrite_output_dir", "true", "--cache_frozen_layers", choice,
            ]  # fmt: skip
            wall = run(command, options.output / f"{choice}_{repeat}.log")
            state = json.loads((out / "eval_results.json").read_text())
            log = (options.output / f"{choice}_{repeat}.log").read_text()
            train_s = float(re.search(r"'train_runtime': '([0-9.]+)'", log).group(1))
            runs[choice].append({"wall_s": wall, "train_s": train_s, "boundary_mre": state["eval_boundary_mre"]})
            load.append(os.getloadavg())
    medians = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    train_medians = {k: statistics.median(r["train_s"] for r in v) for k, v in runs.items()}
    result = {
        "command": " ".join(["python", "benchmarks/trunk_cache.py", *sys.argv[1:]]),
        "machine": machine_record(),
        "threads": 1,
        "load_average_before_and_after_each_run": load,
        "recipe": str(RECIPE.relative_to(ROOT)),
        "runs": runs,
        "median_wall_s": medians,
        "median_train_s": train_medians,
        "speedup_stage": medians["false"] / medians["true"],
        "speedup_training": train_medians["false"] / train_medians["true"],
    }
    print(json.dumps(result, indent=2))
    if options.results:
        options.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
