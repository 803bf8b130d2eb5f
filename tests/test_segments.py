"""Thinking and answer segments: the parsing against a character-by-character loop, the hard cases by hand, the
segment rewards, the two-budget transform and the recipe's bad input."""

import doctest
import pickle
import random

import pytest
import torch
from conftest import make_tokenizer
from datasets import Dataset

import lenvm_rl.thinking
import rewards.segments
from lenvm_rl.budgets import add_budgets
from lenvm_rl.data import DatasetArguments, load_prompts
from lenvm_rl.errors import ConfigError
from lenvm_rl.thinking import SegmentRecorder, starts_in_thinking
from rewards import get_reward
from rewards.segments import Segments, TokenPieces, prompt_thinking_state, segment_budget_hit, split_thinking

MARKERS = ("<think>", "</think>")


def reference_split(pieces, markers, starts_inside):
    """A plain loop over the characters: where each one's token ends the opening prefix or the closing marker."""
    opening, closing = markers
    state = "thinking" if starts_inside else "start"
    before, inside = "", ""  # the text before the thinking opened, and since it opened
    for index, piece in enumerate(pieces):
        for char in piece:
            if state == "start":
                before += char
                stripped = before.lstrip()
                if stripped == opening:
                    state = "thinking"
                elif stripped and not opening.startswith(stripped):
                    return Segments(0, len(pieces), True)
            elif state == "thinking":
                inside += char
                if inside.endswith(closing):
                    return Segments(index + 1, len(pieces) - index - 1, True)
    if state == "thinking":
        return Segments(len(pieces), 0, False)
    return Segments(0, len(pieces), True)


FRAGMENTS = ["<", "think", ">", "</", "/", "<think>", "</think>", " ", "\n", "a", "b", ".</", "k>", "hink>", ""]


@pytest.mark.parametrize("starts_inside", [False, True])
@pytest.mark.parametrize("markers", [MARKERS, ("[T]", "[/T]")])
def test_split_matches_the_character_loop(starts_inside, markers):
    rng = random.Random(0)
    fragments = FRAGMENTS + list(markers) + [markers[0][:2], markers[0][2:], markers[1][:2], markers[1][2:]]
    for _ in range(3000):
        pieces = [rng.choice(fragments) for _ in range(rng.randint(0, 12))]
        assert split_thinking(pieces, markers, starts_inside) == reference_split(pieces, markers, starts_inside), pieces


@pytest.mark.parametrize(
    "pieces, starts_inside, expected",
    [
        (["<think>", "a", "</think>", "b", "c"], False, (3, 2, True)),  # closed
        (["<think>", "a", "b"], False, (3, 0, False)),  # unclosed: all thinking, no answer
        (
            ["<think>", "a", "<think>", "b", "</think>", "c", "</think>", "d"],
            False,
            (5, 3, True),
        ),  # nested: first close
        (["<think>", "a", "</think>", "b", "<think>", "c", "</think>"], False, (3, 4, True)),  # repeated: answer text
        (["<", "th", "ink", ">", "a", "</", "think", ">", "b"], False, (8, 1, True)),  # split over tokens
        (["\n <thi", "nk>a.</th", "ink>\n\nB", "c"], False, (3, 1, True)),  # shared with neighbours
        (["a", "<think>", "b", "</think>", "c"], False, (0, 5, True)),  # opens late: answer text
        (["a", "</think>", "b"], False, (0, 3, True)),  # a close without an open is text
        (["a", "</think>", "b"], True, (2, 1, True)),  # the prompt opened it
        (["a", "b"], True, (2, 0, False)),
        ([], False, (0, 0, True)),
        ([], True, (0, 0, False)),
        (["<think>", "</think>", "", "b"], False, (2, 2, True)),  # an empty token after the close is the answer's
        (["<thi"], False, (0, 1, True)),  # cut inside the opening marker: no thinking began
    ],
)
def test_split_hard_cases(pieces, starts_inside, expected):
    assert tuple(split_thinking(pieces, MARKERS, starts_inside)) == expected
    assert tuple(reference_split(pieces, MARKERS, starts_inside)) == expected


def test_docstring_examples():
    assert doctest.testmod(rewards.segments).failed == 0
    assert doctest.testmod(lenvm_rl.thinking).failed == 0


