import doctest
import json
import math
import pickle
import re
from pathlib import Path

import pytest
from conftest import make_tokenizer

import rewards
import rewards.correctness
import rewards.format
import rewards.length
from rewards import REWARDS, extract_final_answer, get_reward, is_correct

GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"
# Parameters for the rewards that have required ones.
REQUIRED_PARAMS = {
    "soft_overlong": {"max_completion_tokens": 100, "soft_cache_tokens": 20},
    "cosine_length": {"max_completion_tokens": 100},
    "thinking_length_score": {"tokenizer": make_tokenizer()},
    "answer_length_score": {"tokenizer": make_tokenizer()},
}
# A batch with every column any built-in reward reads, plus the kwargs TRL adds.
BATCH = {
    "prompts": ["p1", "p2", "p3"],
    "completions": ["2 + 2 = 4\n#### 4", "so \\boxed{5}", ""],
    "completion_ids": [[5] * 8, [5] * 30, []],
    "answer": ["4", "#### 6", "4"],
    "budget_tokens": [8, 16, 32],
    "budget_kind": ["exact", "at_most", "at_least"],
}
# What the thinking-segment reward reads besides (tests/test_segments.py has the segment rewards' own tests).
THINKING_COLUMNS = {"thinking_budget_tokens": [4, 8, 16], "thinking_budget_kind": ["at_most"] * 3}
TRL_KWARGS = {"trainer_state": None, "log_extra": lambda *a: None, "log_metric": lambda *a: None}


def make(name, **params):
    return get_reward(name, **{**REQUIRED_PARAMS.get(name, {}), **params})


def call(reward, lengths, **columns):
    """Call ``reward`` on plain completions of the given token lengths."""
    n = len(lengths)
    return reward(
        prompts=["p"] * n,
        completions=columns.pop("completions", [""] * n),
        completion_ids=[[5] * length for length in lengths],
        **columns,
    )


@pytest.mark.parametrize("module", [rewards, rewards.correctness, rewards.format, rewards.length])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


# --- the answer checker -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, correct",
    [
        ("#### 72", "72", True),
        ("#### 72", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", True),
        ("#### 73", "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", False),
        ("#### 1,000", "1000", True),
        ("The total is $1,000.", "#### 1,000", True),
        ("#### 3.0", "3", True),
        ("#### 3.5", "3", False),
        ("#### -5", "-5", True),
        ("#### 5", "-5", False),
        ("x = -3.50 dollars", "-3.5", True),
        ("10-2 = 8", "8", True),  # a hyphen after a digit is a minus sign, not a sign of 2
        ("The answer is 72 apples.", "72", True),
        ("#### 72 apples\nThanks!", "72", True),
        ("#### 12, then 13 more", "12", True),  # the first number after ####, not the last
        ("", "72", False),
        ("no number here", "72", False),
        ("####", "72", False),
        ("\\boxed{72}", "72", True),
        ("\\boxed{1,000}", "1000", True),
        ("\\boxed{\\frac{144}{2}}", "#### 72", True),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{3}", True),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}", False),
        ("first \\boxed{3}, finally #### 4", "4", True),  # the later marker wins
        ("#### 4, but really \\boxed{3}", "4", False),
    ],
)
def test_is_correct(completion, answer, correct):
    assert is_correct(completion, answer) is correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("#### 1,080", "1080"),
        ("pay $-4.50.", "-4.50"),
        ("12,13", "13"),
        ("\\boxed{x + 1}", "x + 1"),
        ("none", None),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.skipif(not GSM8K_TEST.is_file(), reason="GSM8K test split not on this machine")
def test_is_correct_accepts_every_gsm8k_reference():
    rows = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]
    for row in rows:
        final = row["answer"].split("####")[-1].strip().replace(",", "")
        assert is_correct(f"So the answer is:\n#### {final}", row["answer"]), row["answer"]
        assert is_correct(row["answer"], row["answer"])
        assert not is_correct(f"#### {int(final) + 1}", row["answer"])


def test_accuracy_needs_the_answer_column():
    with pytest.raises(ValueError, match="accuracy needs the dataset column 'answer'"):
        call(make("accuracy"), [3], completions=["#### 4"])


# --- length rewards: L = 0, L = N, very large L ---------------------------------------------------


