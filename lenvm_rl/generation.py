"""Generation shared by the stages that sample: ``rollout``, ``evaluate``, the testbed and the policy stages' EOS ids.

Two generators with one output, per prompt ``num_samples`` (completion ids with the EOS stripped, finished) pairs:
``generate_hf`` (``model.generate``, any device) and ``vllm_sampling.make_vllm_generate`` (one vLLM engine for a
base model and its LoRA adapters). ``generate_hf`` switches off the generation config's own sampling extras, so both
sample what TRL's trainers sample with the same settings (docs/DESIGN.md §2.1).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from lenvm_rl.data_parallel import Ranks, merge_records, part_path, read_jsonl
from lenvm_rl.errors import ConfigError


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    """Every id generation stops on: the tokenizer's EOS and the generation config's (Qwen has two)."""
    ids = {tokenizer.eos_token_id}
    configured = generation_config.eos_token_id if generation_config is not None else None
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def split_completion(token_ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Cut a generated sequence at its first EOS: (tokens before it, whether an EOS was found)."""
    for index, token in enumerate(token_ids):
        if token in eos_ids:
            return token_ids[:index], True
    return token_ids, False


def tokenize_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    logits_processor=None,
) -> list[list[tuple[list[int], bool]]]:
    """For each prompt, ``num_samples`` (completion ids, finished) pairs from ``model.generate``.

    Temperature 0 decodes greedily; otherwise samples with top-k off. The model's generation config may carry
    other sampling defaults (Qwen2.5 Instruct ships a repetition_penalty): it is switched off, so this samples what vLLM
    and TRL's trainers sample with the same settings. ``logits_processor``: a ``transformers.LogitsProcessorList``
    applied at every step (LenVM-guided decoding).
    """
    eos_ids = eos_token_ids(tokenizer, model.generation_config)
    width = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=model.device)  # left pad
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=model.device)
    sampling = dict(do_sample=False)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        **sampling,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_samples,
        repetition_penalty=1.0,
        pad_token_id=pad,
        eos_token_id=sorted(eos_ids),
        logits_processor=logits_processor,
    )
    completions = [split_completion(row, eos_ids) for row in output[:, width:].tolist()]
    return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))]


# ------------------------------------------------------------------ samplers: one call per batch of prompts

Sampler = Callable[[Dataset, list[list[int]], range, int], list[list[tuple[list[int], bool]]]]


def hf_sampler(model, tokenizer, args, logits_processor_for: Callable | None = None) -> Sampler:
    """``sample(batch, prompt_ids, rows, limit)`` with ``model.generate`` and ``args``' ``num_samples``,
    ``temperature`` and ``top_p``; ``logits_processor_for(batch, prompt_ids)`` may return a LogitsProcessorList for
    that batch (guided decoding)."""

    def sample(batch, prompt_ids, rows, limit):
        processors = logits_processor_for(batch, prompt_ids) if logits_processor_for else None
        return generate_hf(
            model,
            tokenizer,
            prompt_ids,
            args.num_samples,
            limit,
            args.temperature,
            args.top_p,
            logits_processor=processors,
        )

    return sample


def check_adapter(adapter: str) -> None:
    """Refuse a LoRA adapter folder without its config, or whose files do not read whole (a copy that did not finish)."""
    from lenvm_rl.faults import file_is_whole

    if not Path(adapter, "adapter_config.json").is_file():
        raise ConfigError(
            f"adapters: {adapter!r} holds no adapter_config.json; give a LoRA output_dir of `lenvm-rl grpo`"
        )
    files = [Path(adapter, "adapter_config.json"), *sorted(Path(adapter).glob("adapter_model.*"))]
    damaged = next((f.name for f in files if not file_is_whole(f)), None if len(files) > 1 else "adapter_model")
    if damaged is not None:
        raise ConfigError(
            f"adapters: {damaged} in {adapter!r} is missing, cut off or corrupt; copy or save the adapter again"
        )