def test_pieces_from_a_tokenizer_with_markers_as_special_tokens():
    tokenizer = make_tokenizer()  # one token per character: "<think>" is seven tokens
    ids = tokenizer.encode("<think>ab</think>cd", add_special_tokens=False)
    assert split_thinking(TokenPieces(tokenizer)(ids)) == Segments(17, 2, True)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)  # Qwen3: one token each
    ids = tokenizer.encode("<think>ab</think>cd", add_special_tokens=False)
    assert len(ids) == 6 and split_thinking(TokenPieces(tokenizer)(ids)) == Segments(4, 2, True)


def test_prompt_state_and_the_template_check():
    assert prompt_thinking_state("<|assistant|>") == "none"
    assert prompt_thinking_state("</think> old <think>\n") == "open"
    tokenizer = make_tokenizer()
    prompt = [{"role": "user", "content": "Use <think> and </think>."}]  # the user's text is not the template's
    assert starts_in_thinking(tokenizer, prompt, MARKERS, "thinking_budgets") is False
    tokenizer.chat_template = tokenizer.chat_template.replace("<assistant>{% endif %}", "<assistant><think>{% endif %}")
    assert starts_in_thinking(tokenizer, prompt, MARKERS, "thinking_budgets") is True
    tokenizer.chat_template = tokenizer.chat_template.replace("<think>{% endif", "<think></think>{% endif")
    with pytest.raises(ConfigError, match=r"^thinking_budgets: the chat template closes the thinking section"):
        starts_in_thinking(tokenizer, prompt, MARKERS, "thinking_budgets")


def test_an_unclosed_thinking_hits_no_budget():
    lengths, budgets, at_most = torch.tensor([5, 5]), torch.tensor([8, 8]), torch.tensor([1, 1])
    assert segment_budget_hit(lengths, budgets, at_most, torch.tensor([True, False])).tolist() == [True, False]


# --- the segment rewards ------------------------------------------------------------------------------------------


def segment_batch(texts, tokenizer, **columns):
    ids = [tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id] for text in texts]
    return dict(prompts=["p"] * len(texts), completions=texts, completion_ids=ids, **columns)


def test_segment_rewards_score_each_segment_against_its_budget():
    tokenizer = make_tokenizer()
    texts = ["<think>abc</think>xy", "<think>abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLM</think>xy", "<think>abc", "xyz"]
    columns = dict(
        thinking_budget_tokens=[20] * 4,
        thinking_budget_kind=["at_most"] * 4,
        budget_tokens=[2] * 4,
        budget_kind=["exact"] * 4,
    )
    batch = segment_batch(texts, tokenizer, **columns)
    thinking = get_reward("thinking_length_score", tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id)
    answer = get_reward("answer_length_score", tokenizer=tokenizer, eos_token_id=tokenizer.eos_token_id)
    # Thinking tokens: 18 (hit), 54 (LD = 1.7: e^-3.4), 10 but never closed (0), none (0 <= 20: hit).
    assert thinking(**batch) == pytest.approx([1.0, torch.exp(torch.tensor(-3.4)).item(), 0.0, 1.0])
    # Answer tokens: 2, 2, none because the thinking never closed (0), 3 (LD = 0.5: e^-1).
    assert answer(**batch) == pytest.approx([1.0, 1.0, 0.0, torch.exp(torch.tensor(-1.0)).item()])
    assert pickle.loads(pickle.dumps(thinking))(**batch) == thinking(**batch)
    starts_open = get_reward("thinking_length_score", tokenizer=tokenizer, starts_in_thinking=True)
    assert starts_open(**segment_batch(["abc</think>xy"], tokenizer, **{k: v[:1] for k, v in columns.items()})) == [1.0]


def test_total_length_rewards_refuse_prompts_with_thinking_budgets():
    batch = segment_batch(["ab"], make_tokenizer(), budget_tokens=[2], budget_kind=["exact"])
    length_score = get_reward("length_score", eos_token_id=make_tokenizer().eos_token_id)
    assert length_score(**batch) == [1.0]
    with pytest.raises(ConfigError, match=r"^reward_funcs: length_score scores the whole completion .* answer_length"):
        length_score(**batch, thinking_budget_tokens=[4], thinking_budget_kind=["at_most"])
    with pytest.raises(ConfigError, match=r"^reward_funcs: bad parameters for 'thinking_length_score': .*'tokenizer'"):
        get_reward("thinking_length_score")
    with pytest.raises(ConfigError, match=r"thinking_length_score needs the dataset column 'thinking_budget_tokens'"):
        get_reward("thinking_length_score", tokenizer=make_tokenizer())(**batch)


# --- the two-budget transform and the recipe fields ---------------------------------------------------------------


