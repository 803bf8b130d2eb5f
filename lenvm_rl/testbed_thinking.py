"""The learning testbed's third task, "think, then answer" (``form: think``, issue 29): two budgets in one completion.

The prompt asks "What is a + b ?", then "Think for exactly|at most|at least N tokens." (the thinking budget, from
``THINK_BUDGETS``) and "Answer in ... M tokens." (the answer budget, from ``THINK_ANSWER_BUDGETS``). A solution is a
scratchpad of k steps between ``<think>`` and ``</think>``, then j steps and ``#### a+b``:

    <think> t_1 .. t_k </think> u_1 .. u_j #### a+b        thinking T = k + 2 tokens, answer A = j + 2 tokens

Both step kinds are the first task's budget tracker, one per segment: thinking step i writes N - (i + 2), the thinking
budget left if the thinking closed right after it (ending with the step "0", then ``</think>``, gives T = N); answer
step i writes M - (i + 2) (the step "0", then ``#### a+b``, gives A = M). The steps carry nothing about the sum, so
correctness does not depend on either length, and each length is decided by one kind of action: closing the thinking
instead of the next thinking step, writing ``####`` instead of the next answer step. The SFT data draws k and j
uniformly, independently of both budgets: the starting policy thinks and answers, budget-blind, and GRPO has to teach
both budgets. The segments are what ``rewards.segments.split_thinking`` finds: the thinking opens at the first token.
"""

from __future__ import annotations

from lenvm_rl.budgets import THINKING_TEMPLATES
from rewards.segments import THINKING_MARKERS

THINK_BUDGETS = (8, 16)  # the thinking's; T = k + 2 lies in [2, 2 + THINK_MAX_STEPS]
THINK_ANSWER_BUDGETS = (4, 8)  # the answer's; A = j + 2 lies in [2, 2 + THINK_ANSWER_MAX_STEPS]
THINK_MAX_STEPS = 22
THINK_ANSWER_MAX_STEPS = 10
THINK_MAX_TOKENS = (THINK_MAX_STEPS + 2) + (THINK_ANSWER_MAX_STEPS + 2)  # 36


def thinking_words() -> list[str]:
    """The words the third task adds to the testbed's vocabulary: the markers and the thinking instructions'."""
    words = list(THINKING_MARKERS)
    for template in THINKING_TEMPLATES.values():
        words += template.replace("{N}", "").split()
    return words


def write_thinking_solution(
    a: int, b: int, thinking_steps: int, answer_steps: int, thinking_budget: int, answer_budget: int
) -> str:
    """A correct solution with ``thinking_steps`` tracker steps in the thinking and ``answer_steps`` in the answer:
    T = thinking_steps + 2 thinking tokens (the markers included), A = answer_steps + 2 answer tokens.

    >>> write_thinking_solution(3, 4, 2, 1, thinking_budget=4, answer_budget=3)  # T = 4 = N, A = 3 = M
    '<think> 1 0 </think> 0 #### 7'
    """
    if thinking_steps < 0 or answer_steps < 0:
        raise ValueError(f"steps: at least 0 each, got {thinking_steps} and {answer_steps}")
    opening, closing = THINKING_MARKERS
    thinking = [str(thinking_budget - (i + 2)) for i in range(1, thinking_steps + 1)]
    answer = [str(answer_budget - (i + 2)) for i in range(1, answer_steps + 1)]
    return " ".join([opening, *thinking, closing, *answer, "####", str(a + b)])
