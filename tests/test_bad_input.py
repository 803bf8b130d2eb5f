"""The bad-input sweep: malformed recipes, datasets and CLI calls for every stage each end in one line
`lenvm-rl <stage>: error: <field>: ...` on stderr, exit status 2, no traceback, and nothing already written
is lost. In-process through `lenvm_rl.cli.main` (the subprocess path is tested in test_cli.py)."""

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pytest
import torch
import transformers
import yaml
from conftest import make_tiny_llama, make_tokenizer, write_rollout_shard

from lenvm_rl.cli import main
from lenvm_rl.modeling import LenVMModel

TINY = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to="none", disable_tqdm=True)

# stage -> a recipe that runs; {placeholders} name the folders that the `world` fixture makes.
GOOD = {
    "rollout": dict(
        model_name_or_path="{model}",
        dataset_name="arithmetic",
        num_prompts=2,
        num_samples_per_prompt=2,
        max_completion_tokens=4,
        prompts_per_batch=2,
        shard_size=2,
        output_dir="{out}",
    ),
    "train-lenvm": dict(
        model_name_or_path="{model}",
        rollouts_path="{rollouts}",
        eval_prompt_fraction=0.34,
        max_steps=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        output_dir="{out}",
        **{k: v for k, v in TINY.items() if k != "activation_checkpointing"},
    ),
    "grpo": dict(
        model_name_or_path="{model}",
        lenvm_model_path="{lenvm}",
        num_prompts=4,
        budgets=[3, 4],
        reward_funcs=["accuracy"],
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=4,
        max_steps=1,
        save_strategy="no",
        output_dir="{out}",
        **TINY,
    ),
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
    "unknown-recipe-field": (
        "rollout",
        {"num_samples_per_promt": 2},
        [],
        "recipe: unknown field(s) num_samples_per_promt",
    ),
    "unknown-flag": ("train-lenvm", {}, ["--learning_rte", "0.1"], "--learning_rte: unknown flag"),
    "wrong-type-in-recipe": ("rollout", {"num_prompts": "many"}, [], "num_prompts:"),
    "wrong-type-flag": ("evaluate", {}, ["--max_new_tokens", "lots"], "max_new_tokens:"),
    "nonpositive-count": ("rollout", {"num_samples_per_prompt": 0}, [], "num_samples_per_prompt: must be positive"),
    "budget-zero": ("grpo", {"budgets": [0]}, [], "budgets:"),
    "budget-negative-evaluate": ("evaluate", {"budgets": [-4]}, [], "budgets:"),
    "unknown-budget-kind": ("grpo", {"budget_kinds": ["sometimes"]}, [], "budget_kinds:"),
    "missing-prompt-column": (
        "rollout",
        {"dataset_name": "{jsonl}"},
        [],
        "prompt_column: the dataset has no column 'prompt'",
    ),
    "empty-jsonl": ("grpo", {"dataset_name": "{empty}", "prompt_column": "question"}, [], "dataset_name:"),
    "missing-dataset-file": ("evaluate", {"dataset_name": "{tmp}/missing.jsonl"}, [], "dataset_name: no file"),
    "lenvm-path-is-a-plain-model": ("grpo", {"lenvm_model_path": "{model}"}, [], "lenvm_model_path:"),
    "lenvm-path-missing": ("predict-length", {"lenvm_model_path": "{tmp}/no-lenvm"}, [], "lenvm_model_path:"),
    "lenvm-other-tokenizer": ("grpo", {"lenvm_model_path": "{lenvm_other}"}, [], "lenvm_model_path:"),
    "lenvm-backbone-other-tokenizer": (
        "train-lenvm",
        {"model_name_or_path": "{model_other}"},
        [],
        "model_name_or_path:",
    ),
    "num-generations-not-dividing-batch": ("grpo", {"num_generations": 3}, [], "num_generations:"),
    "unreachable-model-id": ("grpo", {"model_name_or_path": "nobody/does-not-exist"}, [], "model_name_or_path:"),
    "unknown-reward": ("grpo", {"reward_funcs": ["correctness_v2"]}, [], "reward_funcs: unknown reward"),
    "unknown-length-objective": ("grpo", {"length_objective": "shorter"}, [], "length_objective:"),
    # Issue 29: thinking budgets.
    "thinking-budgets-with-a-one-value-lenvm": (
        "grpo",
        {"thinking_budgets": [8]},
        [],
        "lenvm_model_path: '{lenvm}' is a one-value LenVM",
    ),
    "evaluate-thinking-budgets": (
        "evaluate",
        {"thinking_budgets": [8]},
        [],
        "thinking_budgets: evaluate reports whole",
    ),
    "thinking-budgets-with-a-one-value-metrics-lenvm": (
        "grpo",
        {"thinking_budgets": [8], "length_objective": "none"},
        [],
        "lenvm_model_path: '{lenvm}' is a one-value LenVM",
    ),
    "thinking-budgets-without-an-answer-budget": (
        "grpo",
        {"thinking_budgets": [8], "budgets": None, "length_objective": "none"},
        [],
        "budgets: these prompts carry thinking budgets but no answer budget",
    ),
    "thinking-budget-kinds-without-budgets": (
        "rollout",
        {"thinking_budget_kinds": ["exact"]},
        [],
        "thinking_budget_kinds:",
    ),
    "resume-without-checkpoint": ("grpo", {}, ["--resume_from_checkpoint", "true"], "resume_from_checkpoint:"),
    "resume-lenvm-without-checkpoint": ("train-lenvm", {"resume_from_checkpoint": True}, [], "resume_from_checkpoint:"),
    "rollouts-path-without-shards": ("train-lenvm", {"rollouts_path": "{model}"}, [], "rollouts_path:"),
    "gamma-out-of-range": ("train-lenvm", {"gamma": "1.5"}, [], "gamma:"),
    "threshold-zero": ("length-tokens", {"threshold": 0}, [], "threshold:"),
    "length-tokens-plain-model": ("length-tokens", {"lenvm_model_path": "{model}"}, [], "lenvm_model_path:"),
    "evaluate-without-budgets": ("evaluate", {"budgets": None}, [], "budgets:"),
    "evaluate-missing-adapter": ("evaluate", {"adapters": ["{tmp}/no-adapter"]}, [], "adapters:"),
    "guided-without-lenvm": ("evaluate", {"guided_decoding": True}, [], "lenvm_model_path:"),
    # Issue 13. Data loss: an output_dir that is, contains or lies inside an input; unwritable; a user's file.
    "output-dir-is-the-policy": (
        "train-lenvm",
        {"output_dir": "{model}"},
        [],
        "output_dir: '{model}' is the model_name_or_path",
    ),
    "output-dir-is-the-lenvm": ("grpo", {"output_dir": "{lenvm}"}, [], "output_dir: '{lenvm}' is the lenvm_model_path"),
    "output-dir-inside-rollouts": (
        "train-lenvm",
        {"output_dir": "{rollouts}/lenvm"},
        [],
        "output_dir: '{rollouts}/lenvm' lies inside the rollouts_path",
    ),
    "output-dir-contains-dataset": (
        "rollout",
        {"dataset_name": "{jsonl}", "prompt_column": "question", "output_dir": "{tmp}"},
        [],
        "output_dir: '{tmp}' contains the dataset_name",
    ),
    "output-dir-is-an-adapter": (
        "evaluate",
        {"adapters": ["{lenvm}"], "output_dir": "{lenvm}"},
        [],
        "output_dir: '{lenvm}' is the adapters",
    ),
    "output-dir-read-only-grpo": (
        "grpo",
        {"output_dir": "/sys/lenvm-rl-out"},
        [],
        "output_dir: cannot write in '/sys'",
    ),
    "output-dir-read-only-rollout": (
        "rollout",
        {"output_dir": "/sys/lenvm-rl-out"},
        [],
        "output_dir: cannot write in '/sys'",
    ),
    "output-dir-holds-users-readme": (
        "grpo",
        {"output_dir": "{userdir}"},
        [],
        "output_dir: '{userdir}' holds README.md, which lenvm-rl did not write",
    ),
    "output-dir-is-a-file": ("predict-length", {"output_dir": "{jsonl}"}, [], "output_dir: '{jsonl}' is a file"),
    "output-dir-under-a-file": (
        "length-tokens",
        {"output_dir": "{jsonl}/out"},
        [],
        "output_dir: '{jsonl}/out' lies under the file",
    ),
    # Silent wrong results.
    "evaluate-two-arms-one-name": (
        "evaluate",
        {"adapters": ["{lenvm}"], "labels": ["x", "x"]},
        [],
        "labels: two evaluated models are both named 'x'",
    ),
    "evaluate-adapter-twice": (
        "evaluate",
        {"adapters": ["{lenvm}", "{lenvm}"]},
        [],
        "adapters: '{lenvm}' is listed twice",
    ),
    "fewer-prompts-than-a-batch": (
        "grpo",
        {"num_prompts": 1},
        [],
        "num_prompts: 1 prompt(s) is fewer than one generation batch of 2",
    ),
    "max-steps-zero": ("grpo", {}, ["--max_steps", "0"], "max_steps: must be positive"),
    "eval-prompt-fraction-negative": (
        "train-lenvm",
        {"eval_prompt_fraction": -0.5},
        [],
        "eval_prompt_fraction: must lie in (0, 1)",
    ),
    "num-prompts-above-dataset": (
        "grpo",
        {"dataset_name": "{jsonl}", "prompt_column": "question", "num_prompts": 50},
        [],
        "num_prompts: 50 asked for, but",
    ),
    "empty-prompt-string": (
        "rollout",
        {"dataset_name": "{emptyprompt}", "prompt_column": "question"},
        [],
        "prompt_column: row 1 of '{emptyprompt}' holds an empty prompt",
    ),
    "predict-lenvm-other-tokenizer": (
        "predict-length",
        {"lenvm_model_path": "{lenvm_other}"},
        [],
        "lenvm_model_path: the LenVM at '{lenvm_other}' has a",
    ),
    # Tracebacks that are one line now.
    "config-is-a-folder": ("rollout", None, ["--config", "{tmp}"], "config: '{tmp}' is a folder"),
    "config-given-twice": ("rollout", {}, ["--config", "{notyaml}"], "config: --config given 2 times"),
    "budgets-scalar": ("grpo", {"budgets": 32}, [], "budgets: need a flat list"),
    "budgets-mapping": ("grpo", {"budgets": {"short": 16}}, [], "budgets: need a flat list"),
    "budgets-nested": ("evaluate", {"budgets": [[16, 32]]}, [], "budgets: need a flat list"),
    "num-generations-zero": ("grpo", {"num_generations": 0}, [], "num_generations: must be positive"),
    "max-completion-length-zero": ("grpo", {"max_completion_length": 0}, [], "max_completion_length: must be positive"),
    "batch-size-zero": (
        "train-lenvm",
        {"per_device_train_batch_size": 0},
        [],
        "per_device_train_batch_size: must be positive",
    ),
    "negative-learning-rate": ("grpo", {"learning_rate": -0.001}, [], "learning_rate: must be >= 0"),
    "prompt-ints": (
        "rollout",
        {"dataset_name": "{ints}", "prompt_column": "question"},
        [],
        "prompt_column: row 0 of '{ints}' holds int 7",
    ),
    "prompt-nulls": (
        "grpo",
        {"dataset_name": "{nulls}", "prompt_column": "question", "num_prompts": None},
        [],
        "prompt_column: row 1 of '{nulls}' holds NoneType None",
    ),
    "token-ids-outside-vocab": (
        "train-lenvm",
        {"rollouts_path": "{bad_ids}"},
        [],
        "rollouts_path: {bad_ids} holds token id 5000 in completion_ids",
    ),
    "token-ids-outside-lenvm-vocab": (
        "length-tokens",
        {"rollouts_path": "{bad_ids}"},
        [],
        "rollouts_path: {bad_ids} holds token id 5000",
    ),
    "truncated-lenvm-weights": (
        "predict-length",
        {"lenvm_model_path": "{lenvm_cut}"},
        [],
        "lenvm_model_path: the weights in '{lenvm_cut}' are cut off",
    ),
    "gamma-auto-all-empty": ("train-lenvm", {"rollouts_path": "{empty_completions}"}, [], "gamma: 'auto' needs"),
    "corrupt-rollout-shard": (
        "train-lenvm",
        {"rollouts_path": "{corrupt}"},
        [],
        "rollouts_path: the shard {corrupt}/shards/shard-00000 is corrupt",
    ),
    "malformed-jsonl-line": (
        "rollout",
        {"dataset_name": "{badjson}", "prompt_column": "question"},
        [],
        "dataset_name: cannot read '{badjson}' as JSON lines (line 2 is not valid JSON",
    ),
    "missing-answer-column": (
        "grpo",
        {"dataset_name": "{noanswer}", "prompt_column": "question", "num_prompts": None},
        [],
        "reward_funcs: 'accuracy' reads the dataset column 'answer'",
    ),
    "policy-folder-moved": (
        "train-lenvm",
        {"rollouts_path": "{moved}"},
        [],
        "rollouts_path: {moved} was sampled from the policy '{tmp}/gone'",
    ),
    # Issue 27. Numbers, before any model loads: NaN / inf anywhere, seeds, counts that must agree, unreachable budgets.
    "coef-nan": (
        "grpo",
        {"length_advantage_coef": "nan"},
        [],
        "length_advantage_coef: must be a finite number, got nan",
    ),
    "coef-inf-flag": ("grpo", {}, ["--length_advantage_coef", "inf"], "length_advantage_coef: must be a finite number"),
    "learning-rate-nan": ("train-lenvm", {"learning_rate": "nan"}, [], "learning_rate: must be a finite number"),
    "temperature-inf": ("evaluate", {"temperature": "inf"}, [], "temperature: must be a finite number"),
    "reward-weights-count": (
        "grpo",
        {"reward_weights": [1.0, 0.5]},
        [],
        "reward_weights: 2 weight(s) for 1 reward_funcs (accuracy)",
    ),
    "reward-weight-nan": (
        "grpo",
        {"reward_weights": [float("nan")]},
        [],
        "reward_weights: must be a finite number, got [nan]",
    ),
    "top-p-above-one": ("rollout", {"top_p": 1.5}, [], "top_p: must lie in (0, 1], got 1.5"),
    "grpo-temperature-zero": ("grpo", {"temperature": 0}, [], "temperature: must be > 0 (GRPO samples"),
    "save-steps-zero": ("train-lenvm", {"save_strategy": "steps", "save_steps": 0}, [], "save_steps: must be positive"),
    "lora-rank-zero": ("grpo", {"use_peft": True, "lora_r": 0}, [], "lora_r: must be a positive rank, got 0"),
    "seed-negative": ("grpo", {"seed": -1}, [], "seed: must be an integer in [0, 2**32 - 1], got -1"),
    "dataset-seed-negative": ("rollout", {"dataset_seed": -1}, [], "dataset_seed: must be an integer in [0, 2**32"),
    "budget-unreachable": (
        "grpo",
        {"budgets": [1000000000]},
        [],
        "budgets: the exact budget of 1000000000 tokens cannot be met within max_completion_length 4",
    ),
    "budget-range-unreachable": (
        "rollout",
        {"budget_range": [8, 64], "budget_kinds": ["at_least"]},
        [],
        "budget_range: even the smallest at_least budget of 8 tokens cannot be met within max_completion_tokens 4",
    ),
    "evaluate-budget-unreachable": (
        "evaluate",
        {"budgets": [16, 32]},
        [],
        "budgets: even the smallest exact budget of 16 tokens cannot be met within max_new_tokens 4",
    ),
    # A run owns its output_dir: an earlier run there is not replaced without resume or overwrite_output_dir.
    "grpo-into-a-finished-run": (
        "grpo",
        {"output_dir": "{finished}"},
        [],
        "output_dir: '{finished}' holds an earlier run (checkpoint-2, a final model) that this run would replace",
    ),
    "train-lenvm-into-checkpoints": (
        "train-lenvm",
        {"output_dir": "{finished}"},
        [],
        "output_dir: '{finished}' holds an earlier run (checkpoint-2, a final model)",
    ),
    # The live critic's checkpoints.
    "resume-live-checkpoint-frozen": (
        "grpo",
        {},
        ["--resume_from_checkpoint", "{live_checkpoint}"],
        "lenvm_update: {live_checkpoint} holds a live critic trained with the policy (lenvm/)",
    ),
    "resume-checkpoint-scale-zero": (
        "grpo",
        {"lenvm_update": "live", "length_advantage_scale": "first"},
        ["--resume_from_checkpoint", "{scale_zero}"],
        "resume_from_checkpoint: '{scale_zero}' is not a complete checkpoint folder (length_advantage_scale.json "
        "holds 0.0, not a positive finite scale)",
    ),
    "resume-frozen-checkpoint-live": (
        "grpo",
        {"lenvm_update": "live"},
        ["--resume_from_checkpoint", "{finished}/checkpoint-2"],
        "resume_from_checkpoint: {finished}/checkpoint-2 has no lenvm/model.safetensors",
    ),
    # Models that are not what their folder says.
    "model-path-empty-folder": (
        "rollout",
        {"model_name_or_path": "{emptydir}"},
        [],
        "model_name_or_path: cannot load '{emptydir}': the folder holds no model",
    ),
    "lenvm-config-of-another-model": (
        "grpo",
        {"lenvm_model_path": "{lenvm_foreign}"},
        [],
        "lenvm_model_path: the weights in '{lenvm_foreign}' do not fit its config.json",
    ),
    "evaluate-half-written-adapter": (
        "evaluate",
        {"adapters": ["{adapter_cut}"]},
        [],
        "adapters: adapter_model.safetensors in '{adapter_cut}' is missing, cut off or corrupt",
    ),
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
    # A LenVM whose weights were cut off mid-copy.
    shutil.copytree(root / "lenvm", root / "lenvm_cut")
    weights = root / "lenvm_cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rows = datasets.load_from_disk(str(next((rollouts_dir / "shards").iterdir()))).to_list()
    write_rollout_shard(root / "bad_ids", [{**r, "completion_ids": r["completion_ids"] + [5000]} for r in rows])
    write_rollout_shard(
        root / "empty_completions",
        [
            {**r, "prompt_id": i, "completion_ids": [], "completion_tokens": 0, "finished": True}
            for i, r in enumerate(rows)
        ],
    )
    shutil.copytree(rollouts_dir, root / "corrupt")
    arrow = next((root / "corrupt" / "shards" / "shard-00000").glob("data-*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    shutil.copytree(rollouts_dir, root / "moved")
    # An earlier run's output_dir: a checkpoint and a final save; a live run's checkpoint; one with a zero scale.
    checkpoint = root / "finished" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    (root / "finished" / ".lenvm_rl_written.json").write_text("{}")
    shutil.copytree(checkpoint, root / "live_checkpoint")
    shutil.copytree(root / "lenvm", root / "live_checkpoint" / "lenvm")
    torch.save({"state": {}, "param_groups": []}, root / "live_checkpoint" / "lenvm_optimizer.pt")
    shutil.copytree(root / "live_checkpoint", root / "scale_zero")
    (root / "scale_zero" / "length_advantage_scale.json").write_text(json.dumps({"length_advantage_scale": 0.0}))
    (root / "emptydir").mkdir()
    # A LenVM folder whose config.json is another LenVM's (another width): the weights do not fit it.
    shutil.copytree(root / "lenvm", root / "lenvm_foreign")
    wide = make_tiny_llama(tokenizer).config.to_dict() | {"hidden_size": 48, "intermediate_size": 96}
    LenVMModel.from_backbone(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**wide)), gamma=0.9
    ).config.to_json_file(root / "lenvm_foreign" / "config.json")
    # A LoRA adapter whose weights were cut off mid-copy.
    import peft

    lora = peft.get_peft_model(make_tiny_llama(tokenizer), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(root / "adapter_cut")
    weights = root / "adapter_cut" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-32])
    wide_policy = transformers.LlamaForCausalLM(transformers.LlamaConfig(**wide))
    peft.get_peft_model(wide_policy, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        root / "adapter_wide"
    )
    return {
        "model": tiny_model_path,
        "rollouts": str(rollouts_dir),
        "lenvm": str(root / "lenvm"),
        "lenvm_other": str(root / "lenvm_other"),
        "model_other": str(model_other),
        "lenvm_cut": str(root / "lenvm_cut"),
        "bad_ids": str(root / "bad_ids"),
        "empty_completions": str(root / "empty_completions"),
        "corrupt": str(root / "corrupt"),
        "moved": str(root / "moved"),
        **{
            name: str(root / name)
            for name in (
                *("finished", "live_checkpoint", "scale_zero", "emptydir", "lenvm_foreign"),
                *("adapter_cut", "adapter_wide"),
            )
        },
    }


