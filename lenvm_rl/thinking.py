"""Thinking sections with a real tokenizer and chat template: where a completion starts, and its segment columns.

The parsing itself is the pure ``rewards.segments.split_thinking``; this module adds what needs the tokenizer: the
chat template's generation prompt (does it open the thinking section, or close it so that the model cannot think?)
and the per-row columns ``thinking_tokens``, ``answer_tokens`` and ``thinking_closed`` that rollouts record.
"""

from __future__ import annotations

from collections.abc import Sequence

from lenvm_rl.errors import ConfigError
from rewards.segments import THINKING_MARKERS, TokenPieces, prompt_thinking_state, split_thinking


def starts_in_thinking(
    tokenizer, prompt: list[dict], markers: Sequence[str], field: str, chat_template_kwargs: dict | None = None
) -> bool:
    """Whether the chat template writes the opening marker into the generation prompt (Qwen3 thinking models), so that
    completions start inside the thinking section; refuses a template that closes it there (Qwen3 with
    ``enable_thinking: false``): the thinking budgets, or markers, named by ``field`` would have no section to count.

    Only the text after the last user message is read (the user's own text may mention the markers).
    """
    text = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    last_user = [message["content"] for message in prompt if message["role"] == "user"][-1]
    tail = text[text.rfind(last_user) + len(last_user) :] if last_user in text else text
    state = prompt_thinking_state(tail, markers)
    if state == "closed":
        raise ConfigError(
            f"{field}: the chat template closes the thinking section before the completion starts ({tail.strip()!r}), "
            f"so there is no thinking to budget; enable it (Qwen3: chat_template_kwargs {{enable_thinking: true}}) or "
            f"drop the thinking budgets"
        )
    return state == "open"


def check_markers_written(tokenizer, markers: Sequence[str], field: str) -> None:
    """Refuse markers the tokenizer cannot write (a word-level vocabulary without them encodes them as unknown): no
    completion could then open or close a thinking section, and every segment count would be silently wrong."""
    for marker in markers:
        written = tokenizer.decode(tokenizer.encode(marker, add_special_tokens=False), skip_special_tokens=False)
        if marker not in written:
            raise ConfigError(
                f"{field}: the tokenizer cannot write the thinking marker {marker!r} (it comes back as {written!r}), "
                f"so no completion can open or close a thinking section; set thinking_markers to a pair it writes, "
                f"or use a tokenizer that has them"
            )


class SegmentRecorder:
    """``recorder(completion_ids)`` -> the row's ``thinking_tokens``, ``answer_tokens`` and ``thinking_closed`` (ids
    without the EOS), for a recipe that asks for segments; ``SegmentRecorder.for_recipe`` returns None otherwise."""

    def __init__(self, tokenizer, markers: Sequence[str], starts_inside: bool, field: str = "thinking_markers"):
        check_markers_written(tokenizer, markers, field)
        self.pieces, self.markers, self.starts_inside = TokenPieces(tokenizer), tuple(markers), starts_inside

    def __call__(self, completion_ids: Sequence[int]) -> dict:
        segments = split_thinking(self.pieces(completion_ids), self.markers, self.starts_inside)
        return segments._asdict()

    @classmethod
    def for_recipe(
        cls, args, tokenizer, prompt: list[dict], chat_template_kwargs: dict | None = None, field: str | None = None
    ):
        """The recorder for ``args`` (``DatasetArguments``) and the chat template, checked on ``prompt``. When the
        recipe names no thinking budget and no markers: None, or, given the ``field`` that needs segments anyway
        (a segment reward), the default markers."""
        markers = args.segment_markers()
        if markers is None and field is None:
            return None
        if args.thinking_budgets is not None or args.thinking_budget_range is not None:
            field = "thinking_budgets"
        elif markers is not None:
            field = "thinking_markers"
        markers = markers or THINKING_MARKERS
        starts_inside = starts_in_thinking(tokenizer, prompt, markers, field, chat_template_kwargs)
        return cls(tokenizer, markers, starts_inside, field)
