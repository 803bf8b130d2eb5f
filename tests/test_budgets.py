import doctest
import re

import numpy as np
import pytest
from datasets import Dataset

import lenvm_rl.budgets
from lenvm_rl.budgets import DEFAULT_TEMPLATES, L1_TEMPLATES, add_budgets
from lenvm_rl.tasks import ARITHMETIC_INSTRUCTION, make_arithmetic_dataset


def chat_prompts(n):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]})


def test_docstring_examples():
    assert doctest.testmod(lenvm_rl.budgets).failed == 0


def test_budgets_from_a_list_and_kinds():
    dataset = add_budgets(chat_prompts(300), budgets=[64, 128, 256], kinds=["exact", "at_most", "at_least"])
    assert set(dataset["budget_tokens"]) == {64, 128, 256}
    assert set(dataset["budget_kind"]) == {"exact", "at_most", "at_least"}
    assert all(isinstance(budget, int) for budget in dataset["budget_tokens"])


def test_reproducible_with_a_seed_and_different_across_seeds():
    def draw(seed):
        dataset = add_budgets(chat_prompts(50), budget_range=(16, 1024), kinds=["exact", "at_most"], seed=seed)
        return dataset.to_list()

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


@pytest.mark.parametrize("low, high", [(1, 4), (16, 4096), (100, 100)])
def test_log_uniform_range_inside_bounds(low, high):
    budgets = np.array(add_budgets(chat_prompts(2000), budget_range=(low, high))["budget_tokens"])
    assert budgets.min() >= low and budgets.max() <= high
    if high - low < 10:
        assert set(budgets) == set(range(low, high + 1))  # both ends inclusive


def test_log_uniform_is_uniform_in_log_space():
    budgets = np.array(add_budgets(chat_prompts(4000), budget_range=(16, 4095))["budget_tokens"])
    # [16, 4096) spans 8 doublings: each one holds about an eighth of the draws.
    counts = np.histogram(np.log2(budgets), bins=8, range=(4, 12))[0]
    assert np.all(np.abs(counts / len(budgets) - 1 / 8) < 0.03)


def test_instruction_goes_into_the_last_user_message():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    row = add_budgets(Dataset.from_dict({"prompt": [messages]}), budgets=[40], kinds=["at_least"])[0]
    assert row["prompt"][:3] == messages[:3]
    assert row["prompt"][3] == {"role": "user", "content": "What is 2 + 2?\nAnswer in at least 40 tokens."}


def test_plain_string_prompts_and_other_column():
    dataset = Dataset.from_dict({"question": ["What is 2 + 2?"], "answer": ["4"]})
    row = add_budgets(dataset, budgets=[12], prompt_column="question")[0]
    assert row == {
        "question": "What is 2 + 2?\nAnswer in exactly 12 tokens.",
        "answer": "4",
        "budget_tokens": 12,
        "budget_kind": "exact",
    }


@pytest.mark.parametrize(
    "first, second",
    [
        ({}, {}),
        ({}, {"templates": L1_TEMPLATES, "kinds": ["exact", "at_most"]}),  # one phrasing replaces the other
        ({"templates": L1_TEMPLATES, "kinds": ["at_most"]}, {}),
        ({"templates": {"exact": "Use {N} tokens, please."}}, {"templates": {"exact": "Use {N} tokens, please."}}),
    ],
)
@pytest.mark.parametrize("as_chat", [True, False])
def test_applying_twice_does_not_duplicate_the_instruction(first, second, as_chat):
    dataset = make_arithmetic_dataset(20, seed=0)
    if not as_chat:
        dataset = dataset.map(lambda row: {"prompt": row["prompt"][0]["content"]})
    once = add_budgets(dataset, budgets=[8, 16, 32], seed=0, **first)
    twice = add_budgets(once, budgets=[64, 128, 256], seed=1, **second)
    for row in twice:
        text = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        assert len(re.findall(r"\d+ tokens", text)) == 1
        assert text.endswith(
            f"{ARITHMETIC_INSTRUCTION}\n"
            + (second.get("templates") or DEFAULT_TEMPLATES)[row["budget_kind"]].replace(
                "{N}", str(row["budget_tokens"])
            )
        )
        assert row["budget_tokens"] in (64, 128, 256)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"budgets": [0]}, "budgets"),
        ({"budgets": [-5, 10]}, "budgets"),
        ({"budgets": [12.5]}, "budgets"),
        ({"budgets": []}, "budgets"),
        ({}, "budgets"),  # neither
        ({"budgets": [8], "budget_range": (1, 8)}, "budgets"),  # both
        ({"budget_range": (0, 8)}, "budget_range"),
        ({"budget_range": (9, 8)}, "budget_range"),
        ({"budgets": [8], "kinds": ["roughly"]}, "kinds"),
        ({"budgets": [8], "kinds": []}, "kinds"),
        ({"budgets": [8], "templates": {"exact": "Be brief."}}, "templates"),
        ({"budgets": [8], "kinds": ["at_least"], "templates": L1_TEMPLATES}, "templates"),
        ({"budgets": [8], "prompt_column": "question"}, "prompt_column"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        add_budgets(chat_prompts(3), **kwargs)


def test_prompt_without_a_user_message():
    dataset = Dataset.from_dict({"prompt": [[{"role": "system", "content": "Be brief."}]]})
    with pytest.raises(ValueError, match="^prompt: a prompt has no user message"):
        add_budgets(dataset, budgets=[8])