def checksums(*folders) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in Path(f).rglob("*") if p.is_file()}


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
    places = {
        **world,
        "tmp": str(tmp_path),
        "out": str(tmp_path / "out"),
        "jsonl": str(tmp_path / "questions.jsonl"),
        "empty": str(tmp_path / "empty.jsonl"),
        "notyaml": str(tmp_path / "notyaml.yaml"),
        "yamllist": str(tmp_path / "list.yaml"),
        "userdir": str(tmp_path / "userdir"),
        **{name: str(tmp_path / f"{name}.jsonl") for name in ("emptyprompt", "ints", "nulls", "badjson", "noanswer")},
    }
    fill = lambda value: value.format(**places) if isinstance(value, str) else value
    (tmp_path / "questions.jsonl").write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(3))
    )
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "notyaml.yaml").write_text("model_name_or_path: [unclosed\n  output_dir: : :\n")
    (tmp_path / "list.yaml").write_text("- model_name_or_path\n- output_dir\n")
    questions = lambda **row: "".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1), **row}) + "\n" for i in range(4)
    )
    (tmp_path / "emptyprompt.jsonl").write_text(questions() + json.dumps({"question": " ", "answer": "1"}) + "\n")
    lines = (tmp_path / "emptyprompt.jsonl").read_text().splitlines()
    (tmp_path / "emptyprompt.jsonl").write_text("\n".join([lines[0], lines[-1], *lines[1:-1]]) + "\n")  # row 1 empty
    (tmp_path / "ints.jsonl").write_text(questions(question=7))
    (tmp_path / "nulls.jsonl").write_text(questions().replace('"What is 1 + 1?"', "null"))
    (tmp_path / "badjson.jsonl").write_text(questions().replace("}\n", "\n", 2).replace("\n", "}\n", 1))  # line 2 torn
    (tmp_path / "noanswer.jsonl").write_text(
        "".join(json.dumps({"question": f"What is {i}?"}) + "\n" for i in range(4))
    )
    (tmp_path / "userdir").mkdir()
    (tmp_path / "userdir" / "README.md").write_text("# my notes\n")
    manifest = Path(world["moved"]) / "rollout_args.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "model_name_or_path": str(tmp_path / "gone")}))
    # What a user already has: an output folder with something in it; a failed run must leave it alone.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("written before")
    rollouts_before = {p: p.stat().st_size for p in Path(world["rollouts"]).rglob("*")}
    inputs_before = checksums(tmp_path, *world.values())  # every input, the user's files and folders included

    command = [stage]
    if changes is not None:
        recipe = {**GOOD[stage], **changes}
        recipe = {
            k: [fill(x) for x in v] if isinstance(v, list) else fill(v) for k, v in recipe.items() if v is not None
        }
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
    assert lines[0].startswith(prefix + fill(message)), lines[0]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    # datasets may add cache files beside the rollouts; nothing there before may change.
    assert all(p.exists() and p.stat().st_size == size for p, size in rollouts_before.items())
    after = checksums(tmp_path, *world.values())
    assert {p: after.get(p) for p in inputs_before if p.name != "recipe.yaml"} == {
        p: h for p, h in inputs_before.items() if p.name != "recipe.yaml"
    }