@pytest.mark.parametrize(
    "name, params, lengths, columns, expected",
    [
        (
            "length_score",
            {},
            [0, 16, 100_000],
            {"budget_tokens": [16] * 3, "budget_kind": ["exact"] * 3},
            [math.exp(-5), 1.0, 0.0],
        ),
        (
            "length_score",
            {},
            [0, 16, 32],
            {"budget_tokens": [16] * 3, "budget_kind": ["at_most"] * 3},
            [1.0, 1.0, math.exp(-2)],
        ),
        (
            "length_score",
            {},
            [0, 16, 32],
            {"budget_tokens": [16] * 3, "budget_kind": ["at_least"] * 3},
            [math.exp(-5), 1.0, 1.0],
        ),
        ("l1_exact", {}, [0, 100, 100_000], {"budget_tokens": [100] * 3}, [-0.03, 0.0, -29.97]),
        ("l1_exact", {}, [0], {"budget_tokens": [100], "budget_kind": ["at_most"]}, [-0.03]),  # kind ignored
        ("l1_max", {}, [0, 100, 100_000], {"budget_tokens": [100] * 3}, [0.53, 0.5, 0.0]),
        ("l1_max", {"alpha": 0.01}, [0, 50, 150], {"budget_tokens": [100] * 3}, [1.0, 1.0, 0.0]),
        ("soft_overlong", {}, [0, 80, 90, 100, 100_000], {}, [0.0, 0.0, -0.5, -1.0, -1.0]),
        (
            "cosine_length",
            {},
            [0, 50, 100, 100_000],
            {"answer": ["4"] * 4, "completions": ["#### 4"] * 4},
            [1.0, 0.75, 0.5, 0.5],
        ),
        (
            "cosine_length",
            {},
            [0, 50, 100, 100_000],
            {"answer": ["4"] * 4, "completions": ["#### 5"] * 4},
            [-1.0, -0.75, -0.5, -0.5],
        ),
    ],
)
def test_length_rewards(name, params, lengths, columns, expected):
    assert call(make(name, **params), lengths, **columns) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "eos_token_id, ids, length",
    [(2, [5, 5, 2], 2), (2, [2], 0), (2, [], 0), (2, [5, 2, 5], 3), ([2, 3], [5, 3], 1), (None, [5, 5, 2], 3)],
)
def test_trailing_eos_is_not_counted(eos_token_id, ids, length):
    reward = make("l1_exact", alpha=1.0, eos_token_id=eos_token_id)
    assert reward(prompts=["p"], completions=[""], completion_ids=[ids], budget_tokens=[100]) == [length - 100]


@pytest.mark.parametrize("name", ["length_score", "l1_exact", "l1_max"])
def test_missing_budget_column_names_column_and_fix(name):
    with pytest.raises(ValueError, match=rf"{name} needs the dataset column 'budget_tokens' \(add budgets"):
        call(make(name), [3], budget_kind=["exact"])


def test_length_score_needs_budget_kind():
    with pytest.raises(ValueError, match="length_score needs the dataset column 'budget_kind'"):
        call(make("length_score"), [3], budget_tokens=[8])


@pytest.mark.parametrize(
    "columns, field",
    [
        ({"budget_tokens": [8], "budget_kind": ["roughly"]}, "budget_kind"),
        ({"budget_tokens": [0], "budget_kind": ["exact"]}, "budget_tokens"),
    ],
)
def test_bad_budget_values(columns, field):
    with pytest.raises(ValueError, match=field):
        call(make("length_score"), [3], **columns)


@pytest.mark.parametrize(
    "params",
    [{"max_completion_tokens": 100, "soft_cache_tokens": 0}, {"max_completion_tokens": 10, "soft_cache_tokens": 20}],
)
def test_soft_overlong_validates_cache(params):
    with pytest.raises(ValueError, match="soft_cache_tokens"):
        get_reward("soft_overlong", **params)


# --- format -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, score",
    [
        ("7 * 6 = 42\n#### 42", 1.0),
        ("#### -1,000.", 1.0),
        ("  #### $12\nbye", 1.0),
        ("\\boxed{\\frac{1}{2}}", 1.0),
        ("", 0.0),
        ("42", 0.0),
        ("#### forty-two", 0.0),
        ("the #### 42 inline", 0.0),
        ("\\boxed{ }", 0.0),
    ],
)
def test_answer_format(completion, score):
    assert call(make("answer_format"), [1], completions=[completion]) == [score]


# --- the contract, for every registered reward --------------------------------------------------


