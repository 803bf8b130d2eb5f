"""The learning testbed (lenvm_rl/testbed.py, recipes/testbed, benchmarks/testbed.py).

Fast tests check the task, the tokenizer, the SFT rows and the arm recipes. The ``slow`` test is a learning
regression test: the real pipeline (SFT from scratch, ``lenvm-rl rollout``, ``lenvm-rl train-lenvm``, ``lenvm-rl
grpo`` with LenVM budget advantages) must raise the held-out length score clearly while keeping accuracy, which
catches sign and off-by-one errors in the advantage code that shape-only tests miss.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lenvm_rl.budgets import add_budgets
from lenvm_rl.data import DatasetArguments, load_prompt_splits
from lenvm_rl.errors import ConfigError
from lenvm_rl.testbed import (
    ANSWER_MARKER,
    MAX_OPERAND,
    MAX_SOLUTION_TOKENS,
    MIN_SOLUTION_TOKENS,
    PLAN_BUDGETS,
    PLAN_FILLERS,
    PLAN_MAX_STEPS,
    PLAN_MIN_STEPS,
    PLAN_WORDS,
    make_sft_dataset,
    make_testbed_dataset,
    make_tokenizer,
    plan_length,
    write_plan_solution,
    write_solution,
)
from rewards import Accuracy, LengthScore

ROOT = Path(__file__).resolve().parents[1]
ARM_RECIPES = ROOT / "recipes" / "testbed" / "grpo"


def test_problems_are_deterministic_prefixes_with_correct_answers():
    small, large = make_testbed_dataset(20, seed=3), make_testbed_dataset(50, seed=3)
    assert small["prompt"] == large["prompt"][:20]
    for row in large:
        words = row["prompt"][0]["content"].split()
        a, b = int(words[2]), int(words[4])
        assert 0 <= a <= MAX_OPERAND and 0 <= b <= MAX_OPERAND
        assert row["answer"] == str(a + b)


@pytest.mark.parametrize("length", [MIN_SOLUTION_TOKENS, 3, 17, MAX_SOLUTION_TOKENS])
@pytest.mark.parametrize("budget", [8, 16, 32])
def test_solution_has_the_asked_length_in_tokens_and_is_correct(length, budget):
    tokenizer = make_tokenizer()
    for a, b in [(0, 0), (7, 12), (MAX_OPERAND, MAX_OPERAND)]:
        solution = write_solution(a, b, length, budget)
        ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
        assert len(ids) == length and tokenizer.unk_token_id not in ids
        # Step i tracks the budget left if the solution ended after it: the last step is N - L.
        steps = [int(word) for word in solution.split()[: length - 2]]
        assert steps == list(range(budget - 3, budget - length - 1, -1))
        assert Accuracy()(prompts=[""], completions=[solution], completion_ids=[ids], answer=[str(a + b)]) == [1.0]
        wrong = solution.rsplit(" ", 1)[0] + f" {a + b + 1}"
        assert Accuracy()(prompts=[""], completions=[wrong], completion_ids=[ids], answer=[str(a + b)]) == [0.0]


def test_too_short_solution_is_refused():
    with pytest.raises(ConfigError, match="solution_tokens"):
        write_solution(1, 2, MIN_SOLUTION_TOKENS - 1, budget_tokens=8)


def test_budgeted_prompt_is_one_known_token_per_word():
    tokenizer = make_tokenizer()
    prompts = add_budgets(make_testbed_dataset(30), budgets=[8, 16, 32], kinds=["exact", "at_most", "at_least"])
    for row in prompts:
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert len(ids) == len(text.split())  # word-level: the budget N is a single token
        assert str(row["budget_tokens"]) in tokenizer.convert_ids_to_tokens(ids)
        assert text.endswith("<|assistant|>")


def test_tokenizer_round_trip_and_length_reward_count_words(tmp_path):
    from lenvm_rl.loading import load_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    text = f"3 2 1 0 {ANSWER_MARKER} 9"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    score = LengthScore(eos_token_id=tokenizer.eos_token_id)
    assert score(prompts=[""], completions=[text], completion_ids=[ids], budget_tokens=[6], budget_kind=["exact"]) == [
        1.0
    ]


def test_sft_rows_mask_the_prompt_and_draw_lengths_independently_of_the_budget():
    tokenizer = make_tokenizer()
    rows = make_sft_dataset(tokenizer, 600, seed=0)
    budgets = add_budgets(
        make_testbed_dataset(600, seed=0), budgets=[8, 16, 32], kinds=["exact", "at_most", "at_least"], seed=0
    )["budget_tokens"]
    lengths = {8: [], 16: [], 32: []}
    for row, budget in zip(rows, budgets, strict=True):
        prompt_tokens = row["labels"].count(-100)
        assert row["labels"][prompt_tokens:] == row["input_ids"][prompt_tokens:]
        assert row["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.convert_ids_to_tokens(row["input_ids"][prompt_tokens - 1]) == "<|assistant|>"
        length = len(row["input_ids"]) - prompt_tokens - 1  # EOS excluded
        assert MIN_SOLUTION_TOKENS <= length <= MAX_SOLUTION_TOKENS
        lengths[budget].append(length)
    means = [sum(v) / len(v) for v in lengths.values()]
    assert max(means) - min(means) < 4  # the budget does not set the length (uniform mean: 21)


def test_testbed_dataset_name_gives_content_disjoint_held_out_prompts():
    args = DatasetArguments(
        dataset_name="testbed", num_prompts=256, budgets=[8, 16, 32], budget_kinds=["exact", "at_most", "at_least"]
    )
    train, held_out = load_prompt_splits(args, 64)
    assert len(train) == 256 and len(held_out) == 64
    assert {"budget_tokens", "budget_kind", "answer"} <= set(held_out.column_names)
    questions = lambda rows: {p[0]["content"].splitlines()[0] for p in rows["prompt"]}
    assert not questions(train) & questions(held_out)


def load_recipe(name: str) -> dict:
    return yaml.safe_load((ARM_RECIPES / name).read_text())


@pytest.mark.parametrize(
    ("recipe", "base", "changed"),
    [
        ("config_length_score.yaml", "config_accuracy.yaml", {"reward_funcs": ["accuracy", "length_score"]}),
        ("config_lenvm_lambda1.yaml", "config_accuracy.yaml", {"length_objective": "budget"}),
        ("config_lenvm_lambda095.yaml", "config_lenvm_lambda1.yaml", {"length_lambda": 0.95}),
        ("config_lenvm_live.yaml", "config_lenvm_lambda095.yaml", {"lenvm_update": "live"}),
        ("config_lenvm_group.yaml", "config_lenvm_lambda095.yaml", {"length_baseline": "group"}),
        ("config_lenvm_expected.yaml", "config_lenvm_lambda095.yaml", {"length_potential": "expected"}),
    ],
)
def test_arms_differ_in_one_recipe_field(recipe, base, changed):
    arm, reference = load_recipe(recipe), load_recipe(base)
    differing = {k for k in arm.keys() | reference.keys() if arm.get(k) != reference.get(k)} - {"output_dir"}
    assert differing == set(changed)
    assert {k: arm[k] for k in changed} == changed


def test_arm_a_is_correctness_only():
    recipe = load_recipe("config_accuracy.yaml")
    assert recipe["reward_funcs"] == ["accuracy"] and recipe["length_objective"] == "none"


# ------------------------------------------------------------------------------------ learning regression


def run_stage(args: list[str], log: Path) -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
    }
    with log.open("w") as out:
        result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    assert result.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_lenvm_budget_advantages_teach_budgets(tmp_path):
    """One short seed of the recipes' default arm (frozen LenVM, λ = 0.95, A_len scaled by the first batch's std)
    end to end; the sizes are the SLOW_* constants below.

    A budget-blind policy cannot pass: the best single length for the testbed's budget mix (32 tokens) scores
    about 0.59 and the starting policy about 0.6, so a gain of 0.1 needs lengths that depend on the budget.
    """
    recipes = ROOT / "recipes" / "testbed"
    run_stage(["-m", "lenvm_rl.testbed", "--output_dir", str(tmp_path / "sft"), *SLOW_SFT_ARGS], tmp_path / "sft.log")
    run_stage(
        [
            "-m",
            "lenvm_rl",
            "rollout",
            "--config",
            str(recipes / "rollout" / "config_testbed.yaml"),
            "--model_name_or_path",
            str(tmp_path / "sft"),
            "--output_dir",
            str(tmp_path / "rollouts"),
            "--num_prompts",
            "128",
        ],
        tmp_path / "rollout.log",
    )
    run_stage(
        [
            "-m",
            "lenvm_rl",
            "train-lenvm",
            "--config",
            str(recipes / "lenvm" / "config_full.yaml"),
            "--model_name_or_path",
            str(tmp_path / "sft"),
            "--rollouts_path",
            str(tmp_path / "rollouts"),
            "--output_dir",
            str(tmp_path / "lenvm"),
        ],
        tmp_path / "lenvm.log",
    )
    run_stage(
        [
            "-m",
            "lenvm_rl",
            "grpo",
            "--config",
            str(recipes / "grpo" / "config_lenvm_lambda095.yaml"),
            "--model_name_or_path",
            str(tmp_path / "sft"),
            "--lenvm_model_path",
            str(tmp_path / "lenvm"),
            "--output_dir",
            str(tmp_path / "grpo"),
            *DEFAULT_ARM_ARGS,
            *SLOW_GRPO_ARGS,
        ],
        tmp_path / "grpo.log",
    )
    history = json.loads((tmp_path / "grpo" / "trainer_state.json").read_text())["log_history"]
    evals = [row for row in history if "eval_length/mean_length_score" in row]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] > 0
    score_start, score_end = start["eval_length/mean_length_score"], end["eval_length/mean_length_score"]
    accuracy_start, accuracy_end = start["eval_rewards/accuracy/mean"], end["eval_rewards/accuracy/mean"]
    measured = dict(score=(score_start, score_end), accuracy=(accuracy_start, accuracy_end))
    assert score_end >= score_start + SLOW_MIN_SCORE_GAIN, measured
    assert accuracy_end >= accuracy_start - SLOW_MAX_ACCURACY_DROP, measured


# Sizes of the slow test (4 min 16 s on 2 shared CPU cores): a smaller SFT than `make testbed`'s (30,000 rows,
# 2 epochs: sampled accuracy 0.74-0.86), a LenVM on 128 prompts x 8 rollouts, 120 GRPO steps of the default arm
# evaluated on 128 held-out prompts x 4 samples (sampling error about ±0.02). Measured: arm (c) at λ = 1, whitened
# per batch: length score 0.478 -> 0.814, accuracy 0.744 -> 0.672; the default arm: accuracy 0.859 -> 0.750 (the
# demo's former 150-step run of it at lr 1e-4, on 128 x 2: 0.824 -> 0.742; the demo now runs lr 5e-5, issue #28).
# GRPO at this learning rate (1e-4) costs 4-6 points of
# accuracy in the map's arms, the sequence-level one included, and 11 here from a weaker start, hence the 15-point
# allowance (a collapse, like the plan task's 32 points at c = 1, fails it); a sign or off-by-one error in the
# advantages stalls the length score.
SLOW_SFT_ARGS = ["--num_examples", "30000", "--epochs", "2"]
DEFAULT_ARM_ARGS = ["--length_advantage_scale", "first"]  # the model recipes' setting (README "When to use ...")
SLOW_GRPO_ARGS = [
    "--max_steps",
    "120",
    "--eval_steps",
    "60",
    "--eval_num_prompts",
    "128",
    "--num_generations_eval",
    "4",
]
SLOW_MIN_SCORE_GAIN = 0.10
SLOW_MAX_ACCURACY_DROP = 0.15


# ------------------------------------------------------------------------------------ the second task (plan)


@pytest.mark.parametrize("steps", [0, 1, PLAN_MIN_STEPS, PLAN_MAX_STEPS])
def test_plan_solution_length_is_set_by_its_plan_and_fillers_do_not_change_it(steps):
    tokenizer = make_tokenizer("plan")
    texts = {write_plan_solution(5, 9, steps, random.Random(seed), budget_tokens=64) for seed in range(6)}
    if steps >= PLAN_MIN_STEPS:
        assert len(texts) == 6  # the fillers vary from draw to draw
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == plan_length(steps) == 5 + 4 * steps + 2 and tokenizer.unk_token_id not in ids
        words = text.split()
        assert words[:5] == ["64", "plan", str(steps), ":", "14"]
        assert [int(w) for w in words[5:-2:4]] == list(range(steps - 1, -1, -1))  # the countdown
        assert Accuracy()(prompts=[""], completions=[text], completion_ids=[ids], answer=["14"]) == [1.0]


def test_plan_tokenizer_keeps_the_first_tasks_ids():
    first, plan = make_tokenizer(), make_tokenizer("plan")
    assert all(plan.convert_tokens_to_ids(word) == index for word, index in first.get_vocab().items())
    assert len(plan) == len(first) + len(PLAN_WORDS) + len(PLAN_FILLERS)
    with pytest.raises(ConfigError, match="form"):
        make_tokenizer("story")


def test_plan_sft_rows_draw_the_plan_independently_of_the_budget():
    tokenizer = make_tokenizer("plan")
    rows = make_sft_dataset(tokenizer, 600, seed=3, form="plan")
    plans = {budget: [] for budget in PLAN_BUDGETS}
    for row in rows:
        labels = [i for i in row["labels"] if i != -100]
        words = tokenizer.decode(labels[:-1]).split()
        prompt = tokenizer.decode([i for i, l in zip(row["input_ids"], row["labels"]) if l == -100]).split()
        budget = next(int(w) for w in prompt if w.isdigit() and int(w) in PLAN_BUDGETS)  # operands are <= 19
        assert words[:2] == [str(budget), "plan"] and len(words) == plan_length(int(words[2]))
        plans[budget].append(int(words[2]))
    for drawn in plans.values():  # K uniform on 4..24 for every budget: mean 14
        assert PLAN_MIN_STEPS <= min(drawn) and max(drawn) <= PLAN_MAX_STEPS
        assert abs(sum(drawn) / len(drawn) - 14) < 2.0
