"""The bad-input sweep: malformed recipes, datasets and CLI calls for every stage each end in one line
`lenvm-rl <stage>: error: <field>: ...` on stderr, exit status 2, no traceback, and nothing already written
is lost. In-process through `lenvm_rl.cli.main` (the subprocess path is tested in test_cli.py)."""

import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import transformers
import yaml

from conftest import make_tiny_llama, make_tokenizer
from lenvm_rl.cli import main
from lenvm_rl.modeling import LenVMModel

TINY = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", disable_tqdm=True)

# stage -> a recipe that runs; {placeholders} name the folders that the `world` fixture makes.
GOOD = {
    "rollout": dict(model_name_or_path="{model}", dataset_name="arithmetic", num_prompts=2, num_samples_per_prompt=2,
                    max_completion_tokens=4, prompts_per_batch=2, shard_size=2, output_dir="{out}"),
    "train-lenvm": dict(model_name_or_path="{model}", rollouts_path="{rollouts}", eval_prompt_fraction=0.34,
                        max_steps=1, per_device_train_batch_size=4, save_strategy="no", output_dir="{out}",
                        **{k: v for k, v in TINY.items() if k != "activation_checkpointing"}),
    "grpo": dict(model_name_or_path="{model}", lenvm_model_path="{lenvm}", num_prompts=4, budgets=[3, 6],
                 reward_funcs=["accuracy"], num_generations=2, per_device_train_batch_size=4,
                 max_completion_length=4, max_steps=1, save_strategy="no", output_dir="{out}", **TINY),
    "predict-length": dict(lenvm_model_path="{lenvm}", rollouts_path="{rollouts}", output_dir="{out}"),
    "length-tokens": dict(lenvm_model_path="{lenvm}", rollouts_path="{rollouts}", output_dir="{out}"),
    "evaluate": dict(model_name_or_path="{model}", num_prompts=2, budgets=[4], max_new_tokens=4, output_dir="{out}"),
}

# id: (stage, recipe fields changed (None = removed), extra argv, the start of the message after "error: ")
CASES = {
    "unknown-stage": ("trian-lenvm", None, [], "unknown stage 'trian-lenvm'"),
    "missing-config-file": ("rollout", None, ["--config", "{tmp}/nope.yaml"], "config: no recipe file"),
    "config-without-path": ("predict-length", None, ["--config"], "config: --config needs a recipe path"),
    "config-not-yaml": ("rollout", None, ["--config", "{notyaml}"], "config: the recipe is not valid YAML"),
    "config-not-a-mapping": ("grpo", None, ["--config", "{yamllist}"], "config: the recipe must be a YAML mapping"),
    "unknown-recipe-field": ("rollout", {"num_samples_per_promt": 2}, [], "recipe: unknown field(s) num_samples_per_promt"),
    "unknown-flag": ("train-lenvm", {}, ["--learning_rte", "0.1"], "--learning_rte: unknown flag"),
    "wrong-type-in-recipe": ("rollout", {"num_prompts": "many"}, [], "num_prompts:"),
    "wrong-type-flag": ("evaluate", {}, ["--max_new_tokens", "lots"], "max_new_tokens:"),
    "nonpositive-count": ("rollout", {"num_samples_per_prompt": 0}, [], "num_samples_per_prompt: must be positive"),
    "budget-zero": ("grpo", {"budgets": [0]}, [], "budgets:"),
    "budget-negative-evaluate": ("evaluate", {"budgets": [-4]}, [], "budgets:"),
    "unknown-budget-kind": ("grpo", {"budget_kinds": ["sometimes"]}, [], "budget_kinds:"),
    "missing-prompt-column": ("rollout", {"dataset_name": "{jsonl}"}, [], "prompt_column: the dataset has no column 'prompt'"),
    "empty-jsonl": ("grpo", {"dataset_name": "{empty}", "prompt_column": "question"}, [], "dataset_name:"),
    "missing-dataset-file": ("evaluate", {"dataset_name": "{tmp}/missing.jsonl"}, [], "dataset_name: no file"),
    "lenvm-path-is-a-plain-model": ("grpo", {"lenvm_model_path": "{model}"}, [], "lenvm_model_path:"),
    "lenvm-path-missing": ("predict-length", {"lenvm_model_path": "{tmp}/no-lenvm"}, [], "lenvm_model_path:"),
    "lenvm-other-tokenizer": ("grpo", {"lenvm_model_path": "{lenvm_other}"}, [], "lenvm_model_path:"),
    "lenvm-backbone-other-tokenizer": ("train-lenvm", {"model_name_or_path": "{model_other}"}, [], "model_name_or_path:"),
    "num-generations-not-dividing-batch": ("grpo", {"num_generations": 3}, [], "num_generations:"),
    "unreachable-model-id": ("grpo", {"model_name_or_path": "nobody/does-not-exist"}, [], "model_name_or_path:"),
    "unknown-reward": ("grpo", {"reward_funcs": ["correctness_v2"]}, [], "reward_funcs: unknown reward"),
    "unknown-length-objective": ("grpo", {"length_objective": "shorter"}, [], "length_objective:"),
    "resume-without-checkpoint": ("grpo", {}, ["--resume_from_checkpoint", "true"], "resume_from_checkpoint:"),
    "resume-lenvm-without-checkpoint": ("train-lenvm", {"resume_from_checkpoint": True}, [], "resume_from_checkpoint:"),
    "rollouts-path-without-shards": ("train-lenvm", {"rollouts_path": "{model}"}, [], "rollouts_path:"),
    "gamma-out-of-range": ("train-lenvm", {"gamma": "1.5"}, [], "gamma:"),
    "threshold-zero": ("length-tokens", {"threshold": 0}, [], "threshold:"),
    "length-tokens-plain-model": ("length-tokens", {"lenvm_model_path": "{model}"}, [], "lenvm_model_path:"),
    "evaluate-without-budgets": ("evaluate", {"budgets": None}, [], "budgets:"),
    "evaluate-missing-adapter": ("evaluate", {"adapters": ["{tmp}/no-adapter"]}, [], "adapters:"),
    "guided-without-lenvm": ("evaluate", {"guided_decoding": True}, [], "lenvm_model_path:"),
}