def load_policy(model_name_or_path: str, adapter: str | None, dtype: str):
    """The base model, or the base with a LoRA adapter merged into it, in eval mode on the inference device."""
    from lenvm_rl.loading import inference_device, load_causal_lm

    model = load_causal_lm(model_name_or_path, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        from lenvm_rl.loading import mismatched_shapes

        check_adapter(adapter)
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except RuntimeError as error:
            if not mismatched_shapes(error):
                raise
            raise ConfigError(
                f"adapters: {adapter!r} does not fit {model_name_or_path!r} (its tensor shapes differ: it was trained "
                f"on another base model); evaluate it with the model_name_or_path it was trained on"
            ) from None
    return model.to(inference_device()).eval()


def make_guidance(lenvm, args, eos_ids: set[int]) -> Callable:
    """``logits_processor_for(batch, prompt_ids)``: a LenVM-guided processor for one generate call (``args``:
    ``num_samples`` and the ``guidance_*`` fields of ``evaluate``)."""
    from transformers import LogitsProcessorList

    from lenvm_rl.decoding import LenVMGuidedLogitsProcessor

    def for_batch(batch, prompt_ids: list[list[int]]) -> LogitsProcessorList:
        repeat = args.num_samples  # generate returns the samples of a prompt next to each other
        return LogitsProcessorList(
            [
                LenVMGuidedLogitsProcessor(
                    lenvm,
                    budgets=[b for b in batch["budget_tokens"] for _ in range(repeat)],
                    kinds=[k for k in batch["budget_kind"] for _ in range(repeat)],
                    prompt_lengths=[len(p) for p in prompt_ids for _ in range(repeat)],
                    eos_token_ids=eos_ids,
                    mode=args.guidance_mode,
                    top_k=args.guidance_top_k,
                    top_p=args.guidance_top_p,
                    min_p=args.guidance_min_p,
                    beta=args.guidance_beta,
                )
            ]
        )

    return for_batch


def generate_rows(
    sample: Sampler,
    tokenizer,
    prompts: Dataset,
    path: Path,
    args,
    hard_truncation: bool = False,
    desc: str = "evaluate",
    ranks: Ranks = Ranks(),
) -> list[dict]:
    """Generate for every row of ``prompts`` (num_samples each) into the jsonl ``path``; return its records.

    Batches whose rows are all in ``path`` are skipped (a torn last line is dropped, a torn batch generated again),
    and the file is rewritten in row order at the end. A batch holds rows of one budget: with ``hard_truncation``
    the limit is min(N, max_new_tokens). Each record keeps its share of its batch's generation seconds
    (``seconds``) for the cost per token. Under a data-parallel launch each process generates every ``world``-th
    batch into its own part file, which process 0 merges into ``path`` (batch i is seeded by i alone); the others
    return no records.
    """
    from lenvm_rl.reporting import score_record

    key = lambda record: (record["row"], record["sample_index"])
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks.main_first(lambda: merge_records(path, key))  # what an interrupted run left, parts included
    written = Counter(record["row"] for record in read_jsonl(path))
    batches, begin = [], 0
    budgets = prompts["budget_tokens"]
    for end in range(1, len(prompts) + 1):  # cut batches at batch_size and at every change of budget
        if end == len(prompts) or end - begin == args.batch_size or budgets[end] != budgets[begin]:
            batches.append(range(begin, end))
            begin = end
    mine = ranks.share(list(enumerate(batches)))
    todo = [(index, rows) for index, rows in mine if any(written[row] < args.num_samples for row in rows)]
    share = sum(len(rows) for _, rows in mine)
    sink_path = path if ranks.world == 1 else part_path(path, ranks.rank)
    initial = share - sum(len(rows) for _, rows in todo)
    with (
        open(sink_path, "a") as sink,
        tqdm(total=share, initial=initial, desc=desc, unit="prompt", disable=not ranks.is_main) as progress,
    ):
        for index, rows in todo:
            batch = prompts.select(rows)
            torch.manual_seed(args.seed + index)
            limit = min(budgets[rows.start], args.max_new_tokens) if hard_truncation else args.max_new_tokens
            prompt_ids = tokenize_prompts(tokenizer, batch["prompt"])
            began = time.perf_counter()
            samples = sample(batch, prompt_ids, rows, limit)
            seconds = (time.perf_counter() - began) / (len(rows) * args.num_samples)
            lines = []
            for row_index, row, group in zip(rows, batch, samples):
                for sample_index, (ids, finished) in enumerate(group):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    record = score_record(row, text, len(ids), finished, hard_truncation)
                    lines.append(
                        json.dumps({"row": row_index, "sample_index": sample_index, "seconds": seconds, **record})
                    )
            sink.write("".join(line + "\n" for line in lines))
            sink.flush()
            os.fsync(sink.fileno())
            progress.update(len(rows))
    ranks.barrier()  # every part is written before process 0 merges them
    return ranks.main_first(lambda: merge_records(path, key)) or []