@pytest.mark.parametrize("name", REWARDS)
def test_contract(name):
    reward = make(name)
    assert reward.__name__ == name
    batch = {**BATCH, **THINKING_COLUMNS} if "thinking_budget_tokens" in reward.columns else BATCH
    out = reward(**batch, **TRL_KWARGS, some_other_column=[1, 2, 3])  # extra kwargs are ignored
    assert len(out) == len(batch["completions"]) and all(isinstance(x, float) for x in out)
    chat = [[{"role": "assistant", "content": c}] for c in batch["completions"]]
    assert reward(**{**batch, "completions": chat}) == out
    restored = pickle.loads(pickle.dumps(reward))
    assert restored.__name__ == name and restored(**batch) == out


def test_accuracy_on_the_batch():
    assert make("accuracy")(**BATCH) == [1.0, 0.0, 0.0]


# --- registry -----------------------------------------------------------------------------------


def test_get_reward_by_path():
    reward = get_reward("rewards.length:L1Max", alpha=0.01)
    assert reward.__name__ == "l1_max" and reward.alpha == 0.01
    assert get_reward("rewards.correctness:is_correct").reward is is_correct  # a user's function, checked


def user_reward(completions, **kwargs):
    return kwargs["values"]


async def async_user_reward(completions, **kwargs):
    return kwargs["values"]


@pytest.mark.parametrize(
    "values, problem",
    [
        ([1.0, 0.5], "returned 2 rewards for 3 completions; return one number (or None) per completion"),
        ("1.0", "returned a str, not a list"),
        ([1.0, "0.5", 0.0], "returned str '0.5' for completion 1; return a number, or None for no reward"),
        ([1.0, 0.0, math.nan], "returned nan for completion 2; return finite numbers, or None where a completion"),
        ([math.inf, 0.0, 1.0], "returned inf for completion 0; return finite numbers"),
    ],
)
@pytest.mark.parametrize("name", ["user_reward", "async_user_reward"])
def test_a_user_rewards_output_is_checked(name, values, problem):
    """One line naming the reward for the wrong count, a string, NaN or inf; None (no reward) and numbers of any
    numeric type pass. The wrapped reward keeps its name (TRL logs under it), its async-ness, and pickles."""
    import asyncio

    import numpy as np
    import torch

    reward = get_reward(f"test_rewards:{name}")
    call = (lambda **kw: asyncio.run(reward(**kw))) if name.startswith("async") else reward
    assert reward.__name__ == name and pickle.loads(pickle.dumps(reward)).__name__ == name
    fine = [1, None, np.float32(0.5)]
    assert call(prompts=["p"] * 3, completions=["a", "b", "c"], values=fine) == fine
    assert call(prompts=["p"] * 3, completions=["a", "b", "c"], values=[torch.tensor(2.0), 0.0, True]) == [
        2.0,
        0.0,
        True,
    ]
    with pytest.raises(ValueError, match=f"^reward_funcs: 'test_rewards:{name}' {re.escape(problem)}"):
        call(prompts=["p"] * 3, completions=["a", "b", "c"], values=values)


def test_get_reward_user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(
        "def brevity(prompts, completions, completion_ids, **kwargs):\n"
        "    return [-len(ids) / 100 for ids in completion_ids]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = get_reward("my_user_rewards:brevity")
    assert reward.__name__ == "brevity" and reward(**BATCH) == [-0.08, -0.3, 0.0]
    with pytest.raises(ValueError, match="takes no parameters"):
        get_reward("my_user_rewards:brevity", scale=2)


@pytest.mark.parametrize("spec", ["xyz", "no_such_module:fn", "rewards.length:no_such_reward", ":fn"])
def test_get_reward_unknown(spec):
    with pytest.raises(ValueError, match=rf"reward_funcs: unknown reward '{spec}'; known: accuracy, .*module:function"):
        get_reward(spec)


@pytest.mark.parametrize("spec, params", [("l1_exact", {"alhpa": 1}), ("soft_overlong", {"max_completion_tokens": 9})])
def test_get_reward_bad_params(spec, params):
    with pytest.raises(ValueError, match=f"reward_funcs: bad parameters for '{spec}'"):
        get_reward(spec, **params)


def test_description_comes_from_the_registry():
    rows = rewards.describe_rewards()
    assert [row["name"] for row in rows] == list(REWARDS)
    assert all(row["formula"] for row in rows)
    assert rows[list(REWARDS).index("length_score")]["columns"] == ["budget_tokens", "budget_kind"]
    table = rewards.rewards_markdown_table().splitlines()
    assert len(table) == 2 + len(REWARDS)
    assert all(line.count(" | ") == 3 for line in table)  # no "|" in a formula splits a cell
