"""The one answer checker (``is_correct``) and the accuracy reward built on it.

Every reward that needs correctness calls ``is_correct``; nothing else parses answers.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal

from math_verify import parse, verify

from rewards.base import column, completion_text

# A number as written in text: optional sign (not after a word character, so "10-2" reads 10 and 2),
# thousands commas only in groups of three ("1,000" but "12,13" is two numbers), optional decimals.
# A trailing "." ends a sentence and is not matched.
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
BOXED = "\\boxed{"


def marked_answer(text: str) -> str | None:
    """The answer after the last final-answer marker, or None without one.

    Markers: ``\\boxed{...}`` (its content, braces balanced) and ``####`` (the first number after it,
    commas removed); when both occur, the later one wins.

    >>> marked_answer("3 + 4 = 7\\n#### 1,007 apples."), marked_answer("so \\\\boxed{\\\\frac{1}{2}}")
    ('1007', '\\\\frac{1}{2}')
    >>> marked_answer("7") is None
    True
    """
    boxed_at, hash_at = text.rfind(BOXED), text.rfind("####")
    if boxed_at > hash_at:
        depth = 0
        for end in range(boxed_at + len(BOXED), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth < 0:
                return text[boxed_at + len(BOXED) : end].strip()
        return None  # unbalanced braces: the completion was cut off inside the box
    if hash_at >= 0:
        number = NUMBER.search(text, hash_at + len("####"))
        return number and number.group().replace(",", "")
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer in ``text``: the marked answer (``\\boxed{}`` / ``####``), else the last number.

    Numbers come back with commas removed; a boxed answer comes back as written inside the box.

    >>> extract_final_answer("She pays $1,200 in total, then 30 more: $1,230.")
    '1230'
    >>> extract_final_answer("no digits here") is None
    True
    """
    marked = marked_answer(text)
    if marked:
        return marked
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def _as_number(answer: str) -> Decimal | None:
    """``answer`` as an exact number when it is one plain number (optionally "$"-prefixed), else None."""
    answer = answer.strip().removeprefix("\\$").removeprefix("$").rstrip(".").strip()
    return Decimal(answer.replace(",", "")) if NUMBER.fullmatch(answer) else None


def is_correct(completion_text: str, answer: str) -> bool:
    """Whether the completion's final answer equals the reference ``answer``.

    The reference may be a full GSM8K solution ending in ``#### 72``, a boxed answer, or the bare answer
    ("72", "\\frac{1}{3}"). Two plain numbers compare exactly as decimals ("1,000" == "1000",
    "3.0" == "3", "-5" == "-5.00"); anything else (fractions, expressions, units) goes to math-verify.

    >>> is_correct("6 * 7 = 42\\n#### 42", "Natalia sold 42 clips.\\n#### 42")
    True
    >>> is_correct("The answer is \\\\boxed{\\\\frac{2}{6}}", "\\\\frac{1}{3}"), is_correct("It costs $3.0.", "4")
    (True, False)
    """
    predicted = extract_final_answer(completion_text)
    if predicted is None:
        return False
    reference = marked_answer(answer) or answer.strip()
    predicted_number, reference_number = _as_number(predicted), _as_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    # math-verify times out with signal.alarm, which works only in the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    return verify(
        parse(f"{BOXED}{reference}}}", parsing_timeout=timeout),
        parse(f"{BOXED}{predicted}}}", parsing_timeout=timeout),
        timeout_seconds=timeout,
    )


class Accuracy:
    """Correctness reward: R = 1 if is_correct(completion, answer) else 0.

    Reads the dataset column ``answer``.

    >>> Accuracy()(prompts=["7 * 6?"] * 2, completions=["#### 42", "#### 41"], completion_ids=[[1], [1]],
    ...            answer=["42"] * 2)
    [1.0, 0.0]
    """

    __name__ = "accuracy"
    formula = "1 if is_correct(completion, answer) else 0"
    columns = ("answer",)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        answers = column(kwargs, "answer", self.__name__)
        return [float(is_correct(completion_text(c), a)) for c, a in zip(completions, answers, strict=True)]
