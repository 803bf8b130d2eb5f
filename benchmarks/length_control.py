"""Issue #6's length-control benchmark on SmolLM2-135M-Instruct: one table for every way to hit a budget.

    python benchmarks/length_control.py        # after `make demo` and benchmarks/grpo_two_arms.py

On the demo's 30 held-out prompts × exact budgets {16, 32, 64} (recipes/SmolLM2-135M-Instruct/evaluate/
config_before_after.yaml, same sampling and seeds for every arm): (a) the base model, (b) hard truncation
at the budget (a cut answer is wrong), (c) LenVM-guided decoding with the demo's LenVM, (d) GRPO with the
length score as a sequence-level reward and (e) GRPO with LenVM budget advantages (the seed-0 adapters of
benchmarks/grpo_two_arms.py, whose evaluation of them and of the base model is reused when present: the same
recipe, prompts and seeds; arms whose adapter is missing are left out). Writes
``<output>/summary.md`` (the table, means over budgets, and each arm's generation ms per token).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "SmolLM2-135M-Instruct" / "evaluate" / "config_before_after.yaml"


def evaluate(output: Path, **overrides) -> dict:
    """`lenvm-rl evaluate` with the demo's recipe and ``overrides`` (written as a recipe beside the output)."""
    recipe = {**yaml.safe_load(RECIPE.read_text()), **overrides, "output_dir": str(output)}
    output.mkdir(parents=True, exist_ok=True)
    path = output.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "lenvm_rl", "evaluate", "--config", str(path)]
    with open(output.with_suffix(".log"), "w") as log:
        if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode != 0:
            sys.exit(f"{' '.join(command)} failed; see {output.with_suffix('.log')}")
    return json.loads((output / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lenvm", default="runs/smollm2/lenvm")
    parser.add_argument("--grpo_runs", type=Path, default=ROOT / "runs" / "bench_two_arms")
    parser.add_argument("--guidance_top_k", type=int, default=8)
    parser.add_argument("--guidance_min_p", type=float, default=0.3)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "length_control")
    parser.add_argument(
        "--reuse_base",
        type=Path,
        default=ROOT / "runs" / "bench_two_arms" / "evaluate" / "generations" / "base.jsonl",
        help="the base model's generations from an evaluation with the same recipe (grpo_two_arms.py's): evaluate "
        "resumes from them instead of sampling the same completions again",
    )
    options = parser.parse_args()

    generations = options.output / "inference" / "generations"
    if options.reuse_base.is_file() and not (generations / "(a)_base.jsonl").exists():
        generations.mkdir(parents=True, exist_ok=True)
        shutil.copy(options.reuse_base, generations / "(a)_base.jsonl")
        shutil.copy(options.reuse_base.with_suffix(".adapter.json"), generations / "(a)_base.adapter.json")
    inference = evaluate(
        options.output / "inference",
        adapters=[],
        labels=["(a) base"],
        hard_truncation=True,
        guided_decoding=True,
        lenvm_model_path=options.lenvm,
        guidance_mode="select",  # the mode its published figures were measured with
        guidance_top_k=options.guidance_top_k,
        guidance_min_p=options.guidance_min_p,
    )
    arms = {
        "(a) base": "(a) base",
        "(b) hard truncation": "(a) base + truncation",
        "(c) LenVM-guided decoding": "(a) base + LenVM-guided",
    }
    results = {name: inference["results"][key] for name, key in arms.items()}
    costs = {name: inference["ms_per_token"][key] for name, key in arms.items()}
    grpo = {
        "(d) GRPO, sequence-level length score": "seq_length_score_seed0",
        "(e) GRPO, LenVM advantages": "lenvm_budget_seed0",
    }
    present = {
        name: options.grpo_runs / run
        for name, run in grpo.items()
        if (options.grpo_runs / run / "adapter_config.json").exists()
    }
    previous = options.grpo_runs / "evaluate" / "results.json"  # grpo_two_arms.py scored these adapters already
    reused = json.loads(previous.read_text()) if previous.is_file() else {"results": {}, "ms_per_token": {}}
    if present and all(run in reused["results"] for run in map(lambda path: path.name, present.values())):
        results.update({name: reused["results"][path.name] for name, path in present.items()})
        costs.update({name: reused["ms_per_token"][path.name] for name, path in present.items()})
    elif present:
        tuned = evaluate(
            options.output / "grpo", include_base=False, adapters=list(map(str, present.values())), labels=list(present)
        )
        results.update(tuned["results"])
        costs.update(tuned["ms_per_token"])

    lines = [
        "| arm | length score | accuracy | mean tokens | hit rate | ms per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, summary in results.items():
        mean = {
            k: sum(s[k] for s in summary) / len(summary)
            for k in ("length_score", "accuracy", "mean_tokens", "hit_rate")
        }
        lines.append(
            f"| {name} | {mean['length_score']:.3f} | {mean['accuracy']:.3f} | {mean['mean_tokens']:.1f} | "
            f"{mean['hit_rate']:.3f} | {costs[name]:.1f} |"
        )
    lines += ["", "Per budget:", ""]
    from lenvm_rl.evaluate import markdown_table

    lines.append(markdown_table(results))
    (options.output / "summary.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
