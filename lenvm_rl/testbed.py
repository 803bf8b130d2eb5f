"""A learning testbed for token budgets: a task, a word-level tokenizer and a tiny Llama trained from scratch,
small enough that GRPO runs hundreds of steps on two CPU cores in minutes (issue #8).

The task ("addition with a budget tracker"). The prompt asks "What is a + b ?" (a, b in 0..``MAX_OPERAND``)
and, after the budget transform (``lenvm_rl.budgets.add_budgets``), "Answer in exactly|at most|at least N tokens."
A solution is k >= 0 steps, then ``#### <a + b>``: L = k + 2 tokens (EOS excluded). Step i writes N - (i + 2),
the budget that would be left if the solution ended right after it (stand-ins for reasoning tokens that track
the budget, as a person counting words would; they carry nothing about the answer). Every length from 2 up is a
valid solution, so the length is a free choice and correctness (the number after ``####``, read by the shared
``rewards.correctness.is_correct``) does not depend on it. The length is decided by one kind of action, writing
``####`` instead of the next step: the starting policy writes the tracker but stops at random; ending right
after the step "0" gives L = N exactly.

Two earlier designs did not learn in the step counts a CPU allows, which is why the tracker is in the solution:
(1) steps drawn as sorted random numbers between a and a + b: the chain helped the answer (accuracy rose with
length) and GRPO moved the held-out length score from 0.53 to 0.62 in 75 steps; (2) steps numbered 1 .. k: the
policy shifted all its lengths together (towards the budget-blind optimum near 30 tokens) but learned no
dependence on the budget in 150 steps, because the starting policy never attends to the budget token.

The tokenizer is word-level (whitespace-split): every number 0..``NUMBER_TOKENS - 1`` is one token, so the
budget N in the prompt is one token the policy can read, and a length in tokens is a count of words.

The second task ("plan then count down", ``--form plan``): the same prompts, a solution that announces its
plan first: ``N plan K : <a + b>`` (N the budget, restated), then K steps of ``PLAN_STEP_TOKENS`` tokens, each a
countdown number (K - 1 .. 0) followed by filler words drawn at random, then ``#### <a + b>``: L = 5 + 4 K + 2
tokens. The length is fixed by one choice in the first three tokens (K); the fillers vary from token to token
without changing it, and the countdown makes the stop follow from K, as a reasoning model's announced plan or
step count sets its length long before it stops. K is uniform in [``PLAN_MIN_STEPS``, ``PLAN_MAX_STEPS``] in the
SFT data (L 23..103, mean 63), independent of the budget ({32, 64, 96}): the starting policy is budget-blind and must learn to pick K.
Built for that regime, where a critic can know the length early, not for a result (docs/BENCHMARKS.md).

The third task ("think, then answer", ``--form think``, ``lenvm_rl.testbed_thinking``): a thinking section of
budget-tracker steps between ``<think>`` and ``</think>``, then the answer's tracker steps and ``#### <a + b>``; the
prompt carries a thinking budget and an answer budget, and both lengths are drawn independently of them in the SFT
data.

The starting policy. ``main`` (``python -m lenvm_rl.testbed --output_dir runs/testbed/sft``) trains a Llama
of about 0.14M parameters from scratch with transformers' ``Trainer`` on solutions whose length L is drawn
uniformly from [``MIN_SOLUTION_TOKENS``, ``MAX_SOLUTION_TOKENS``] independently of the budget in the prompt:
the policy learns to add and to stop, but not to follow budgets. That is what GRPO has to teach.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

from lenvm_rl.budgets import DEFAULT_TEMPLATES
from lenvm_rl.errors import ConfigError
from lenvm_rl.testbed_thinking import (
    THINK_ANSWER_BUDGETS,
    THINK_ANSWER_MAX_STEPS,
    THINK_BUDGETS,
    THINK_MAX_STEPS,
    THINK_MAX_TOKENS,
    thinking_words,
    write_thinking_solution,
)

MAX_OPERAND = 19
NUMBER_TOKENS = 200  # "0" .. "199": operands, sums (<= 38) and budgets are one token each
NEGATIVE_TOKENS = 40  # "-1" .. "-40": the budget tracker of a solution longer than its budget
MIN_SOLUTION_TOKENS = 2  # "#### s"
MAX_SOLUTION_TOKENS = 40
BUDGETS = (8, 16, 32)
FORMS = ("tracker", "plan", "think")  # a budget tracker; a plan set early; think, then answer (testbed_thinking)
PLAN_MIN_STEPS, PLAN_MAX_STEPS = 4, 24
PLAN_STEP_TOKENS = 4  # a countdown number and three fillers
PLAN_WORDS = ("plan", ":")
PLAN_FILLERS = ("x", "y", "z", "w")
PLAN_BUDGETS = (32, 64, 96)
PLAN_HEAD_TOKENS = 5  # N plan K : a+b
PLAN_MAX_TOKENS = PLAN_HEAD_TOKENS + PLAN_STEP_TOKENS * PLAN_MAX_STEPS + MIN_SOLUTION_TOKENS  # 103
QUESTION = "What is {a} + {b} ?"
ANSWER_MARKER = "####"
SPECIAL_TOKENS = ("<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>")
# The assistant turn ends with <eos>, so the SFT loss teaches stopping; the generation prompt ends at <|assistant|>.
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|> {{ m.content }} <eos> "
    "{% else %}<|{{ m.role }}|> {{ m.content }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def draw_problem(rng: random.Random) -> tuple[int, int]:
    """Operands (a, b), each uniform in 0..MAX_OPERAND."""
    return rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)


def make_testbed_dataset(num_prompts: int, seed: int = 0) -> Dataset:
    """``num_prompts`` problems, columns ``prompt`` (one user message "What is a + b ?") and ``answer`` (a + b).

    Deterministic for a seed, and a prefix of the problems for a larger ``num_prompts`` (held-out sets take a
    disjoint slice; ``lenvm_rl.data.load_prompts`` then drops repeats of the skipped problems).

    >>> row = make_testbed_dataset(1, seed=0)[0]
    >>> row["prompt"][0]["content"], row["answer"]
    ('What is 12 + 13 ?', '25')
    """
    if num_prompts <= 0:
        raise ConfigError(f"num_prompts: must be positive, got {num_prompts}")
    rng = random.Random(seed)
    problems = [draw_problem(rng) for _ in range(num_prompts)]
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": QUESTION.format(a=a, b=b)}] for a, b in problems],
            "answer": [str(a + b) for a, b in problems],
        }
    )


def write_solution(a: int, b: int, solution_tokens: int, budget_tokens: int) -> str:
    """A correct solution of exactly ``solution_tokens`` words: steps i = 1 .. k (k = solution_tokens - 2) that
    write N - (i + 2) for the budget N = ``budget_tokens``, then #### a + b.

    >>> write_solution(3, 4, 6, budget_tokens=5), write_solution(3, 4, 2, budget_tokens=5)
    ('2 1 0 -1 #### 7', '#### 7')
    """
    if solution_tokens < MIN_SOLUTION_TOKENS:
        raise ConfigError(
            f"solution_tokens: a solution has at least {MIN_SOLUTION_TOKENS} tokens, got {solution_tokens}"
        )
    steps = [budget_tokens - (i + MIN_SOLUTION_TOKENS) for i in range(1, solution_tokens - MIN_SOLUTION_TOKENS + 1)]
    return " ".join([*map(str, steps), ANSWER_MARKER, str(a + b)])


def write_plan_solution(a: int, b: int, steps: int, rng: random.Random, budget_tokens: int) -> str:
    """The second task's solution: ``N plan K : a + b``, K steps (countdown K - 1 .. 0, then three random fillers
    each), ``#### a + b``: 5 + 4 K + 2 words, whatever fillers are drawn.

    The budget N is restated first, as a reasoning model restates its budget: the policy then attends to it, and
    choosing K from the token before it is learnable (without it, 150 GRPO steps of either arm moved nothing). The
    sum is written next to the prompt and copied at the end, so that a tiny policy stays accurate however long its
    plan (with the sum only at the end, 100 tokens after the operands, a 0.14M-parameter policy reached 0.87).

    >>> write_plan_solution(3, 4, 2, random.Random(0), budget_tokens=32)
    '32 plan 2 : 7 1 w w x 0 z w w #### 7'
    """
    if steps < 0:
        raise ConfigError(f"steps: a plan has at least 0 steps, got {steps}")
    words = [str(budget_tokens), "plan", str(steps), ":", str(a + b)]
    for remaining in range(steps - 1, -1, -1):
        words += [str(remaining), *(rng.choice(PLAN_FILLERS) for _ in range(PLAN_STEP_TOKENS - 1))]
    return " ".join([*words, ANSWER_MARKER, str(a + b)])


def plan_length(steps: int) -> int:
    """Tokens of a plan solution with ``steps`` steps (EOS excluded)."""
    return PLAN_HEAD_TOKENS + PLAN_STEP_TOKENS * steps + MIN_SOLUTION_TOKENS


def make_tokenizer(form: str = "tracker") -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace split) over the task's words, the budget instructions and -40..199.

    Decoding joins tokens with single spaces, so a completion decodes to the text the rewards read.

    >>> tokenizer = make_tokenizer()
    >>> ids = tokenizer("12 30 #### 42", add_special_tokens=False)["input_ids"]
    >>> len(ids), tokenizer.decode(ids)
    (4, '12 30 #### 42')
    """
    if form not in FORMS:
        raise ConfigError(f"form: {form!r} is not a testbed task; use one of {', '.join(FORMS)}")
    words = QUESTION.replace("{a}", "").replace("{b}", "").split() + [ANSWER_MARKER]
    for template in DEFAULT_TEMPLATES.values():
        words += template.replace("{N}", "").split()
    if form == "plan":  # after the first task's words: their ids are the same in both tokenizers
        words += [*PLAN_WORDS, *PLAN_FILLERS]
    if form == "think":
        words += thinking_words()
    numbers = [*map(str, range(NUMBER_TOKENS)), *(str(-n) for n in range(1, NEGATIVE_TOKENS + 1))]
    vocabulary = [*SPECIAL_TOKENS, *numbers, *dict.fromkeys(words)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def make_model(
    tokenizer, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, max_positions: int = 128
) -> LlamaForCausalLM:
    """A randomly initialised Llama (about 0.13M parameters at the defaults) whose generation stops on <eos>."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def make_sft_dataset(
    tokenizer, num_examples: int, seed: int, budgets=None, kinds=("exact", "at_most", "at_least"), form="tracker"
) -> Dataset:
    """Tokenised SFT rows: ``input_ids`` = prompt + solution + <eos>, ``labels`` = -100 on the prompt.

    Every prompt carries a budget (uniform over ``budgets``, default the form's, and ``kinds``), and the
    solution's length is drawn independently of it: uniform in [MIN_SOLUTION_TOKENS, MAX_SOLUTION_TOKENS]
    (tracker), or K uniform in [PLAN_MIN_STEPS, PLAN_MAX_STEPS] steps (plan).
    """
    from lenvm_rl.generation import tokenize_prompts

    rng = random.Random(f"{seed}-lengths")  # not random.Random(seed): that would replay the operands' draws
    prompts = budgeted_problems(num_examples, seed, form, kinds, budgets)
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"])
    rows = {"input_ids": [], "labels": []}
    for ids, row in zip(prompt_ids, prompts, strict=True):
        a, b = (int(word) for word in row["prompt"][0]["content"].split()[2:5:2])  # "What is a + b ?"
        if form == "think":
            steps = rng.randint(0, THINK_MAX_STEPS), rng.randint(0, THINK_ANSWER_MAX_STEPS)
            solution = write_thinking_solution(a, b, *steps, row["thinking_budget_tokens"], row["budget_tokens"])
        elif form == "plan":
            solution = write_plan_solution(a, b, rng.randint(PLAN_MIN_STEPS, PLAN_MAX_STEPS), rng, row["budget_tokens"])
        else:
            solution = write_solution(a, b, rng.randint(MIN_SOLUTION_TOKENS, MAX_SOLUTION_TOKENS), row["budget_tokens"])
        solution = tokenizer(solution, add_special_tokens=False)["input_ids"]
        rows["input_ids"].append(ids + solution + [tokenizer.eos_token_id])
        rows["labels"].append([-100] * len(ids) + solution + [tokenizer.eos_token_id])
    return Dataset.from_dict(rows)


def collate_sft(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` (B, T) with pad, ``labels`` (B, T) with -100; ``attention_mask`` (B, T)."""
    width = max(len(row["input_ids"]) for row in rows)
    pad = lambda values, fill: [*values, *[fill] * (width - len(values))]
    return {
        "input_ids": torch.tensor([pad(r["input_ids"], pad_token_id) for r in rows]),
        "labels": torch.tensor([pad(r["labels"], -100) for r in rows]),
        "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
    }


def form_budgets(form: str) -> tuple[int, ...]:
    """The (answer) budgets of a testbed task."""
    return {"plan": PLAN_BUDGETS, "think": THINK_ANSWER_BUDGETS}.get(form, BUDGETS)


def form_max_tokens(form: str) -> int:
    """The longest solution of a testbed task (tokens, EOS excluded)."""
    return {"plan": PLAN_MAX_TOKENS, "think": THINK_MAX_TOKENS}.get(form, MAX_SOLUTION_TOKENS)


def budgeted_problems(num_prompts: int, seed: int, form: str, kinds=("exact", "at_most", "at_least"), budgets=None):
    """``num_prompts`` problems with the form's budgets, every kind: the answer's, and the thinking's first for
    ``think`` (``THINK_BUDGETS``), as ``dataset_name: testbed`` with the recipe's budgets writes them."""
    from lenvm_rl.budgets import add_budgets

    prompts = make_testbed_dataset(num_prompts, seed=seed)
    if form == "think":
        prompts = add_budgets(prompts, budgets=list(THINK_BUDGETS), kinds=list(kinds), seed=seed, segment="thinking")
    budgets = form_budgets(form) if budgets is None else budgets
    return add_budgets(prompts, budgets=list(budgets), kinds=list(kinds), seed=seed)


@torch.no_grad()
def sample_accuracy(
    model, tokenizer, num_prompts: int = 256, seed: int = 12345, temperature: float = 1.0, form: str = "tracker"
) -> dict:
    """Accuracy and mean solution length (tokens, EOS excluded) of one sampled completion per budgeted prompt."""
    from lenvm_rl.generation import generate_hf, tokenize_prompts
    from rewards.correctness import is_correct

    prompts = budgeted_problems(num_prompts, seed, form)
    correct, lengths, finished = 0, [], 0
    torch.manual_seed(seed)
    for start in range(0, num_prompts, 64):
        batch = prompts.select(range(start, min(start + 64, num_prompts)))
        prompt_ids = tokenize_prompts(tokenizer, batch["prompt"])
        samples = generate_hf(model.eval(), tokenizer, prompt_ids, 1, form_max_tokens(form) + 8, temperature)
        for row, [(ids, done)] in zip(batch, samples, strict=True):
            correct += is_correct(tokenizer.decode(ids, skip_special_tokens=True), row["answer"])
            lengths.append(len(ids))
            finished += done
    return {
        "accuracy": correct / num_prompts,
        "mean_tokens": sum(lengths) / num_prompts,
        "finished": finished / num_prompts,
    }


@dataclass
class TestbedSFTArguments:
    output_dir: str = field(
        default="runs/testbed/sft", metadata={"help": "Folder of the trained policy and tokenizer."}
    )
    form: str = field(
        default="tracker", metadata={"help": "The task: tracker (the first), plan (the second) or think (two budgets)."}
    )
    num_examples: int = field(default=40_000, metadata={"help": "SFT rows (problem, budget, solution length drawn)."})
    hidden_size: int = field(default=64, metadata={"help": "Llama hidden size (intermediate = 3x)."})
    num_layers: int = field(default=2, metadata={"help": "Llama decoder layers."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the SFT rows."})
    batch_size: int = field(default=64, metadata={"help": "Rows per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW peak learning rate (cosine decay)."})
    seed: int = field(default=0, metadata={"help": "Seed of the weights, the SFT data and the shuffling."})


def train_sft(args: TestbedSFTArguments) -> dict:
    """Train the starting policy from scratch and save it (model, tokenizer) to ``args.output_dir``.

    Returns the sampled accuracy / length summary of ``sample_accuracy`` on fresh problems, and the wall time.
    """
    start = time.perf_counter()
    tokenizer = make_tokenizer(args.form)
    positions = 128 if args.form == "tracker" else 160  # prompt (<= 16 tokens) + the longest solution + EOS
    model = make_model(
        tokenizer, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed, max_positions=positions
    )
    train_rows = make_sft_dataset(tokenizer, args.num_examples, seed=args.seed + 1, form=args.form)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=50,
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        data_collator=lambda rows: collate_sft(rows, tokenizer.pad_token_id),
    )
    trainer.train()
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    summary = sample_accuracy(model, tokenizer, form=args.form)
    summary["wall_s"] = time.perf_counter() - start
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    return summary


def main(argv: list[str] | None = None) -> None:
    """`python -m lenvm_rl.testbed [--output_dir runs/testbed/sft] [--num_examples N] ...`"""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(TestbedSFTArguments).parse_args_into_dataclasses(argv)
    summary = train_sft(args)
    print(
        f"testbed policy in {args.output_dir}: {summary['parameters']:,} parameters, sampled accuracy "
        f"{summary['accuracy']:.3f}, mean length {summary['mean_tokens']:.1f} tokens, finished "
        f"{summary['finished']:.3f}, {summary['wall_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
