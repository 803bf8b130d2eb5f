"""Prompt datasets: a GSM8K-style jsonl by path, a ``save_to_disk`` folder, any ``datasets`` id, or the
built-in procedural arithmetic task; optionally with token budgets written into the prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
from datasets import Dataset

from lenvm_rl.budgets import add_budgets, check_budget_choices
from lenvm_rl.errors import ConfigError
from rewards.segments import THINKING_MARKERS


@dataclass
class DatasetArguments:
    """Where prompts come from, shared by every stage that reads prompts."""

    dataset_name: str = field(
        default="arithmetic",
        metadata={
            "help": "A .jsonl/.json path, a save_to_disk folder, a `datasets` id, or a built-in task: 'arithmetic', "
            "'testbed' (lenvm_rl.testbed)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Config name of a `datasets` id."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a `datasets` id."})
    prompt_column: str = field(
        default="prompt", metadata={"help": "Column with the prompt: chat messages or a plain question string."}
    )
    prompt_instruction: str | None = field(
        default=None, metadata={"help": "Text appended to a plain-string prompt (e.g. the answer format)."}
    )
    num_prompts: int | None = field(
        default=None, metadata={"help": "Use this many prompts (all when unset; the arithmetic task then makes 1000)."}
    )
    skip_prompts: int = field(
        default=0, metadata={"help": "Skip this many prompts first: held-out sets take a disjoint slice."}
    )
    arithmetic_difficulty: str = field(default="mixed", metadata={"help": "Difficulty of the arithmetic task."})
    budgets: list[int] | None = field(
        default=None, metadata={"help": "Token budgets to draw from; adds budget_tokens / budget_kind columns."}
    )
    budget_range: list[int] | None = field(
        default=None, metadata={"help": "[low, high]: draw budgets log-uniformly in this range instead."}
    )
    budget_kinds: list[str] = field(
        default_factory=lambda: ["exact"], metadata={"help": "Budget kinds to draw from: exact, at_most, at_least."}
    )
    thinking_budgets: list[int] | None = field(
        default=None,
        metadata={
            "help": "Token budgets of the thinking section, drawn beside `budgets` (then the answer's): adds "
            "thinking_budget_tokens / thinking_budget_kind columns and 'Think for ... tokens.' to the prompt."
        },
    )
    thinking_budget_range: list[int] | None = field(
        default=None, metadata={"help": "[low, high]: draw thinking budgets log-uniformly in this range instead."}
    )
    thinking_budget_kinds: list[str] | None = field(
        default=None, metadata={"help": "Kinds of the thinking budgets: exact, at_most, at_least (unset: at_most)."}
    )
    thinking_markers: list[str] | None = field(
        default=None,
        metadata={
            "help": "[open, close] markers of the thinking section (unset: <think>, </think>). Setting them, or a "
            "thinking budget, makes rollouts record thinking_tokens / answer_tokens / thinking_closed."
        },
    )
    dataset_seed: int = field(default=0, metadata={"help": "Seed of the arithmetic task and the budget draw."})

    def __post_init__(self):
        if self.num_prompts is not None and self.num_prompts <= 0:
            raise ConfigError(f"num_prompts: must be positive, got {self.num_prompts}")
        if self.skip_prompts < 0:
            raise ConfigError(f"skip_prompts: must be >= 0, got {self.skip_prompts}")
        for name in ("budgets", "budget_range", "thinking_budgets", "thinking_budget_range"):  # YAML: 32, [[16, 32]]
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(type(b) is int for b in value)):
                raise ConfigError(f"{name}: need a flat list of token counts, e.g. [16, 32, 64]; got {value!r}")
        # The transform's own check, here too: a bad budget fails before any model loads or file is written.
        check_budget_choices(self.budgets, self.budget_range, self.budget_kinds, kinds_field="budget_kinds")
        thinking = self.thinking_budgets is not None or self.thinking_budget_range is not None
        if thinking:
            check_budget_choices(
                self.thinking_budgets,
                self.thinking_budget_range,
                self.thinking_budget_kinds or ["at_most"],
                kinds_field="thinking_budget_kinds",
                prefix="thinking_",
            )
        elif self.thinking_budget_kinds is not None:
            raise ConfigError(
                "thinking_budget_kinds: set, but there is no thinking budget to give a kind; add thinking_budgets "
                "or thinking_budget_range, or drop thinking_budget_kinds"
            )
        markers = self.thinking_markers
        if markers is not None and not (
            isinstance(markers, list)
            and len(markers) == 2
            and all(isinstance(m, str) and m.strip() for m in markers)
            and markers[0] != markers[1]
        ):
            raise ConfigError(
                f"thinking_markers: need [open, close], two different non-blank strings, e.g. ['<think>', '</think>']; "
                f"got {markers!r}"
            )

    def segment_markers(self) -> tuple[str, str] | None:
        """The thinking section's (open, close) markers when the recipe asks for segments (thinking budgets or
        markers), else None: completions are then one segment."""
        if self.thinking_budgets is None and self.thinking_budget_range is None and self.thinking_markers is None:
            return None
        return tuple(self.thinking_markers or THINKING_MARKERS)


def load_prompts(args: DatasetArguments) -> Dataset:
    """Return a dataset whose ``prompt`` column holds chat messages, plus the source's other columns."""
    return load_prompt_splits(args, 0)[0]


