"""Run `lenvm-rl ppo` and write each rank's task value head, as it stands when the final model is saved.

Used by tests/test_multiprocess.py under `accelerate launch`: ``python tests/mp_ppo_probe.py DUMP_DIR --config ...``.
"""

import sys
from pathlib import Path

import torch

from lenvm_rl import ppo

dump_dir = Path(sys.argv[1])
original = ppo.LenVMPPOTrainer.save_model


def recorded(self, output_dir=None, _internal_call=False):
    head = {k: v.detach().cpu().clone() for k, v in self.task_value_head.state_dict().items()}
    torch.save(head, dump_dir / f"rank{self.accelerator.process_index}_head.pt")
    return original(self, output_dir, _internal_call)


ppo.LenVMPPOTrainer.save_model = recorded
dump_dir.mkdir(parents=True, exist_ok=True)
ppo.main(sys.argv[2:])
