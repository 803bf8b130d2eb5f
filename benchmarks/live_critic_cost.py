"""What the live critic costs (issue 17): the same GRPO recipe with ``lenvm_update: frozen`` and ``live``, a few steps
each, one after the other on the same machine; the live update's seconds against TRL's ``step_time`` (generation,
scoring, the policy's forward and backward).

The LenVM is ``--lenvm`` or, when that is not given, a fresh LenVM of the policy's own size (its backbone with a
new head, γ 0.99): an update costs the same whatever the weights hold, so the demo's trained LenVM is not needed.

    python benchmarks/live_critic_cost.py                                  # SmolLM2-135M, LoRA policy, 3 steps
    python benchmarks/live_critic_cost.py --recipe recipes/testbed/grpo/config_lenvm_lambda095.yaml \\
        --lenvm runs/testbed/lenvm --override model_name_or_path=runs/testbed/sft --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def fresh_lenvm(model_name_or_path: str, path: Path) -> Path:
    """A LenVM of the policy's size (backbone + new head) saved with the policy's tokenizer, made once."""
    if (path / "config.json").exists():
        return path
    from lenvm_rl.loading import load_causal_lm, load_tokenizer
    from lenvm_rl.modeling import LenVMModel

    LenVMModel.from_backbone(load_causal_lm(model_name_or_path, dtype="float32"), gamma=0.99).save_pretrained(path)
    load_tokenizer(model_name_or_path).save_pretrained(path)
    return path


def run(recipe: str, lenvm: Path, update: str, args, output_dir: Path) -> dict:
    overrides = {
        "lenvm_model_path": lenvm,
        "lenvm_update": update,
        "max_steps": args.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "eval_on_start": "false",
        "disable_tqdm": "true",
        "output_dir": output_dir,
        **dict(item.split("=", 1) for item in args.override),
    }
    command = [
        sys.executable,
        "-m",
        "lenvm_rl",
        "grpo",
        "--config",
        recipe,
        *[part for key, value in overrides.items() for part in (f"--{key}", str(value))],
    ]
    log = output_dir.with_suffix(".log")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        if subprocess.run(
            command, cwd=ROOT, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT
        ).returncode:
            sys.exit(f"live_critic_cost: {update} run failed; see {log}")
    rows = [
        row for row in json.loads((output_dir / "trainer_state.json").read_text())["log_history"] if "step_time" in row
    ]
    rows = rows[1:] if len(rows) > 2 else rows  # the first step also warms up allocators and caches
    median = lambda key: statistics.median(row[key] for row in rows) if all(key in row for row in rows) else None
    return {
        "step_time_s": median("step_time"),
        "scoring_time_s": median("length/scoring_time_s"),
        "critic_update_time_s": median("length/critic_update_time_s"),
        "steps_measured": len(rows),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/SmolLM2-135M-Instruct/grpo/config_lenvm_budget.yaml")
    parser.add_argument("--lenvm", default=None, help="a LenVM folder; default: a fresh one of the policy's size")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--override", nargs="*", default=[], help="field=value for both runs")
    parser.add_argument("--output", default="runs/live_critic_cost")
    args = parser.parse_args(argv)
    import yaml

    recipe = yaml.safe_load((ROOT / args.recipe).read_text())
    model = dict(item.split("=", 1) for item in args.override).get("model_name_or_path", recipe["model_name_or_path"])
    output = ROOT / args.output / Path(args.recipe).parent.parent.name
    lenvm = Path(args.lenvm) if args.lenvm else fresh_lenvm(model, output / "lenvm_fresh")
    results = {update: run(args.recipe, lenvm, update, args, output / update) for update in ("frozen", "live")}
    frozen, live = results["frozen"], results["live"]
    results["update_share_of_live_step"] = live["critic_update_time_s"] / live["step_time_s"]
    results["live_over_frozen_step"] = live["step_time_s"] / frozen["step_time_s"]
    (output / "cost.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
