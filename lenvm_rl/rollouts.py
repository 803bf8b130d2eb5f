"""Sample K completions per prompt from a policy and write them as a sharded ``datasets`` dataset.

Each shard covers ``shard_size`` consecutive prompts and is written to a staging folder, then renamed
into ``<output_dir>/shards/``: a rename is atomic, so an interrupted run leaves only whole shards, and
a rerun with the same settings skips them (no duplicated or missing rows). Shard ``i`` is sampled
with seed ``seed + i`` (vLLM: one seed per prompt), so a resumed run writes what an uninterrupted
one would have.

Row columns: ``prompt_id``, ``sample_index``, ``prompt`` (chat messages), ``prompt_ids``,
``completion_ids`` (EOS stripped), ``completion`` (text), ``completion_tokens`` (L, EOS excluded),
``finished`` (ended with EOS within the limit; False = truncated), and the source's other columns
(``answer``, ``budget_tokens``, ``budget_kind``, ...).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from lenvm_rl.data import DatasetArguments, load_prompts, source_fingerprint
from lenvm_rl.data_parallel import Ranks, launched_ranks, vllm_launch_settings
from lenvm_rl.errors import ConfigError, changed_setting, require_vllm
from lenvm_rl.loading import inference_device, load_causal_lm, load_tokenizer, resolve_model_path

MANIFEST = "rollout_args.json"


@dataclass
class RolloutArguments(DatasetArguments):
    output_dir: str = field(default="runs/rollouts", metadata={"help": "Folder of the sharded rollout dataset."})
    num_samples_per_prompt: int = field(default=8, metadata={"help": "K completions sampled per prompt."})
    max_completion_tokens: int = field(default=256, metadata={"help": "Generation limit; longer = truncated."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    prompts_per_batch: int = field(default=8, metadata={"help": "Prompts per generate call (x K sequences)."})
    shard_size: int = field(default=32, metadata={"help": "Prompts per shard (the unit of resumption)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; shard i uses seed + i."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (GPU; `pip install lenvm-rl[vllm]`)."})
    vllm_gpu_memory_utilization: float = field(default=0.8, metadata={"help": "vLLM's GPU memory share."})
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "GPUs vLLM splits the model over (from one process; the others must be visible)."}
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_samples_per_prompt", "max_completion_tokens", "prompts_per_batch", "shard_size", "vllm_tensor_parallel_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive (sampling), got {self.temperature}")
        require_vllm(self.use_vllm)


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
            raise ConfigError(f"adapters: LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]}); set use_vllm: false")
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

            lora = LoRARequest(f"{lora_ids[adapter]}-{Path(adapter).name}", lora_ids[adapter], str(adapter))  # unique names
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


def check_manifest(output_dir: Path, args: RolloutArguments, model_name: str, dtype: str | None) -> None:
    """Refuse to resume into a folder written with other settings: the shards would not match."""
    settings = {**asdict(args), "model_name_or_path": model_name, "dtype": dtype}
    settings["dataset_sha256"] = source_fingerprint(args.dataset_name)  # an edited file keeps its name
    settings.pop("output_dir")
    manifest = output_dir / MANIFEST
    if manifest.exists() and any((output_dir / "shards").glob("shard-*")):
        previous = json.loads(manifest.read_text())
        layout = ("vllm_gpu_memory_utilization", "vllm_tensor_parallel_size")  # how vLLM runs, not what it samples
        k = changed_setting(previous, settings, ignore=layout)
        if k == "dataset_sha256":
            raise ConfigError(
                f"dataset_name: {args.dataset_name!r} changed since the rollouts in {output_dir} were sampled from it "
                f"(its sha256 differs from {manifest}); restore it, or use a new output_dir to sample the new prompts"
            )
        if k is not None:
            raise ConfigError(
                f"output_dir: {output_dir} holds rollouts made with other settings ({k}: {previous.get(k)!r} "
                f"there, {settings.get(k)!r} now); use a new output_dir to sample afresh"
            )
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps(settings, indent=2))


def run_rollouts(
    args: RolloutArguments, model_name_or_path: str, dtype: str | None = None, ranks: Ranks = Ranks()
) -> Path:
    """Sample the shards not yet in ``args.output_dir``; under a data-parallel launch each process samples every
    ``world``-th of them (shard i is seeded by i alone, so the shards are those a single process writes)."""
    from lenvm_rl.precision import resolve_dtype

    output_dir = Path(args.output_dir)
    dtype = resolve_dtype(dtype, inference_device().type)  # the manifest records what "auto" became
    prompts = load_prompts(args)
    shard_dir = output_dir / "shards"

    def prepare() -> None:
        check_manifest(output_dir, args, model_name_or_path, dtype)
        shard_dir.mkdir(exist_ok=True)
        for stale in output_dir.glob(".staging-*"):  # a shard an interrupted run did not finish writing
            shutil.rmtree(stale)

    ranks.main_first(prepare)
    tokenizer = load_tokenizer(model_name_or_path)
    num_shards = -(-len(prompts) // args.shard_size)
    todo = ranks.share([i for i in range(num_shards) if not (shard_dir / f"shard-{i:05d}").exists()])
    if not todo:
        ranks.barrier()
        return output_dir

    def shard_rows(shard: int) -> range:
        return range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(prompts)))
    if args.use_vllm:
        path = resolve_model_path(model_name_or_path)
        generate_vllm = make_vllm_generate(
            path, num_samples=args.num_samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
            eos_ids=generation_eos_ids(path, tokenizer), dtype=dtype,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed,
            tensor_parallel_size=args.vllm_tensor_parallel_size, ranks=ranks,
        )
    else:
        model = load_causal_lm(model_name_or_path, dtype=dtype).to(inference_device()).eval()
    extra_columns = [c for c in prompts.column_names if c != "prompt"]
    remaining = sum(len(shard_rows(i)) for i in todo)
    share = sum(len(shard_rows(i)) for i in ranks.share(range(num_shards)))
    progress = tqdm(total=share, initial=share - remaining, desc="rollouts", unit="prompt", disable=not ranks.is_main)
    for shard in todo:
        torch.manual_seed(args.seed + shard)
        rows = prompts.select(shard_rows(shard))
        records = []
        for start in range(0, len(rows), args.prompts_per_batch):
            batch = rows.select(range(start, min(start + args.prompts_per_batch, len(rows))))
            prompt_ids = tokenize_prompts(tokenizer, batch["prompt"])
            first_prompt_id = args.skip_prompts + shard_rows(shard)[start]
            if args.use_vllm:
                seeds = vllm_seeds(args.seed, range(first_prompt_id, first_prompt_id + len(prompt_ids)), args.num_samples_per_prompt)
                samples = generate_vllm(prompt_ids, seeds, args.max_completion_tokens)
            else:
                samples = generate_hf(
                    model, tokenizer, prompt_ids, args.num_samples_per_prompt, args.max_completion_tokens,
                    args.temperature, args.top_p,
                )
            for offset, (row, ids, group) in enumerate(zip(batch, prompt_ids, samples)):
                for sample_index, (completion_ids, finished) in enumerate(group):
                    records.append({
                        "prompt_id": first_prompt_id + offset,
                        "sample_index": sample_index,
                        "prompt": row["prompt"],
                        "prompt_ids": ids,
                        "completion_ids": completion_ids,
                        "completion": tokenizer.decode(completion_ids, skip_special_tokens=True),
                        "completion_tokens": len(completion_ids),
                        "finished": finished,
                        **{c: row[c] for c in extra_columns},
                    })
            progress.update(len(batch))
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
        Dataset.from_list(records).save_to_disk(str(staging))
        staging.rename(shard_dir / f"shard-{shard:05d}")
    progress.close()
    ranks.barrier()  # every shard is written before any process reads the folder
    return output_dir


def load_rollouts(path: str | Path) -> Dataset:
    """All shards of a rollout folder as one dataset, in prompt order."""
    shard_dir = Path(path) / "shards"
    shards = sorted(shard_dir.glob("shard-*")) if shard_dir.is_dir() else []
    if not shards:
        raise ConfigError(f"rollouts_path: {path} holds no rollout shards; run `lenvm-rl rollout` into it first")
    return concatenate_datasets([load_shard(shard) for shard in shards])


def load_shard(shard: Path) -> Dataset:
    try:
        dataset = load_from_disk(str(shard))
        dataset.data.validate(full=True)  # the columns are memory-mapped: a cut-off file shows only when read
        return dataset
    except Exception as error:  # a truncated arrow file, a cut-off state.json: pyarrow and json raise many types
        raise ConfigError(
            f"rollouts_path: the shard {shard} is corrupt ({type(error).__name__}: {str(error).splitlines()[0][:80]}); "
            f"delete that folder and rerun `lenvm-rl rollout` with the same recipe: it samples that shard again"
        ) from None


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl rollout --config recipes/<Model>/rollout/config_<variant>.yaml`"""
    from trl import ModelConfig

    from lenvm_rl.cli import parse_recipe
    from lenvm_rl.outputs import check_output_dir

    args, model_args = parse_recipe((RolloutArguments, ModelConfig), argv)
    ranks = launched_ranks()
    inputs = {"model_name_or_path": model_args.model_name_or_path, "dataset_name": args.dataset_name}
    ranks.main_first(lambda: check_output_dir(args.output_dir, inputs))
    output_dir = run_rollouts(args, model_args.model_name_or_path or "smollm2-135m-instruct", model_args.dtype, ranks)
    if not ranks.is_main:
        return
    rollouts = load_rollouts(output_dir)
    finished = sum(rollouts["finished"])
    mean_tokens = sum(rollouts["completion_tokens"]) / len(rollouts)
    processes = f" ({ranks.world} processes)" if ranks.world > 1 else ""
    print(
        f"{len(rollouts)} rollouts in {output_dir}{processes}: {finished} finished, {len(rollouts) - finished} "
        f"truncated, mean {mean_tokens:.1f} tokens"
    )
