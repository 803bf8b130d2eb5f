"""A completion's two segments: the thinking section and the answer after it, counted in tokens.

The convention is a pair of markers, ``<think>`` and ``</think>`` by default (``THINKING_MARKERS``; any pair a
recipe names). Parsing works on the text each token decodes to (its "piece"), so a marker that is one special token
(Qwen3), or that the tokenizer splits over several tokens, or that shares a token with its neighbours
(``".</think>\\n\\n"``), is found all the same. The rules, in the order they apply:

- The thinking section opens only at the start of the completion (leading whitespace allowed), or before it, when
  the chat template writes the opening marker into the prompt (Qwen3 thinking models; ``starts_in_thinking``). An
  opening marker later in the text is text of the answer: thinking comes first or not at all.
- The first closing marker after the opening one ends it. An opening marker inside the thinking (a "nested" one) is
  text; so is every marker after the close (a repeated pair belongs to the answer). This is where vLLM's reasoning
  parsers split too.
- The thinking segment runs from the first token through the token that completes the closing marker; the answer
  segment is every token after it. The two partition the completion: thinking + answer = L (EOS excluded).
- No opening marker (and none in the prompt): no thinking, 0 thinking tokens, the whole completion is the answer.
- Opened and never closed (stopped or truncated mid-thought): all L tokens are thinking, the answer has 0 tokens,
  and ``thinking_closed`` is False. The segment scores (``segment_length_score``) give such a completion 0.

Pure functions; the tokenizer is needed only to turn ids into pieces (``TokenPieces``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import NamedTuple

import torch

from rewards.scores import budget_hit, lifebench_length_score

THINKING_MARKERS = ("<think>", "</think>")
SEGMENTS = ("thinking", "answer")


class Segments(NamedTuple):
    """The lengths of a completion's two segments; ``thinking_tokens + answer_tokens`` = its L."""

    thinking_tokens: int  # tokens 0 .. thinking_tokens - 1, the markers included
    answer_tokens: int  # the tokens after the closing marker
    thinking_closed: bool  # False only when a thinking section opened and never closed


def split_thinking(
    pieces: Sequence[str], markers: Sequence[str] = THINKING_MARKERS, starts_in_thinking: bool = False
) -> Segments:
    """Split a completion, given as the text of each of its tokens (EOS excluded), into thinking and answer.

    ``starts_in_thinking``: the prompt already opened the thinking section (``prompt_thinking_state`` = "open").

    >>> split_thinking(["<think>", "add", " 2", "</think>", "4"])
    Segments(thinking_tokens=4, answer_tokens=1, thinking_closed=True)
    >>> split_thinking(["\\n<", "think", ">hm", ".</", "think", ">\\n\\n4", "."])  # markers split and shared
    Segments(thinking_tokens=6, answer_tokens=1, thinking_closed=True)
    >>> split_thinking(["4"]), split_thinking(["<think>", "hm"])
    (Segments(thinking_tokens=0, answer_tokens=1, thinking_closed=True), Segments(thinking_tokens=2, answer_tokens=0, thinking_closed=False))
    """
    opening, closing = markers
    text = "".join(pieces)
    if starts_in_thinking:
        search_from = 0
    elif text.lstrip().startswith(opening):
        search_from = len(text) - len(text.lstrip()) + len(opening)
    else:
        return Segments(0, len(pieces), True)
    close = text.find(closing, search_from)
    if close < 0:
        return Segments(len(pieces), 0, False)
    # Token k starts at character starts[k]; the thinking segment holds every token that starts before the
    # closing marker's end, so the token completing the marker is its last one (a token can hold both sides).
    starts, position = [], 0
    for piece in pieces:
        starts.append(position)
        position += len(piece)
    thinking = bisect_left(starts, close + len(closing))
    # Tokens that decode to nothing (special tokens) right after the marker start at its end: they are answer.
    return Segments(thinking, len(pieces) - thinking, True)


def prompt_thinking_state(generation_prompt: str, markers: Sequence[str] = THINKING_MARKERS) -> str:
    """Whether the text a chat template adds after the last user message leaves the completion inside a thinking
    section: "open" (Qwen3 thinking models write the opening marker there), "closed" (Qwen3 with
    ``enable_thinking: false`` writes an empty, closed section: the model cannot think), or "none".

    >>> [prompt_thinking_state(s) for s in ("<|im_start|>assistant\\n<think>\\n", "<think>\\n\\n</think>\\n\\n", "")]
    ['open', 'closed', 'none']
    """
    opening, closing = markers
    last_open, last_close = generation_prompt.rfind(opening), generation_prompt.rfind(closing)
    if last_close >= 0 and last_close > last_open:
        return "closed"
    return "open" if last_open >= 0 else "none"


class TokenPieces:
    """The text each token id decodes to, cached: ``pieces(ids)`` is what ``split_thinking`` reads.

    Each id is decoded alone with special tokens kept (a marker may be one). A byte-level BPE token holding part of
    a multi-byte character decodes to a replacement character; markers are matched as written, and a marker that
    is itself split inside a character cannot be, so the split is exact for every marker of whole characters.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        for token in set(ids) - self.cache.keys():
            self.cache[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return [self.cache[token] for token in ids]

    def __getstate__(self):  # rewards are pickled (data loader workers); the cache is rebuilt
        return {"tokenizer": self.tokenizer, "cache": {}}


def segment_length_score(
    lengths: torch.Tensor, budgets: torch.Tensor, kinds: torch.Tensor, thinking_closed: torch.Tensor
) -> torch.Tensor:
    """The LIFEBench score S(L_seg, N_seg, kind) of one segment's length against its budget, and 0 for a completion
    whose thinking never closed: it gave no answer, and crediting its thinking length would reward stopping
    mid-thought. (B,) float32.

    >>> segment_length_score(torch.tensor([16, 16]), torch.tensor([16, 16]), torch.tensor([0, 0]),
    ...                      torch.tensor([True, False]))
    tensor([1., 0.])
    """
    score = lifebench_length_score(lengths, budgets, kinds)
    return torch.where(torch.as_tensor(thinking_closed, dtype=torch.bool), score, torch.zeros_like(score))


def segment_budget_hit(
    lengths: torch.Tensor, budgets: torch.Tensor, kinds: torch.Tensor, thinking_closed: torch.Tensor
) -> torch.Tensor:
    """Whether one segment meets its budget (``budget_hit``), never for a completion whose thinking never closed.

    >>> segment_budget_hit(torch.tensor([0, 0]), torch.tensor([8, 8]), torch.tensor([1, 1]), torch.tensor([True, False]))
    tensor([ True, False])
    """
    return budget_hit(lengths, budgets, kinds) & torch.as_tensor(thinking_closed, dtype=torch.bool)
