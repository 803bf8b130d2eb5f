"""scripts/demo.py: every stage's command parses with its stage's parser (a stale flag fails here, not 10 minutes
into `make demo`), and every stage it waits for exists and comes before it."""

import importlib.util

import pytest
from trl import ModelConfig

from conftest import ROOT
from lenvm_rl.cli import parse_recipe
from lenvm_rl.evaluate import EvaluateArguments
from lenvm_rl.grpo import LenVMGRPOConfig
from lenvm_rl.lenvm_trainer import LenVMScriptArguments, LenVMTrainingConfig
from lenvm_rl.predict import PredictArguments
from lenvm_rl.rollouts import RolloutArguments
from lenvm_rl.train_policy import GRPOScriptArguments

PARSERS = {
    "rollout": (RolloutArguments, ModelConfig), "train-lenvm": (LenVMScriptArguments, LenVMTrainingConfig, ModelConfig),
    "evaluate": (EvaluateArguments,), "predict-length": (PredictArguments,),
    "grpo": (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig),
}


def load_demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEMO = load_demo()


@pytest.mark.parametrize("name", list(DEMO.STAGES))
def test_stage_commands_parse_and_needs_come_first(name, tmp_path):
    command, _, needs = DEMO.STAGES[name]
    order = list(DEMO.STAGES)
    assert all(order.index(need) < order.index(name) for need in needs)
    if command[1:3] == ["-m", "lenvm_rl.testbed"]:
        from transformers import HfArgumentParser

        from lenvm_rl.testbed import TestbedSFTArguments

        HfArgumentParser(TestbedSFTArguments).parse_args_into_dataclasses(command[3:])
        return
    stage = command[3]
    parse_recipe(PARSERS[stage], [*command[4:], "--output_dir", str(tmp_path), "--report_to", "none", "--bf16", "false"]
                 if stage in ("train-lenvm", "grpo") else [*command[4:], "--output_dir", str(tmp_path)])


def test_progress_reads_the_last_tqdm_position(tmp_path):
    log = tmp_path / "stage.log"
    log.write_text("rollouts:  10%|#  | 5/48 [00:10<01:26, 2.0s/prompt]\rrollouts:  21%|## | 10/48 [00:20<01:16, 2.0s/prompt]")
    assert DEMO.progress(log) == "10/48, ETA 01:16"
    assert DEMO.progress(tmp_path / "missing.log") == "starting"
