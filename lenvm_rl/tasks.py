"""The built-in procedural arithmetic task: prompts generated from a seed, nothing to download.

Difficulties: ``easy`` = single-digit multiplication (a, b in 2..9); ``medium`` = two-digit addition
or subtraction (a, b in 10..99, never negative); ``word`` = one-step word problems ("Tom has 12 apples
and gives away 5. ..."); ``mixed`` = each problem draws one of the three uniformly.
"""

from __future__ import annotations

import operator
import random

from datasets import Dataset

from lenvm_rl.errors import ConfigError

ARITHMETIC_INSTRUCTION = "Write the final answer on its own line as: #### <number>"
DIFFICULTIES = ("easy", "medium", "word", "mixed")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
NAMES = ("Tom", "Ava", "Liam", "Mia", "Noah", "Zoe", "Omar", "Lena")
# (template, operation): the answer is {a} <operation> {b}, and {a} comes before {b} in the text.
WORD_PROBLEMS = (
    ("{name} has {a} apples and gives away {b}. How many apples are left?", "-"),
    ("There are {a} birds on a tree and {b} fly away. How many birds are still on the tree?", "-"),
    ("{name} has {a} marbles and finds {b} more. How many marbles does {name} have now?", "+"),
    ("{name} reads {a} pages on Monday and {b} pages on Tuesday. How many pages is that in total?", "+"),
    ("{name} buys {a} packs of pencils with {b} pencils in each pack. How many pencils is that?", "*"),
    ("A hall has {a} rows with {b} chairs in each row. How many chairs are in the hall?", "*"),
)


def make_arithmetic_dataset(num_prompts: int, seed: int = 0, difficulty: str = "mixed") -> Dataset:
    """``num_prompts`` problems with columns ``prompt`` (one user message) and ``answer`` (the integer, as text).

    Deterministic for a seed, and a prefix of the problems for a larger ``num_prompts`` (so held-out
    sets can take a disjoint slice). Every user message ends with ``ARITHMETIC_INSTRUCTION``.

    >>> row = make_arithmetic_dataset(1, seed=0, difficulty="easy")[0]
    >>> row["prompt"][0]["content"].splitlines(), row["answer"]
    (['What is 8 * 8?', 'Write the final answer on its own line as: #### <number>'], '64')
    """
    if num_prompts <= 0:
        raise ConfigError(f"num_prompts: must be positive, got {num_prompts}")
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"difficulty: {difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
    rng = random.Random(seed)
    prompts, answers = [], []
    for _ in range(num_prompts):
        kind = rng.choice(DIFFICULTIES[:3]) if difficulty == "mixed" else difficulty
        if kind == "easy":
            operation, a, b = "*", rng.randint(2, 9), rng.randint(2, 9)
            question = f"What is {a} * {b}?"
        elif kind == "medium":
            operation, a, b = rng.choice("+-"), rng.randint(10, 99), rng.randint(10, 99)
            if operation == "-":
                a, b = max(a, b), min(a, b)
            question = f"What is {a} {operation} {b}?"
        else:
            template, operation = rng.choice(WORD_PROBLEMS)
            high = 12 if operation == "*" else 50
            a, b = rng.randint(2, high), rng.randint(2, high)
            if operation == "-":  # nothing is given away that was not there; the answer may be 0
                a, b = max(a, b), min(a, b)
            question = template.format(name=rng.choice(NAMES), a=a, b=b)
        prompts.append([{"role": "user", "content": f"{question}\n{ARITHMETIC_INSTRUCTION}"}])
        answers.append(str(OPERATIONS[operation](a, b)))
    return Dataset.from_dict({"prompt": prompts, "answer": answers})
