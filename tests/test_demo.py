"""scripts/demo.py: every stage's command parses with its stage's parser (a stale flag fails here, not 10 minutes
into `make demo`), and every stage it waits for exists and comes before it."""

import importlib.util

import pytest
from conftest import ROOT
from trl import ModelConfig

from lenvm_rl.evaluate import EvaluateArguments
from lenvm_rl.grpo import LenVMGRPOConfig
from lenvm_rl.predict_length import PredictArguments
from lenvm_rl.recipe import parse_recipe
from lenvm_rl.rollout import RolloutArguments
from lenvm_rl.train_lenvm import LenVMScriptArguments, LenVMTrainingConfig
from lenvm_rl.train_policy import GRPOScriptArguments

PARSERS = {
    "rollout": (RolloutArguments, ModelConfig),
    "train-lenvm": (LenVMScriptArguments, LenVMTrainingConfig, ModelConfig),
    "evaluate": (EvaluateArguments,),
    "predict-length": (PredictArguments,),
    "grpo": (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig),
}


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO = load_demo()


@pytest.mark.parametrize("name", list(DEMO.STAGES))
def test_stage_commands_parse_and_needs_come_first(name, tmp_path, monkeypatch):
    monkeypatch.setattr(DEMO, "EVALUATE_RECIPE", tmp_path / "evaluate.yaml")
    DEMO.write_evaluate_recipe()
    command, _, needs = DEMO.STAGES[name]
    command = [
        str(tmp_path / "evaluate.yaml") if part == str(DEMO.RUNS / "smollm2" / "config_base_model.yaml") else part
        for part in command
    ]
    order = list(DEMO.STAGES)
    assert all(order.index(need) < order.index(name) for need in needs)
    if command[1:3] == ["-m", "lenvm_rl.testbed"]:
        from transformers import HfArgumentParser

        from lenvm_rl.testbed import TestbedSFTArguments

        HfArgumentParser(TestbedSFTArguments).parse_args_into_dataclasses(command[3:])
        return
    start = command.index("lenvm_rl") + 1  # after `python -m` or a two-process `accelerate launch ... -m`
    stage, flags = command[start], command[start + 1 :]
    if command[2] == "accelerate.commands.launch":  # the shipped two-process CPU config, on a free port
        assert stage in ("rollout", "evaluate") and (ROOT / "accelerate_configs" / "cpu_2proc.yaml").is_file()
    parsed = parse_recipe(
        PARSERS[stage],
        [*flags, "--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "false"]
        if stage in ("train-lenvm", "grpo")
        else [*flags, "--output_dir", str(tmp_path)],
    )
    if stage == "evaluate":  # the base model alone: the recipe's GRPO adapter is not made by the demo
        assert parsed[0].adapters == [] and parsed[0].models() == [None]


def test_progress_reads_the_last_tqdm_position(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text(
        "rollouts:  10%|#  | 5/48 [00:10<01:26, 2.0s/prompt]\rrollouts:  21%|## | 10/48 [00:20<01:16, 2.0s/prompt]"
    )
    assert DEMO.progress(log) == "10/48, ETA 01:16"
    assert DEMO.progress(tmp_path / "missing.log") == "starting"
    # A saving bar after the stage's own bar is not the stage's progress (it showed "64/64, ETA 00:00" for minutes).
    with log.open("a") as handle:
        handle.write(
            "\nSaving the dataset (1/1 shards): 100%|##########| 64/64 [00:00<00:00, 12468.55 examples/s]\n"
            "Loading weights: 100%|##########| 272/272 [00:00<00:00, 8887.48it/s]\n"
        )
    assert DEMO.progress(log) == "10/48, ETA 01:16"


def test_report_tables_read_the_stages_outputs(tmp_path, monkeypatch):
    import json

    from lenvm_rl.evaluate import summarize

    monkeypatch.setattr(DEMO, "RUNS", tmp_path)
    records = lambda tokens: [
        {"budget_kind": "exact", "budget_tokens": n, "tokens": t, "correct": True, "finished": True}
        for n, t in zip((16, 32, 64), tokens)
    ]
    for arm, label, tokens in (("plain", "base", (40, 40, 40)), ("guided", "base + LenVM-guided", (16, 32, 64))):
        (tmp_path / "smollm2" / arm).mkdir(parents=True)
        (tmp_path / "smollm2" / arm / "results.json").write_text(
            json.dumps({"results": {label: summarize(records(tokens))}})
        )
    table = DEMO.length_control_table()
    assert "| base + LenVM-guided | 1.000 | 1.000 | 37.3 (16.0 / 32.0 / 64.0) | 1.000 |" in table
    (tmp_path / "smollm2" / "lenvm").mkdir(parents=True)
    (tmp_path / "smollm2" / "lenvm" / "eval_results.json").write_text(
        json.dumps({"eval_boundary_mre": 0.2, "eval_constant_mre": 0.5, "eval_constant_value_mre": 0.3})
    )
    assert "| 0.200 |" in DEMO.prediction_table()
    # Two arms from the same start, logged every 5 steps (20 tokens a completion, 32 completions a step): the LenVM
    # arm passes 0.8 at step 50 (50 x 32 x 20 = 32k tokens), the sequence-level one at step 100 (64k).
    for folder, reach in (("grpo", 50), ("grpo_length_score", 100)):
        (tmp_path / "testbed" / folder).mkdir(parents=True)
        train = [{"step": s, "loss": 0.1, "completions/mean_length": 20.0} for s in range(5, 151, 5)]
        evals = [
            {
                "step": s,
                "eval_length/mean_length_score": 0.5 if s < reach else 0.9,
                "eval_rewards/accuracy/mean": 0.8,
                "eval_length/budget_hit_rate": 0.5,
                "eval_completions/mean_length": 20.0,
            }
            for s in range(0, 151, 25)
        ]
        history = sorted(train + evals, key=lambda row: row["step"])
        (tmp_path / "testbed" / folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    table = DEMO.testbed_table_and_curve()
    assert "| before (step 0) | 0.500 | 0.800 |" in table
    assert "| after GRPO + LenVM critic (step 150) | 0.900 | 0.800 | 0.500 | 20.000 | 32k |" in table
    assert "| after GRPO + sequence-level length reward (step 150) | 0.900 | 0.800 | 0.500 | 20.000 | 64k |" in table
    assert (tmp_path / "testbed" / "learning_curve.png").stat().st_size > 5_000


def test_readme_first_screen_takes_a_demo_summary_verbatim():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    update = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(update)
    readme = "intro\n<!-- demo-summary:start (scripts/update_readme.py --demo) -->\nold table\n<!-- demo-summary:end -->\nrest"
    text = update.render_demo(readme, "| a | b |\n|---|---|\n| 1 | 2 |\n\nWall time 9.0 min on 2 cores\n")
    assert text == (
        "intro\n<!-- demo-summary:start (scripts/update_readme.py --demo) -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "Wall time 9.0 min on 2 cores\n<!-- demo-summary:end -->\nrest"
    )
    assert update.render_demo(text, "new\n") == readme.replace("old table", "new")
    with pytest.raises(SystemExit, match="demo-summary"):
        update.render_demo("no block", "x")
    assert "<!-- demo-summary:start" in (ROOT / "README.md").read_text()  # the README's first screen has the block
