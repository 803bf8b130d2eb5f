"""Format reward: did the completion write its final answer where the checker looks for it?"""

from __future__ import annotations

import re

from rewards.base import completion_text
from rewards.correctness import NUMBER

# A line holding only "#### <number>", optionally "$"-prefixed or closed by a full stop.
ANSWER_LINE = re.compile(rf"^[ \t]*####[ \t]*\$?(?:{NUMBER.pattern})\.?[ \t]*$", re.MULTILINE)
NONEMPTY_BOXED = re.compile(r"\\boxed\{\s*[^\s}]")


class AnswerFormat:
    """Format reward: R = 1 if the completion has a ``#### <number>`` line or a non-empty ``\\boxed{}``, else 0.

    Reads no column.

    >>> AnswerFormat()(prompts=["p"] * 3, completions=["7 * 6 = 42\\n#### 42", "\\\\boxed{42}", "42"],
    ...                completion_ids=[[1]] * 3)
    [1.0, 1.0, 0.0]
    """

    __name__ = "answer_format"
    formula = "1 if a '#### <number>' line or a non-empty \\boxed{} is present else 0"
    columns = ()

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        texts = [completion_text(c) for c in completions]
        return [float(bool(ANSWER_LINE.search(t) or NONEMPTY_BOXED.search(t))) for t in texts]
