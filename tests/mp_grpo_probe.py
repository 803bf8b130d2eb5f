"""Run `lenvm-rl grpo` with every call of the ``length_advantages`` hook recorded, one file per rank and call, and
each rank's LenVM weights as they stand when the final model is saved.

Used by tests/test_multiprocess.py under `accelerate launch`: ``python tests/mp_grpo_probe.py DUMP_DIR --config ...``.
"""

import sys
from pathlib import Path

import torch

from lenvm_rl import grpo

dump_dir = Path(sys.argv[1])
original_hook, original_save = grpo.LenVMGRPOTrainer.length_advantages, grpo.LenVMGRPOTrainer.save_model


def recorded(self, output, batch):
    length = original_hook(self, output, batch)
    rank = self.accelerator.process_index
    calls = len(list(dump_dir.glob(f"rank{rank}_[0-9]*.pt")))
    torch.save(
        {
            "task": output["advantages"],
            "values_full": batch["values_full"],
            "prompt_length": output["prompt_ids"].size(1),
            "completion_mask": output["completion_mask"],
            "finished": batch["finished"],
            "budgets": batch["budgets"],
            "kinds": batch["kinds"],
            "length": length,
            "world_size": self.accelerator.num_processes,
        },
        dump_dir / f"rank{rank}_{calls}.pt",
    )
    return length


def save_model(self, output_dir=None, _internal_call=False):
    lenvm = self.accelerator.unwrap_model(self.lenvm)
    torch.save(
        {k: v.detach().cpu().clone() for k, v in lenvm.state_dict().items()},
        dump_dir / f"rank{self.accelerator.process_index}_lenvm.pt",
    )
    return original_save(self, output_dir, _internal_call)


grpo.LenVMGRPOTrainer.length_advantages = recorded
grpo.LenVMGRPOTrainer.save_model = save_model
dump_dir.mkdir(parents=True, exist_ok=True)
grpo.main(sys.argv[2:])
