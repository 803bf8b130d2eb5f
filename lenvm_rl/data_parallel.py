"""Data-parallel generation for the stages that only generate (`rollout`, `evaluate`) under `accelerate launch`.

Every process takes every world-th unit of work (a rollout shard, an evaluation batch) on its own device, with its
own model or vLLM engine; process 0 alone writes what concerns all of them (the manifest, the merged files, the
report). A unit's random seed depends on the unit alone, never on the rank, so the output equals a one-process
run's whatever the number of processes. Written by hand: accelerate's ``split_between_processes`` splits a list
contiguously and by count, where resuming needs a split that does not change as units finish.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from lenvm_rl.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a data-parallel launch (``rank`` 0 of ``world`` 1 when not launched)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, units: Sequence[T]) -> list[T]:
        """This process's units: every ``world``-th, starting at ``rank``."""
        return list(units[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def main_first(self, step: Callable[[], T]) -> T | None:
        """Run ``step`` on process 0 while the others wait; a ConfigError it raises is raised on every process
        (one line each, exit 2), so no process is left waiting for one that has failed."""
        result, message = None, None
        if self.is_main:
            try:
                result = step()
            except ConfigError as error:
                message = str(error)
        if self.world > 1:
            shared = [message]
            torch.distributed.broadcast_object_list(shared, src=0)
            message = shared[0]
        if message is not None:
            raise ConfigError(message)
        return result


def launched_ranks() -> Ranks:
    """The ranks of this launch; with several processes, joins their process group through accelerate's
    ``PartialState`` (gloo on the CPU, NCCL on GPUs, one GPU per process: ``LOCAL_RANK``'s)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()  # without it accelerate runs each CPU process alone (DistributedType.NO)
    state = PartialState(cpu=cpu, backend="gloo" if cpu else None)
    if state.num_processes != world:
        raise ConfigError(
            f"accelerate launch: started {world} processes (WORLD_SIZE) but they joined as {state.num_processes}; "
            f"launch with a multi-process config such as accelerate_configs/ddp.yaml or cpu_2proc.yaml"
        )
    if state.device.type == "cuda":
        torch.cuda.set_device(state.device)  # the HF model and the LenVM go to this process's GPU
    return Ranks(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index)


def vllm_launch_settings(ranks: Ranks, tensor_parallel_size: int) -> dict:
    """The engine arguments for one vLLM engine per group of ``tensor_parallel_size`` processes, as TRL's colocate
    mode starts them (``trl/generation/vllm_generation.py``): vLLM joins the launch's process group
    (``external_launcher``), each process on its own GPU. Empty for a one-process run."""
    if ranks.world == 1:
        return {}
    if ranks.world % tensor_parallel_size:
        raise ConfigError(
            f"vllm_tensor_parallel_size: {tensor_parallel_size} must divide the number of processes ({ranks.world}); "
            f"launch a multiple of it, or set it to 1 for one engine per GPU"
        )
    if tensor_parallel_size > 1:
        raise ConfigError(
            f"vllm_tensor_parallel_size: {tensor_parallel_size} with {ranks.world} processes is not supported; "
            f"set it to 1 (one engine per GPU, prompts split between them), or run one process that spreads the "
            f"model over vllm_tensor_parallel_size GPUs"
        )
    for name, value in (("RANK", ranks.rank), ("LOCAL_RANK", ranks.local_rank), ("WORLD_SIZE", ranks.world)):
        os.environ[name] = str(value)
    return dict(distributed_executor_backend="external_launcher")


def part_path(path: Path, rank: int) -> Path:
    """Where process ``rank`` appends its records of the jsonl ``path`` before process 0 merges them."""
    return path.with_name(f"{path.stem}.part-{rank}{path.suffix}")


def parts_of(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.part-*{path.suffix}"))


def read_jsonl(path: Path, key: Callable[[dict], tuple] | None = None) -> list[dict]:
    """The complete records of a jsonl file. A torn last line (an interrupted write) is left out; so is a damaged line
    anywhere (not a JSON object, or without the fields ``key`` reads), with a notice on stderr: the records are keyed,
    so the work it held is simply done again."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(keepends=True), 1):
        if not line.endswith("\n"):
            continue
        try:
            record = json.loads(line)
            if key is not None:
                key(record)
        except (ValueError, KeyError, TypeError):  # TypeError: a JSON value that is not an object
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            print(f"lenvm-rl: {path}: line {number} is damaged; left out, and generated again", file=sys.stderr)
    return records


def merge_records(path: Path, key: Callable[[dict], tuple]) -> list[dict]:
    """Fold the part files of ``path`` into it: every record once (the first of equal ``key``), sorted by ``key``;
    written to a temporary file and renamed over ``path``, then the parts are deleted. Returns the records."""
    parts = parts_of(path)
    records, seen = [], set()
    for source in [path, *parts]:
        for record in read_jsonl(source, key):
            if key(record) not in seen:
                seen.add(key(record))
                records.append(record)
    records.sort(key=key)
    staging = path.with_name(f".{path.name}.merging")
    staging.write_text("".join(json.dumps(record) + "\n" for record in records))
    staging.replace(path)
    for part in parts:
        part.unlink()
    return records
