"""Every shipped recipe parses with its stage's parser: a misspelt or stale field fails here, not on a GPU."""

from pathlib import Path

import pytest
from trl import ModelConfig

from lenvm_rl.errors import ConfigError
from lenvm_rl.evaluate import EvaluateArguments
from lenvm_rl.grpo import LenVMGRPOConfig
from lenvm_rl.ppo import LenVMPPOConfig
from lenvm_rl.recipe import parse_recipe
from lenvm_rl.rollout import RolloutArguments
from lenvm_rl.train_lenvm import LenVMScriptArguments, LenVMTrainingConfig
from lenvm_rl.train_policy import GRPOScriptArguments

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    "rollout": ((RolloutArguments, ModelConfig), ["--use_vllm", "false"]),  # vLLM runs in `make test-vllm`
    "lenvm": ((LenVMScriptArguments, LenVMTrainingConfig, ModelConfig), ["--report_to", "none", "--bf16", "false"]),
    "evaluate": ((EvaluateArguments,), []),
    "grpo": (
        (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig),
        ["--report_to", "none", "--bf16", "false", "--use_vllm", "false"],
    ),
    "ppo": (
        (GRPOScriptArguments, LenVMPPOConfig, ModelConfig),
        ["--report_to", "none", "--bf16", "false", "--use_vllm", "false"],
    ),
}
RECIPES = sorted(ROOT.glob("recipes/*/*/config_*.yaml"))


def test_recipes_exist_for_every_model():
    models = {path.parts[-3] for path in RECIPES}
    assert {"SmolLM2-135M-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-7B-Instruct"} <= models


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses(path, tmp_path):
    stage = path.parts[-2]
    assert stage in STAGES, f"no parser registered in this test for stage {stage}"
    types, overrides = STAGES[stage]
    parsed = parse_recipe(types, ["--config", str(path), "--output_dir", str(tmp_path), *overrides])
    model_args = parsed[-1]
    assert model_args.model_name_or_path


def test_misspelt_field_names_the_field(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: x\nnum_samples_per_promt: 4\n")
    with pytest.raises(ConfigError, match="num_samples_per_promt"):
        parse_recipe((RolloutArguments, ModelConfig), ["--config", str(recipe)])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_cpu_recipes_leave_bf16_to_the_machine(path):
    """A CPU recipe never hard-codes bf16 (emulated, about 100x slower, on a CPU without AMX / AVX512-BF16)."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    if path.parts[-3] in ("SmolLM2-135M-Instruct", "testbed") or recipe.get("use_cpu"):
        assert recipe.get("bf16", "auto") in ("auto", False), path
        assert recipe.get("dtype") in (None, "auto", "float32"), path
