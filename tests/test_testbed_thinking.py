"""The testbed's third task, think then answer (lenvm_rl/testbed_thinking.py, ``form: think``): each segment has the
length its steps say, split as the segment rewards split it, the tokenizer writes every word, and the SFT data draws
both lengths independently of both budgets."""

import pytest

from lenvm_rl.testbed import form_max_tokens, make_sft_dataset, make_tokenizer, sample_accuracy
from lenvm_rl.testbed_thinking import THINK_ANSWER_BUDGETS, THINK_BUDGETS, write_thinking_solution
from lenvm_rl.thinking import SegmentRecorder
from rewards.correctness import is_correct
from rewards.segments import THINKING_MARKERS


@pytest.mark.parametrize(("thinking_steps", "answer_steps"), [(0, 0), (6, 2), (14, 10), (22, 0)])
def test_each_segment_has_the_length_its_steps_say(thinking_steps, answer_steps):
    tokenizer = make_tokenizer("think")
    text = write_thinking_solution(3, 4, thinking_steps, answer_steps, thinking_budget=8, answer_budget=4)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text
    segments = SegmentRecorder(tokenizer, THINKING_MARKERS, False)(ids)
    assert segments == {
        "thinking_tokens": thinking_steps + 2,
        "answer_tokens": answer_steps + 2,
        "thinking_closed": True,
    }
    assert is_correct(text, "7")
    # The step "0" is the last one exactly when the segment meets its budget: T = 8 after 6 steps, A = 4 after 2.
    if (thinking_steps, answer_steps) == (6, 2):
        assert text == "<think> 5 4 3 2 1 0 </think> 1 0 #### 7"


def test_think_tokenizer_keeps_the_first_tasks_ids():
    first, think = make_tokenizer(), make_tokenizer("think")
    assert all(think.get_vocab()[word] == i for word, i in first.get_vocab().items())
    assert len(think) > len(first)


def test_sft_rows_carry_both_budgets_and_lengths_drawn_independently_of_them():
    tokenizer = make_tokenizer("think")
    rows = make_sft_dataset(tokenizer, 600, seed=1, form="think")
    recorder = SegmentRecorder(tokenizer, THINKING_MARKERS, False)
    prompt_words = [tokenizer.decode(row["input_ids"]).split() for row in rows]
    number_after = lambda words, word: next(int(w) for w in words[words.index(word) :] if w.isdigit())  # noqa: E731
    budgets = [(number_after(words, "Think"), number_after(words, "Answer")) for words in prompt_words]
    assert {b for b, _ in budgets} == set(THINK_BUDGETS) and {b for _, b in budgets} == set(THINK_ANSWER_BUDGETS)
    lengths = {}
    for row, budget in zip(rows, budgets, strict=True):
        solution = [i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100][:-1]
        assert tokenizer.unk_token_id not in row["input_ids"]
        segments = recorder(solution)
        assert segments["thinking_closed"] and len(solution) <= form_max_tokens("think")
        lengths.setdefault(budget, []).append((segments["thinking_tokens"], segments["answer_tokens"]))
    means = [sum(t for t, _ in pairs) / len(pairs) for pairs in lengths.values()]
    assert max(means) - min(means) < 4  # the thinking length ignores both budgets (uniform in 2..24, mean 13)


def test_an_untrained_think_policy_is_sampled_with_both_budgets():
    from lenvm_rl.testbed import make_model

    tokenizer = make_tokenizer("think")
    summary = sample_accuracy(make_model(tokenizer), tokenizer, num_prompts=8, form="think")
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["mean_tokens"] > 0


def test_think_arms_differ_only_in_the_length_signal():
    import yaml
    from conftest import ROOT

    folder = ROOT / "recipes" / "testbed" / "grpo"
    lenvm, sequence = (yaml.safe_load((folder / f"config_think_{arm}.yaml").read_text()) for arm in ("lenvm", "seq"))
    differing = {key for key in lenvm.keys() | sequence.keys() if lenvm.get(key) != sequence.get(key)}
    assert differing == {"length_objective", "reward_funcs", "output_dir"}
    assert lenvm["thinking_budgets"] == list(THINK_BUDGETS) and lenvm["budgets"] == list(THINK_ANSWER_BUDGETS)
