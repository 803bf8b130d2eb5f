import doctest
import re

import pytest

import lenvm_rl.tasks
from lenvm_rl.tasks import ARITHMETIC_INSTRUCTION, WORD_PROBLEMS, make_arithmetic_dataset
from rewards import get_reward, is_correct

EXPRESSION = re.compile(r"What is (\d+ [-+*] \d+)\?")


def word_problem_answer(question):
    """Recompute a word problem's answer from the template it was written from."""
    for template, operation in WORD_PROBLEMS:
        pattern = re.escape(template).replace(r"\{name\}", r"\w+")
        pattern = pattern.replace(r"\{a\}", r"(\d+)").replace(r"\{b\}", r"(\d+)")
        if match := re.fullmatch(pattern, question):
            return eval(f"{match[1]} {operation} {match[2]}")
    raise AssertionError(f"no template wrote {question!r}")


def questions(dataset):
    return [row["prompt"][0]["content"].removesuffix(f"\n{ARITHMETIC_INSTRUCTION}") for row in dataset]


def test_docstring_examples():
    assert doctest.testmod(lenvm_rl.tasks).failed == 0


def test_columns_and_chat_format():
    dataset = make_arithmetic_dataset(20, seed=3)
    assert dataset.column_names == ["prompt", "answer"] and len(dataset) == 20
    for row in dataset:
        assert [message["role"] for message in row["prompt"]] == ["user"]
        assert row["prompt"][0]["content"].endswith(ARITHMETIC_INSTRUCTION)
        assert isinstance(row["answer"], str) and int(row["answer"]) >= 0


@pytest.mark.parametrize("difficulty", ["easy", "medium", "word", "mixed"])
def test_answers_are_correct(difficulty):
    dataset = make_arithmetic_dataset(200, seed=1, difficulty=difficulty)
    for question, answer in zip(questions(dataset), dataset["answer"], strict=True):
        match = EXPRESSION.fullmatch(question)
        assert int(answer) == (eval(match[1]) if match else word_problem_answer(question))
        assert is_correct(f"Let me compute.\n#### {answer}", answer)
        assert not is_correct(f"#### {int(answer) + 1}", answer)
    accuracy = get_reward("accuracy")
    completions = [f"#### {answer}" for answer in dataset["answer"]]
    assert accuracy(dataset["prompt"], completions, [[1]] * len(dataset), answer=dataset["answer"]) == [1.0] * 200


@pytest.mark.parametrize(
    "difficulty, pattern",
    [
        ("easy", r"What is [2-9] \* [2-9]\?"),
        ("medium", r"What is [1-9]\d [-+] [1-9]\d\?"),
        ("word", r"(?!What is)[A-Z][^*]*\?"),
    ],
)
def test_difficulty_picks_the_problem_kind(difficulty, pattern):
    assert all(re.fullmatch(pattern, q) for q in questions(make_arithmetic_dataset(100, seed=0, difficulty=difficulty)))


def test_mixed_draws_every_kind():
    kinds = {
        "easy" if "*" in q else "medium" if q.startswith("What is") else "word"
        for q in questions(make_arithmetic_dataset(60, seed=0))
    }
    assert kinds == {"easy", "medium", "word"}


def test_deterministic_for_a_seed_and_prefix_stable():
    assert make_arithmetic_dataset(30, seed=7).to_list() == make_arithmetic_dataset(30, seed=7).to_list()
    assert make_arithmetic_dataset(30, seed=7).to_list() != make_arithmetic_dataset(30, seed=8).to_list()
    # A larger request starts with the same problems, so held-out sets can take the next slice.
    assert make_arithmetic_dataset(10, seed=7).to_list() == make_arithmetic_dataset(30, seed=7).to_list()[:10]


@pytest.mark.parametrize(
    "kwargs, field", [({"num_prompts": 0}, "num_prompts"), ({"num_prompts": 5, "difficulty": "hard"}, "difficulty")]
)
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        make_arithmetic_dataset(**kwargs)
