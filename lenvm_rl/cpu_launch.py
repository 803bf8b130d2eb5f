"""Run a stage under the shipped FSDP / DeepSpeed launch configs on CPU processes (gloo), without a GPU.

    accelerate launch --config_file accelerate_configs/cpu/<fsdp|zero2|zero3>.yaml -m lenvm_rl.cpu_launch \\
        <stage> --config recipe.yaml [--field value ...]

The tests use it to run FSDP2 and ZeRO-2/3 for real on two CPU processes; on a GPU machine launch ``-m lenvm_rl``
(this module refuses to run where CUDA is visible, so nothing here reaches the GPU path). What accelerate 1.16,
transformers 5 and DeepSpeed 0.19 need on a CPU, and nothing else, is here:

- DeepSpeed: its CPU accelerator (``DS_ACCELERATOR=cpu``, set before DeepSpeed is imported) and the gloo backend
  (``--ddp_backend gloo``); ``use_cpu`` stays false, because with it accelerate ignores DeepSpeed altogether.
- FSDP: accelerate turns FSDP on only for GPU-like devices; on a CPU it runs plain DDP (``use_cpu``: MULTI_CPU,
  gloo) and drops the FSDP plugin. Each Accelerator is switched to FSDP right after it is created: a plugin from
  the launcher's FSDP_* environment variables, and ``distributed_type = FSDP`` on the accelerator state and on
  ``PartialState``'s shared state. torch's FSDP2 then shards, trains, clips and gathers over gloo as on GPUs.
- DDP (``accelerate_configs/cpu_2proc.yaml``): ``use_cpu`` (MULTI_CPU, gloo), as the recipes of its tests set.
- Every launch of a training stage (train-lenvm, grpo, ppo; rollout and evaluate are data-parallel with
  ``cpu_2proc.yaml`` and need no flag): ``--bf16 false`` (the CPU configs' mixed_precision is 'no' too;
  DeepSpeed's CPU bf16 path is not what the GPU runs).

These flags come right after the stage, so a flag the user gives after them still wins.
The shared-memory all-reduce op of DeepSpeed's CPU accelerator is compiled on first use (about 2-3 minutes) into
``TORCH_EXTENSIONS_DIR`` (``make install`` builds it into ``.cache/torch_extensions``, the folder the tests use).
"""

from __future__ import annotations

import os
import sys


def switch_accelerators_to_fsdp() -> None:
    """Every ``Accelerator`` created from now on runs FSDP on its CPU processes (module docstring)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    create = Accelerator.__init__
    if getattr(create, "switches_to_fsdp", False):  # installed already (several stages in one process)
        return

    def create_then_switch(self, *args, fsdp_plugin=None, **kwargs):
        create(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.state.distributed_type == DistributedType.FSDP:  # the shared state was switched already
            return
        if self.state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"cpu_launch: expected MULTI_CPU to switch to FSDP, got {self.state.distributed_type}")
        self.state.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()  # from the FSDP_* variables
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    create_then_switch.switches_to_fsdp = True
    Accelerator.__init__ = create_then_switch


def main(argv: list[str] | None = None) -> None:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    if torch.cuda.is_available():
        sys.exit("lenvm_rl.cpu_launch: a GPU is visible; launch `-m lenvm_rl` with accelerate_configs/<config>.yaml")
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"
        flags = ["--use_cpu", "false", "--ddp_backend", "gloo"]
    else:
        flags = ["--use_cpu", "true"]
    if fsdp:
        switch_accelerators_to_fsdp()
    from lenvm_rl.cli import main as cli_main

    if argv[:1] in (["train-lenvm"], ["grpo"], ["ppo"]):
        argv = [argv[0], *flags, "--bf16", "false", *argv[1:]]
    cli_main(argv)


if __name__ == "__main__":
    main()