def chat_prompts(n):
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(n)]})


def test_two_budgets_are_independent_and_stated_in_order():
    thinking = add_budgets(chat_prompts(400), budget_range=(16, 1024), kinds=["at_most", "exact"], segment="thinking")
    both = add_budgets(thinking, budget_range=(16, 1024), kinds=["exact", "at_least"])
    rows = both.to_list()
    assert {r["thinking_budget_kind"] for r in rows} == {"at_most", "exact"}
    # Drawn from separate streams with one seed: the two budgets are not the same draw.
    assert sum(r["thinking_budget_tokens"] == r["budget_tokens"] for r in rows) < 20
    first, words = rows[0], {"exact": "exactly", "at_most": "at most", "at_least": "at least"}
    assert first["prompt"][0]["content"] == (
        f"What is 0 + 1?\nThink for {words[first['thinking_budget_kind']]} {first['thinking_budget_tokens']} "
        f"tokens.\nAnswer in {words[first['budget_kind']]} {first['budget_tokens']} tokens."
    )
    # Re-drawing one segment's budget replaces that segment's instruction only.
    again = add_budgets(both, budgets=[7], kinds=["exact"], segment="thinking")[0]["prompt"][0]["content"]
    assert again.count("Think for") == 1 and "Think for exactly 7 tokens." in again and again.count("Answer in") == 1
    # The answer's draw is what it was before there were two segments.
    assert [r["budget_tokens"] for r in rows] == add_budgets(chat_prompts(400), budget_range=(16, 1024))[
        "budget_tokens"
    ]


def test_the_recipe_fields_add_both_budgets():
    args = DatasetArguments(num_prompts=4, budgets=[32], thinking_budgets=[128, 256])
    assert args.segment_markers() == MARKERS
    dataset = load_prompts(args)
    assert set(dataset["thinking_budget_tokens"]) <= {128, 256} and set(dataset["thinking_budget_kind"]) == {"at_most"}
    assert dataset["budget_tokens"] == [32] * 4
    assert DatasetArguments(thinking_markers=["[T]", "[/T]"]).segment_markers() == ("[T]", "[/T]")
    assert DatasetArguments(budgets=[8]).segment_markers() is None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"thinking_budgets": [0]}, "thinking_budgets: need a non-empty list of positive integer token counts"),
        ({"thinking_budgets": 64}, "thinking_budgets: need a flat list"),
        ({"thinking_budget_range": [64, 8]}, "thinking_budget_range: need [low, high]"),
        ({"thinking_budgets": [64], "thinking_budget_kinds": ["soon"]}, "thinking_budget_kinds: ['soon'] not budget"),
        ({"thinking_budget_kinds": ["exact"]}, "thinking_budget_kinds: set, but there is no thinking budget"),
        ({"thinking_markers": ["<think>"]}, "thinking_markers: need [open, close]"),
        ({"thinking_markers": ["<t>", "<t>"]}, "thinking_markers: need [open, close]"),
    ],
)
def test_bad_thinking_fields_fail_in_one_line(fields, message):
    with pytest.raises(ConfigError) as error:
        DatasetArguments(**fields)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_the_recorder_follows_the_recipe():
    tokenizer = make_tokenizer()
    prompt = [{"role": "user", "content": "q"}]
    assert SegmentRecorder.for_recipe(DatasetArguments(), tokenizer, prompt) is None
    recorder = SegmentRecorder.for_recipe(DatasetArguments(thinking_budgets=[8]), tokenizer, prompt)
    ids = tokenizer.encode("<think>a</think>b", add_special_tokens=False)
    assert recorder(ids) == {"thinking_tokens": 16, "answer_tokens": 1, "thinking_closed": True}
    default = SegmentRecorder.for_recipe(DatasetArguments(), tokenizer, prompt, field="reward_funcs")
    assert default.markers == MARKERS and default.starts_inside is False


def test_rollouts_record_the_segments(make_rollouts):
    from lenvm_rl.rollout_data import load_rollouts

    rows = load_rollouts(make_rollouts(num_prompts=2, thinking_budgets=[4], budgets=[8])).to_list()
    assert all(r["thinking_tokens"] + r["answer_tokens"] == r["completion_tokens"] for r in rows)
    assert all(r["thinking_budget_tokens"] == 4 and r["budget_tokens"] == 8 for r in rows)
    pieces = TokenPieces(make_tokenizer())
    assert [r["thinking_tokens"] for r in rows] == [split_thinking(pieces(r["completion_ids"]))[0] for r in rows]
