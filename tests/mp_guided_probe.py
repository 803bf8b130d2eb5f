"""Run `lenvm-rl grpo` with every ``correct_guided`` call recorded, one file per rank and call: which local rows were
guided, their recorded log μ and the advantages before and after the importance weights.

Used by tests/test_guided.py under `accelerate launch`: ``python tests/mp_guided_probe.py DUMP_DIR --config ...``.
"""

import sys
from pathlib import Path

import torch

from lenvm_rl import grpo

dump_dir = Path(sys.argv[1])
original = grpo.LenVMGRPOTrainer.correct_guided


def recorded(self, output, batch):
    before = output["advantages"].clone()
    original(self, output, batch)
    rank = self.accelerator.process_index
    calls = len(list(dump_dir.glob(f"rank{rank}_*.pt")))
    torch.save(
        {
            "guided": self.guided_mask,  # the rows guided (guided_rows, or fewer with guided_when: plain_miss)
            "lengths": batch["lengths"],
            "budgets": batch["budgets"],
            "kinds": batch["kinds"],
            "sampling": output["sampling_per_token_logps"],
            "mask": output["completion_mask"],
            "before": before,
            "after": output["advantages"],
            "world_size": self.accelerator.num_processes,
        },
        dump_dir / f"rank{rank}_{calls}.pt",
    )


grpo.LenVMGRPOTrainer.correct_guided = recorded
dump_dir.mkdir(parents=True, exist_ok=True)
grpo.main(sys.argv[2:])
