"""Generation shared by the stages that sample: ``rollout``, ``evaluate``, the testbed and the policy stages' EOS ids.

Two generators with one output, per prompt ``num_samples`` (completion ids with the EOS stripped, finished) pairs:
``generate_hf`` (``model.generate``, any device) and ``make_vllm_generate`` (one vLLM engine for a base model and
its LoRA adapters). ``generate_hf`` switches off the generation config's own sampling extras, so both sample what
TRL's trainers sample with the same settings (docs/DESIGN.md §2.1). vLLM is imported only when an engine is made.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from lenvm_rl.data_parallel import Ranks, merge_records, part_path, read_jsonl, vllm_launch_settings
from lenvm_rl.errors import ConfigError


@dataclass
class VLLMArguments:
    """How a stage's vLLM engine is laid out (``rollout``, ``evaluate``); neither field changes what is sampled.

    Parameters:
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.8`):
            Share of the GPU's memory vLLM takes for weights and KV cache, in (0, 1].
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            GPUs vLLM splits the model over, from one process (the others must be visible to it).
    """

    vllm_gpu_memory_utilization: float = field(default=0.8, metadata={"help": "vLLM's GPU memory share."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs vLLM splits the model over (from one process; the others must be visible)."}
    )

    def check_vllm_layout(self) -> None:
        """Called by the stage's ``__post_init__`` (the dataclass bases do not chain it)."""
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm_gpu_memory_utilization: must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size <= 0:
            raise ConfigError(f"vllm_tensor_parallel_size: must be positive, got {self.vllm_tensor_parallel_size}")


def require_vllm(use_vllm: bool | None) -> None:
    """Refuse ``use_vllm: true`` where vLLM is not installed."""
    import importlib.util

    if use_vllm and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "use_vllm: vLLM is not installed; `pip install 'lenvm-rl[vllm]'` on a GPU machine, or set use_vllm: false"
        )


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


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


def make_vllm_generate(
    model_path: str,
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    eos_ids: set[int],
    dtype: str | None = None,
    gpu_memory_utilization: float = 0.8,
    seed: int = 0,
    adapters: list[str] = (),
    tensor_parallel_size: int = 1,
    ranks: Ranks = Ranks(),
) -> Callable:
    """``generate(prompt_ids, seeds, max_tokens, adapter=None)``: per prompt, ``num_samples`` (ids, finished) pairs.

    One vLLM engine serves the base model and every LoRA adapter folder in ``adapters``, each applied per
    request as a ``LoRARequest`` (no merge, no reload between models). Under a data-parallel launch (``ranks``)
    every process starts its own engine on its own GPU.
    """
    from vllm import LLM

    engine = dict(model=model_path, dtype=dtype or "auto", gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    if tensor_parallel_size > 1:
        engine["tensor_parallel_size"] = tensor_parallel_size
    engine.update(vllm_launch_settings(ranks, tensor_parallel_size))
    if adapters:
        rank = max(json.loads(Path(a, "adapter_config.json").read_text())["r"] for a in adapters)
        fits = [r for r in VLLM_LORA_RANKS if r >= rank]
        if not fits:
            raise ConfigError(
                f"adapters: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); set use_vllm: false"
            )
        engine.update(enable_lora=True, max_lora_rank=fits[0], max_loras=1)
    llm = LLM(**engine)
    lora_ids = {adapter: index for index, adapter in enumerate(adapters, start=1)}

    def generate(prompt_ids, seeds, max_tokens, adapter=None):
        from vllm import SamplingParams

        # One seed per prompt (``vllm_seeds``): a shared seed would give sample k of every prompt the same stream.
        params = [
            SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
            for seed in seeds
        ]
        lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(
                f"{lora_ids[adapter]}-{Path(adapter).name}", lora_ids[adapter], str(adapter)
            )  # unique names
        outputs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False, lora_request=lora
        )
        # finish_reason "stop" = an EOS (or stop token) ended it; "length" = truncated at max_tokens.
        return [
            [(split_completion(list(c.token_ids), eos_ids)[0], c.finish_reason == "stop") for c in o.outputs]
            for o in outputs
        ]

    return generate


def vllm_seeds(seed: int, rows, num_samples: int) -> list[int]:
    """One vLLM seed per request (row). vLLM samples completion k of a request with seed + k, so rows are spaced by
    ``num_samples``: no two completions of a run share a random stream, and row i's seed depends on i alone."""
    return [seed * 1_000_000_007 + row * num_samples for row in rows]


def generation_eos_ids(model_path: str, tokenizer) -> set[int]:
    """The ids a model's generation stops on, read from its folder (for vLLM, which loads no HF model)."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # a model without generation_config.json stops on the tokenizer's EOS only
        generation_config = None
    return eos_token_ids(tokenizer, generation_config)


def vllm_engine(
    model_name_or_path: str, tokenizer, args, num_samples: int, dtype: str | None, adapters=(), ranks: Ranks = Ranks()
) -> Callable:
    """``make_vllm_generate`` for a stage's arguments (``temperature``, ``top_p``, ``seed`` and ``VLLMArguments``):
    the model's own EOS ids, its folder resolved (the embedded default is converted once)."""
    from lenvm_rl.loading import resolve_model_path

    path = resolve_model_path(model_name_or_path)
    return make_vllm_generate(
        path,
        num_samples=num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_ids=generation_eos_ids(path, tokenizer),
        dtype=dtype,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        seed=args.seed,
        adapters=list(adapters),
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        ranks=ranks,
    )


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


def vllm_sampler(generate: Callable, args, adapter: str | None) -> Sampler:
    """``sample(batch, prompt_ids, rows, limit)`` with a ``generation.make_vllm_generate`` engine; row i's seed is
    fixed by i (``generation.vllm_seeds``), so a resumed run asks for what an uninterrupted one would have."""

    def sample(batch, prompt_ids, rows, limit):
        return generate(prompt_ids, vllm_seeds(args.seed, rows, args.num_samples), limit, adapter)

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
