"""Run `lenvm-rl grpo` with every call of ``assemble_advantages`` recorded, one file per rank and call.

Used by tests/test_multiprocess.py under `accelerate launch`: ``python tests/mp_grpo_probe.py DUMP_DIR --config ...``.
"""

import sys
from pathlib import Path

import torch

from lenvm_rl import grpo

dump_dir = Path(sys.argv[1])
original = grpo.LenVMGRPOTrainer.assemble_advantages


def recorded(self, task_advantages, values_full, prompt_length, completion_mask, finished, budgets=None, kinds=None):
    advantages, length = original(self, task_advantages, values_full, prompt_length, completion_mask, finished, budgets, kinds)
    rank = self.accelerator.process_index
    calls = len(list(dump_dir.glob(f"rank{rank}_*.pt")))
    torch.save({
        "task": task_advantages, "values_full": values_full, "prompt_length": prompt_length,
        "completion_mask": completion_mask, "finished": finished, "budgets": budgets, "kinds": kinds,
        "advantages": advantages, "length": length, "world_size": self.accelerator.num_processes,
    }, dump_dir / f"rank{rank}_{calls}.pt")
    return advantages, length


grpo.LenVMGRPOTrainer.assemble_advantages = recorded
dump_dir.mkdir(parents=True, exist_ok=True)
grpo.main(sys.argv[2:])
