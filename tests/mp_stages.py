"""Run several stages in one launch under ``lenvm_rl.cpu_launch`` (the imports are paid once), and write what each
trainer ran under: ``python tests/mp_stages.py DUMP_DIR STAGES_JSON`` (a JSON list of stage argument lists).

After each ``Trainer.train`` every rank writes ``DUMP_DIR/<n>_rank<r>.json``: the distributed type and world size,
the wrapper class of the policy, of the LenVM (and the live LenVM's optimizer) and, for chosen parameters, how
they are laid out: ``zero3`` (a ZeRO-3 partition), ``dtensor`` (an FSDP2 shard) or ``plain``, with the local and
full element counts and the dtype. Used by tests/test_sharded.py.
"""

import json
import sys
from pathlib import Path

import torch
from transformers import Trainer

from lenvm_rl import cpu_launch

dump_dir, stages = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
original_train = Trainer.train
runs = []


def layout(parameter: torch.Tensor) -> dict:
    if hasattr(parameter, "ds_id"):
        kind, local, full = "zero3", parameter.ds_tensor.numel(), parameter.ds_numel
    elif type(parameter).__name__ == "DTensor" or type(getattr(parameter, "data", None)).__name__ == "DTensor":
        kind, local, full = "dtensor", parameter.to_local().numel(), parameter.numel()
    else:
        kind, local, full = "plain", parameter.numel(), parameter.numel()
    return {"kind": kind, "local": local, "full": full, "dtype": str(parameter.dtype)}


def parameters(module, *names) -> dict:
    return {n: layout(p) for n, p in module.named_parameters() if any(n.endswith(name) for name in names)}


def train(self, *args, **kwargs):
    result = original_train(self, *args, **kwargs)
    facts = {
        "distributed_type": str(self.accelerator.distributed_type).split(".")[-1],
        "world_size": self.accelerator.num_processes,
        "rank": self.accelerator.process_index,
        "model_class": type(self.model_wrapped).__name__,
        "parameters": parameters(self.model_wrapped, "task_value_head.dense.weight", "layers.0.mlp.down_proj.weight"),
    }
    if getattr(self, "lenvm", None) is not None:
        facts["lenvm_class"] = type(self.lenvm).__name__
        facts["lenvm_parameters"] = parameters(self.lenvm, "head.dense.weight", "layers.0.mlp.down_proj.weight")
        facts["lenvm_dtypes"] = sorted({str(p.dtype) for p in self.lenvm.parameters()})
    (dump_dir / f"{len(runs)}_rank{facts['rank']}.json").write_text(json.dumps(facts, indent=1))
    runs.append(facts)
    return result


Trainer.train = train
dump_dir.mkdir(parents=True, exist_ok=True)
for argv in stages:
    cpu_launch.main(argv)