def load_prompt_splits(args: DatasetArguments, num_eval_prompts: int) -> tuple[Dataset, Dataset | None]:
    """The training prompts of ``load_prompts`` and, when ``num_eval_prompts`` > 0, held-out prompts.

    The held-out prompts come right after the training slice and share no prompt text with it or with
    the skipped prompts (a procedural task repeats problems). Their budgets are drawn with
    ``dataset_seed + 1``. Returns (train, None) for ``num_eval_prompts`` = 0.
    """
    name = args.dataset_name
    if num_eval_prompts < 0:
        raise ConfigError(f"eval_num_prompts: must be >= 0, got {num_eval_prompts}")
    if name == "arithmetic":
        from lenvm_rl.tasks import make_arithmetic_dataset

        # Twice the prompts asked for: room for the repeats of skipped problems that are dropped below.
        total = args.skip_prompts + 2 * ((args.num_prompts or 1000) + num_eval_prompts)
        dataset = make_arithmetic_dataset(total, seed=args.dataset_seed, difficulty=args.arithmetic_difficulty)
    elif name == "testbed":
        from lenvm_rl.testbed import make_testbed_dataset

        total = args.skip_prompts + 2 * ((args.num_prompts or 1000) + num_eval_prompts)  # as for arithmetic
        dataset = make_testbed_dataset(total, seed=args.dataset_seed)
    elif Path(name).suffix in (".jsonl", ".json"):
        if not Path(name).is_file():
            raise ConfigError(f"dataset_name: no file {name!r}; give an existing .jsonl path")
        try:
            dataset = datasets.load_dataset("json", data_files=name, split="train")
        except Exception as error:  # an empty file raises StopIteration, a bad line a DatasetGenerationError
            raise ConfigError(
                f"dataset_name: cannot read {name!r} as JSON lines ({json_problem(name, error)}); it "
                f"must hold one JSON object per line, at least one"
            ) from None
    elif Path(name, "dataset_info.json").is_file() or Path(name, "state.json").is_file():
        dataset = datasets.load_from_disk(name)
    else:
        try:
            dataset = datasets.load_dataset(name, args.dataset_config, split=args.dataset_split)
        except Exception as error:  # datasets raises many types for a missing id or no network
            raise ConfigError(
                f"dataset_name: cannot load {name!r} ({type(error).__name__}); give a local .jsonl path, a "
                f"save_to_disk folder, 'arithmetic', or a `datasets` id reachable from this machine"
            ) from None
    if args.prompt_column not in dataset.column_names:
        raise ConfigError(
            f"prompt_column: the dataset has no column {args.prompt_column!r} (columns: "
            f"{', '.join(dataset.column_names)}); set prompt_column to the column holding the prompts"
        )
    check_prompts(dataset, args.prompt_column, name)
    # Held-out slices must be disjoint in content, not only in index (a procedural task repeats problems).
    skipped = range(min(args.skip_prompts, len(dataset)))
    seen = {json.dumps(p, sort_keys=True) for p in dataset.select(skipped)[args.prompt_column]}
    dataset = dataset.select(range(len(skipped), len(dataset)))
    if seen:
        dataset = dataset.filter(lambda p: json.dumps(p, sort_keys=True) not in seen, input_columns=args.prompt_column)
    if len(dataset) == 0:
        raise ConfigError(
            f"skip_prompts: no prompt is left after skipping {args.skip_prompts} (and their repeats); lower it"
        )
    held_out = None
    if num_eval_prompts:
        train_size = len(dataset) if args.num_prompts is None else min(args.num_prompts, len(dataset))
        seen.update(json.dumps(p, sort_keys=True) for p in dataset.select(range(train_size))[args.prompt_column])
        held_out = dataset.select(range(train_size, len(dataset)))
        held_out = held_out.filter(
            lambda p: json.dumps(p, sort_keys=True) not in seen, input_columns=args.prompt_column
        )
        if len(held_out) == 0:
            raise ConfigError(
                f"eval_num_prompts: no prompt is left after the {train_size} training prompts; lower num_prompts "
                f"or give a larger dataset"
            )
        if len(held_out) < num_eval_prompts:
            raise ConfigError(
                f"eval_num_prompts: {num_eval_prompts} asked for, but only {len(held_out)} prompt(s) are left after the "
                f"{train_size} training prompts; lower it or give a larger dataset"
            )
        held_out = held_out.select(range(num_eval_prompts))
    if args.num_prompts is not None:
        if len(dataset) < args.num_prompts:
            raise ConfigError(
                f"num_prompts: {args.num_prompts} asked for, but {name!r} has {len(dataset)} (after skip_prompts and "
                f"its repeats); lower num_prompts, or unset it to use them all"
            )
        dataset = dataset.select(range(args.num_prompts))
    dataset = _finish(dataset, args, args.dataset_seed)
    return dataset, None if held_out is None else _finish(held_out, args, args.dataset_seed + 1)


