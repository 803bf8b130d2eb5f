"""Run several stages in one launch under ``lenvm_rl.cpu_launch`` (the imports are paid once), and write what each
trainer ran under: ``python tests/mp_stages.py DUMP_DIR STAGES_JSON`` (a JSON list of stage argument lists).
With ``MP_STAGES_DEEPSPEED_BF16=1`` a stage given ``--bf16 true`` runs DeepSpeed in bf16 on the CPU.

After each ``Trainer.train`` every rank writes ``DUMP_DIR/<n>_rank<r>.json``: the distributed type and world size,
the wrapper class of the policy, of the LenVM (and the live LenVM's optimizer) and, for chosen parameters, how
they are laid out: ``zero3`` (a ZeRO-3 partition), ``dtensor`` (an FSDP2 shard) or ``plain``, with the local and
full element counts and the dtype; the dtypes of the trained model's parameters; and the LenVM's logits z (B, S) on
fixed tokens with their dtype and the dtype each of its head's linear layers computed in (train-lenvm: the model
just trained; grpo, ppo: the frozen LenVM, as prepared for the launch). Used by tests/test_sharded.py.
"""

import json
import os
import sys
from pathlib import Path

import torch
import transformers.training_args
from transformers import Trainer

from lenvm_rl import cpu_launch
from lenvm_rl.modeling import LenVMModel

dump_dir, stages = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
if os.environ.get("MP_STAGES_DEEPSPEED_BF16") == "1":
    # transformers refuses bf16 without a GPU unless use_cpu is set, and with use_cpu accelerate drops DeepSpeed;
    # DeepSpeed's CPU accelerator runs bf16 itself (engine casts, zero.Init dtype, float32 masters), as on a GPU.
    transformers.training_args.is_torch_bf16_gpu_available = lambda: True
original_train = Trainer.train
PROBE_IDS = torch.arange(3, 13).view(2, 5)  # (B, S) tokens of the tiny tokenizer
HEAD_LAYERS = ("head.dense", "head.out")  # the LenVM head's two linear layers: the dtype each computes in
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
    facts["model_dtypes"] = sorted({str(p.dtype) for p in self.model_wrapped.parameters()})  # the trained model's
    lenvm = self.model_wrapped if isinstance(self.model, LenVMModel) else getattr(self, "lenvm", None)
    if lenvm is not None:  # the LenVM's z on fixed tokens, through its wrapper (ZeRO-3 gathers, FSDP unshards)
        computed = facts["head_compute_dtypes"] = {}
        hooks = [
            m.register_forward_hook(
                lambda module, args, output, k=n.rsplit(".")[-1]: computed.update({k: str(output.dtype)})
            )
            for n, m in lenvm.named_modules()
            if n.endswith(HEAD_LAYERS)
        ]
        with torch.no_grad():
            logits = lenvm(input_ids=PROBE_IDS.to(self.accelerator.device)).logits
        for hook in hooks:
            hook.remove()
        facts["lenvm_logits"], facts["lenvm_logits_dtype"] = logits.tolist(), str(logits.dtype)
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