@pytest.fixture(scope="module")
def world(tiny_model_path, tokenizer, rollouts_dir, tmp_path_factory):
    """Folders the recipes point at, made once: a LenVM, one with another tokenizer, a model with another one."""
    root = tmp_path_factory.mktemp("bad-input")
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    torch.manual_seed(1)
    for name, vocab in (("lenvm", tokenizer), ("lenvm_other", other)):
        LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).save_pretrained(root / name)
        vocab.save_pretrained(root / name)
    model_other = root / "model_other"
    transformers.LlamaForCausalLM(make_tiny_llama(tokenizer).config).save_pretrained(model_other)
    other.save_pretrained(model_other)
    return {"model": tiny_model_path, "rollouts": str(rollouts_dir), "lenvm": str(root / "lenvm"),
            "lenvm_other": str(root / "lenvm_other"), "model_other": str(model_other)}


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch):
    """Progress bars write to stderr; the Hub client read HF_HUB_OFFLINE at import, before conftest set it."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    monkeypatch.setenv("TQDM_DISABLE", "1")  # our own tqdm bars (rollouts, evaluate)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    datasets.enable_progress_bars()
    transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize("stage, changes, argv, message", CASES.values(), ids=CASES.keys())
def test_bad_input_gives_one_line(stage, changes, argv, message, world, tmp_path, capsys):
    places = {**world, "tmp": str(tmp_path), "out": str(tmp_path / "out"), "jsonl": str(tmp_path / "questions.jsonl"),
              "empty": str(tmp_path / "empty.jsonl"), "notyaml": str(tmp_path / "notyaml.yaml"),
              "yamllist": str(tmp_path / "list.yaml")}
    fill = lambda value: value.format(**places) if isinstance(value, str) else value  # noqa: E731
    (tmp_path / "questions.jsonl").write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notyaml.yaml").write_text("model_name_or_path: [unclosed\n  output_dir: : :\n")
    (tmp_path / "list.yaml").write_text("- model_name_or_path\n- output_dir\n")
    # What a user already has: an output folder with something in it; a failed run must leave it alone.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("written before")
    rollouts_before = {p: p.stat().st_size for p in Path(world["rollouts"]).rglob("*")}

    command = [stage]
    if changes is not None:
        recipe = {**GOOD[stage], **changes}
        recipe = {k: [fill(x) for x in v] if isinstance(v, list) else fill(v) for k, v in recipe.items() if v is not None}
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        command += ["--config", str(tmp_path / "recipe.yaml")]
    command += [fill(x) for x in argv]

    with pytest.raises(SystemExit) as exit_info:
        main(command)

    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    prefix = "lenvm-rl: error: " if stage not in GOOD else f"lenvm-rl {stage}: error: "
    assert lines[0].startswith(prefix + message), lines[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    # datasets may add cache files beside the rollouts; nothing there before may change.
    assert all(p.exists() and p.stat().st_size == size for p, size in rollouts_before.items())


def test_the_sweep_covers_every_stage_and_twenty_cases():
    assert len(CASES) >= 20
    assert set(GOOD) <= {stage for stage, *_ in CASES.values()}
