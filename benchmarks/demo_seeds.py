"""Does the demo's testbed stage keep its policy's accuracy? Its two GRPO arms, exactly as `make demo` runs them
(scripts/demo.py's stages and flags), on several GRPO seeds, evaluated before and after on a held-out set eight times
the demo's (1,024 problems × 2 samples: about ± 0.01 on an accuracy of 0.75, against ± 0.025 in the demo), and beside them
GRPO with the accuracy reward alone (the same flags), which tells GRPO's own drift from the length signal's.

    python benchmarks/demo_seeds.py --seeds 0 1 2 --results docs/results/demo_seeds.json

The policy, its rollouts and its LenVM are the demo's stages (one policy for every seed: the GRPO seed changes the
sampling of training and evaluation). Every stage is skipped when its output exists, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from common import ROOT, machine_record, run  # same folder

sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402 - scripts/demo.py: the demo's own stages and settings

ARMS = {  # label -> the demo's GRPO stage (command, done file, needs)
    "LenVM critic": demo.STAGES["testbed GRPO with the LenVM critic"],
    "sequence-level reward": demo.STAGES["testbed GRPO with the sequence-level reward"],
    # not in the demo: GRPO with the accuracy reward alone, which tells GRPO's own drift from the length signal's
    "accuracy reward only": demo.testbed_grpo("grpo/config_accuracy.yaml", "grpo_accuracy"),
}
SETUP = ["testbed policy", "testbed rollouts", "testbed LenVM"]
EVAL = ["--eval_steps", "200", "--eval_num_prompts", "1024"]  # after the demo's flags: argparse keeps the last


def moved(command: list[str], out: Path) -> list[str]:
    """A demo command writing under ``out`` instead of runs/demo."""
    return [arg.replace(str(demo.RUNS), str(out)) for arg in command]


def evaluations(state: Path) -> list[dict]:
    history = json.loads(state.read_text())["log_history"]
    return [row for row in history if "eval_rewards/accuracy/mean" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "demo_seeds")
    parser.add_argument("--results", type=Path, default=None)
    options = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    (options.output / "logs").mkdir(parents=True, exist_ok=True)
    for name in SETUP:
        command, done, _ = demo.STAGES[name]
        if not Path(moved([str(done)], options.output)[0]).exists():
            print(f"demo_seeds: {name}", flush=True)
            run(moved(command, options.output), options.output / "logs" / f"{name.replace(' ', '_')}.log")
    result = {
        "command": " ".join(["python", "benchmarks/demo_seeds.py", *sys.argv[1:]]),
        "machine": machine_record(),
        "demo_flags": demo.TESTBED_GRPO,
        "evaluation": "1024 held-out problems x 2 samples at step 0 and step 200",
        "arms": {},
    }
    for label, (command, done, _) in ARMS.items():
        rows = []
        for seed in options.seeds:
            folder = Path(moved([str(done.parent)], options.output)[0] + f"_seed{seed}")
            if not (folder / "trainer_state.json").exists():
                print(f"demo_seeds: {label}, seed {seed}", flush=True)
                seeded = [*moved(command, options.output), *EVAL, "--seed", str(seed), "--output_dir", str(folder)]
                run(seeded, options.output / "logs" / f"{folder.name}.log")
            first, last = evaluations(folder / "trainer_state.json")[0], evaluations(folder / "trainer_state.json")[-1]
            rows.append(
                {
                    "seed": seed,
                    "accuracy_before": first["eval_rewards/accuracy/mean"],
                    "accuracy_after": last["eval_rewards/accuracy/mean"],
                    "length_score_before": first["eval_length/mean_length_score"],
                    "length_score_after": last["eval_length/mean_length_score"],
                    "steps": last["step"],
                }
            )
        changes = [r["accuracy_after"] - r["accuracy_before"] for r in rows]
        result["arms"][label] = {
            "runs": rows,
            "accuracy_change_mean": statistics.fmean(changes),
            "accuracy_change_per_seed": changes,
            # binomial standard error of one evaluation's accuracy (2,048 completions; a lower bound: a problem's
            # two samples correlate)
            "accuracy_standard_error": math.sqrt((p := rows[0]["accuracy_before"]) * (1 - p) / 2048),
        }
    print(json.dumps(result, indent=2))
    if options.results:
        options.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