def test_the_sweep_covers_every_stage_and_twenty_cases():
    assert len(CASES) >= 20
    assert set(GOOD) <= {stage for stage, *_ in CASES.values()}


def test_two_adapters_in_folders_of_one_name_get_two_arms(tmp_path):
    """Case 6: runA/final and runB/final are two rows with two generations files, not one ("adapter changed")."""
    from lenvm_rl.evaluate import EvaluateArguments, generations_name

    args = EvaluateArguments(adapters=[str(tmp_path / "runA" / "final"), str(tmp_path / "runB" / "final")], budgets=[4])
    labels = [label for label, _, _ in args.model_specs()]
    assert labels == ["base", "runA/final", "runB/final"]
    assert len({generations_name(label) for label in labels}) == 3
    folder_named_base = EvaluateArguments(adapters=[str(tmp_path / "base")], budgets=[4])
    assert [label for label, _, _ in folder_named_base.model_specs()] == ["base", f"{tmp_path.name}/base"]


def test_rollout_rerun_refuses_an_edited_dataset(tiny_model_path, tmp_path, capsys):
    """Case 8: the manifest records the source's sha256; an edited file is refused by name, the shards kept."""
    dataset = tmp_path / "questions.jsonl"
    dataset.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(2))
    )
    recipe = {
        **GOOD["rollout"],
        "model_name_or_path": tiny_model_path,
        "dataset_name": str(dataset),
        "prompt_column": "question",
        "output_dir": str(tmp_path / "out"),
        "shard_size": 1,
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    main(["rollout", "--config", str(tmp_path / "recipe.yaml")])
    shutil.rmtree(tmp_path / "out" / "shards" / "shard-00001")  # an interrupted run: one shard to go
    shards_before = checksums(tmp_path / "out" / "shards")
    dataset.write_text(dataset.read_text().replace("What is 1 + 1?", "What is 5 + 5?"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["rollout", "--config", str(tmp_path / "recipe.yaml")])
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith(f"lenvm-rl rollout: error: dataset_name: {str(dataset)!r} changed since the rollouts"), (
        stderr
    )
    assert checksums(tmp_path / "out" / "shards") == shards_before


def test_a_launch_of_two_processes_that_run_alone_is_refused(world, tmp_path, monkeypatch, capsys):
    """Case 9: WORLD_SIZE 2 from the launcher, but no LOCAL_RANK and no use_cpu: each process would be rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    recipe = {
        k: v.format(**world, out=str(tmp_path / "out")) if isinstance(v, str) else v for k, v in GOOD["grpo"].items()
    }
    recipe.pop("use_cpu")
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit) as exit_info:
        main(["grpo", "--config", str(tmp_path / "recipe.yaml")])
    stderr = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith(
        "lenvm-rl grpo: error: use_cpu: launched as 2 processes (WORLD_SIZE) but this run sees 1"
    ), stderr
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_base_is_one_line(world, tmp_path, capsys):
    """Found when the adapter loads, after the base model's arm: one line, and the base's generations are kept."""
    recipe = {**GOOD["evaluate"], "model_name_or_path": world["model"], "output_dir": str(tmp_path / "out")}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "adapters": [world["adapter_wide"]]}))
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--config", str(tmp_path / "recipe.yaml")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"lenvm-rl evaluate: error: adapters: {world['adapter_wide']!r} does not fit {world['model']!r} (its tensor "
            f"shapes differ"
        )
    )
    assert (tmp_path / "out" / "generations" / "base.jsonl").stat().st_size > 0