def json_problem(path: str, error: Exception) -> str:
    """What is wrong with a JSON-lines file: the first line that does not parse, by number, else the error type."""
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                line.strip() and json.loads(line)
            except ValueError as bad:
                return f"line {number} is not valid JSON: {bad.msg}"
    return type(error).__name__


def check_prompts(dataset: Dataset, column: str, name: str) -> None:
    """Refuse a prompt that is not a non-empty question string or a list of chat messages with text content."""
    for row, prompt in enumerate(dataset[column]):
        if isinstance(prompt, str):
            problem = None if prompt.strip() else "an empty prompt"
        elif isinstance(prompt, list) and prompt:
            chat = all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in prompt)
            problem = None if chat else "a list that is not chat messages ({role, content} with text)"
        else:
            problem = "an empty chat" if prompt == [] else f"{type(prompt).__name__} {prompt!r}"
        if problem:
            raise ConfigError(
                f"prompt_column: row {row} of {name!r} holds {problem}, not a question string or chat messages; "
                f"fix or remove that row, or set prompt_column to the column with the prompts"
            )


def source_fingerprint(dataset_name: str) -> str | None:
    """sha256 of a local dataset's bytes (a file, or every file of a folder), None for a built-in task or Hub id:
    a rerun that resumes must read the prompts the first run read."""
    import hashlib

    path = Path(dataset_name)
    # ``map`` on a save_to_disk dataset writes cache-*.arrow files into its folder: not the source.
    inside = (
        sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("cache-")) if path.is_dir() else []
    )
    files = [path] if path.is_file() else inside
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else "").encode())
        with open(file, "rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _finish(dataset: Dataset, args: DatasetArguments, seed: int) -> Dataset:
    """Chat-format the prompt column and add budgets when the recipe asks for them."""

    def to_chat(row):
        prompt = row[args.prompt_column]
        if isinstance(prompt, str):
            text = f"{prompt}\n{args.prompt_instruction}" if args.prompt_instruction else prompt
            prompt = [{"role": "user", "content": text}]
        return {"prompt": prompt}

    dataset = dataset.map(to_chat, remove_columns=[args.prompt_column])
    # The thinking budget first, so that the prompt reads "Think for ... tokens. Answer in ... tokens."
    if args.thinking_budgets is not None or args.thinking_budget_range is not None:
        dataset = add_budgets(
            dataset,
            budgets=args.thinking_budgets,
            budget_range=tuple(args.thinking_budget_range) if args.thinking_budget_range else None,
            kinds=args.thinking_budget_kinds or ["at_most"],
            seed=seed,
            segment="thinking",
        )
    if args.budgets is not None or args.budget_range is not None:
        try:
            dataset = add_budgets(
                dataset,
                budgets=args.budgets,
                budget_range=tuple(args.budget_range) if args.budget_range else None,
                kinds=args.budget_kinds,
                seed=seed,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return dataset
