"""LenVMGRPOTrainer on a tiny random Llama and a tiny LenVM: advantage assembly against a loop reference and a
hand example, left-padding invariance of the LenVM scores, 2-step training in every length mode (full and
LoRA), refusals, wandb logging, the `grpo` entry point, and the shipped grpo recipes."""

import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import ROOT, make_tiny_llama, make_tokenizer, make_trainer, tiny_llama_config
from peft import LoraConfig
from trl import GRPOTrainer, ModelConfig

from lenvm_rl.data import DatasetArguments, load_prompt_splits, load_prompts
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo import LenVMGRPOConfig, LenVMGRPOTrainer, main
from lenvm_rl.modeling import LenVMModel
from lenvm_rl.recipe import parse_recipe
from lenvm_rl.train_policy import GRPOScriptArguments
from rewards.scores import LENGTH_SCORES, budget_kind_codes

GAMMA = 0.9
RECIPES = sorted(ROOT.glob("recipes/*/grpo/config_*.yaml"))


def config_for(output_dir, **fields) -> LenVMGRPOConfig:
    return LenVMGRPOConfig(output_dir=str(output_dir), use_cpu=True, activation_checkpointing=False, **fields)


# ------------------------------------------------------------------------------------------ assembly


def reference_advantages(task, values_full, prompt_length, mask, finished, gamma, lam, d, coef, mode, budgets, kinds):
    """Plain loops over docs/DESIGN.md §3.6 to §3.10: A = (A_task + c · A_len) on valid tokens, 0 on padding."""
    total = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        length = n - int(finished[b])
        values = [float(values_full[b, prompt_length - 1 + j]) for j in range(n + 1)]  # V(s_0) .. V(s_n)
        if finished[b]:
            values[length:] = [0.0] * (n + 1 - length)  # s_L is terminal, and so is the state after EOS
        if mode == "budget":
            score = LENGTH_SCORES["lifebench"]
            predicted = [j + math.log(1 + v) / math.log(gamma) for j, v in enumerate(values)]  # Λ_j
            phi = [float(score(torch.tensor(p), budgets[b], kinds[b])) for p in predicted]
            if finished[b]:
                phi[length:] = [float(score(torch.tensor(float(length)), budgets[b], kinds[b]))] * (n + 1 - length)
            deltas = [d * phi[j + 1] - phi[j] for j in range(n)]
        elif mode == "efficiency":
            deltas = [-(1 - gamma) * (j < length) + d * values[j + 1] - values[j] for j in range(n)]
        else:  # shaping: one-step potential difference, no λ
            deltas, lam = [d * values[j + 1] - values[j] for j in range(n)], 0.0
        running = 0.0
        for j in reversed(range(n)):
            running = deltas[j] + d * lam * running
            total[b, j] = float(task[b]) + coef * running
    return total


def assemble(trainer, task, values_full, prompt_length, mask, finished, budgets, kinds):
    """What ``_generate_and_score_completions`` does with the two hooks' results: (A_task + c · A_len) · mask, and
    c · A_len. The batch dict is ``describe_batch``'s, for one process."""
    output = {
        "prompt_ids": torch.zeros(mask.shape[0], prompt_length, dtype=torch.long),
        "completion_mask": mask,
        "advantages": task,
    }
    lengths = mask.sum(1) - finished.long()
    scores = LENGTH_SCORES[trainer.args.length_score](lengths.float(), budgets, kinds).double()
    batch = {
        "values_full": values_full,
        "finished": finished,
        "lengths": lengths,
        "budgets": budgets,
        "kinds": kinds,
        "all_scores": scores,
        "local_rows": slice(0, mask.shape[0]),
    }
    length = trainer.length_advantages(output, batch)
    return (trainer.task_advantages(output, batch)[:, None] + length) * mask, length


@pytest.mark.parametrize("mode", ["budget", "efficiency", "shaping"])
def test_assembly_matches_loop_reference(mode, tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_objective=mode,
        length_advantage_coef=0.7,
        length_lambda=0.8,
        length_discount=0.95,
        whiten_length_advantage=False,
    )
    torch.manual_seed(0)
    batch, prompt_length, num_tokens = 6, 4, 7
    completion_tokens = torch.tensor([7, 3, 1, 5, 7, 2])
    finished = torch.tensor([False, True, True, False, True, True])  # row 0: truncated at T; row 2: EOS only
    mask = (torch.arange(num_tokens) < completion_tokens[:, None]).long()  # (B, T)
    values_full = -torch.rand(batch, prompt_length + num_tokens) * 0.98 - 0.01  # (B, P + T) in (-0.99, -0.01)
    task = torch.randn(batch)
    budgets, kinds = torch.tensor([3.0, 4.0, 2.0, 6.0, 5.0, 1.0]), torch.tensor([0, 1, 2, 0, 1, 2])

    advantages, length = assemble(trainer, task, values_full, prompt_length, mask, finished, budgets, kinds)
    expected = reference_advantages(
        task, values_full, prompt_length, mask, finished, GAMMA, 0.8, 0.95, 0.7, mode, budgets, kinds
    )
    assert advantages.shape == (batch, num_tokens)
    torch.testing.assert_close(advantages.double(), expected, atol=1e-5, rtol=1e-5)
    assert (advantages[mask == 0] == 0).all() and (length[mask == 0] == 0).all()


def test_assembly_hand_example(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """γ = 0.5, d = λ = 1, c = 2: A_len_j = S(final) - Φ_j, with V chosen so Λ_j is an integer."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_gamma=0.5,
        length_advantage_coef=2.0,
        whiten_length_advantage=False,
    )
    v = lambda remaining: -(1 - 0.5**remaining)  # noqa: E731 the value of `remaining` tokens to go
    nan = float("nan")  # positions that must never be read: left padding of prompts, states after the end
    # P = 3 (prompts of 2, 3 and 1 tokens, left-padded), T = 3; columns P - 1 + j hold V(s_j).
    values_full = torch.tensor(
        [
            [nan, 0.0, v(4), v(1), nan, nan],  # finished, L = 2: Λ_0 = 4, Λ_1 = 2, s_2 terminal
            [0.0, 0.0, v(2), v(0), v(4), v(2)],  # truncated at T = 3: Λ = 2, 1, 6, 5 (bootstrap)
            [nan, nan, v(3), nan, nan, nan],  # finished, L = 0: EOS right away
        ]
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    finished = torch.tensor([True, False, True])
    budgets, kinds = torch.tensor([2.0, 4.0, 2.0]), budget_kind_codes(["exact", "at_most", "exact"])
    task = torch.tensor([0.5, -0.5, 0.25])

    advantages, _ = assemble(trainer, task, values_full, 3, mask.bool(), finished, budgets, kinds)
    e = math.exp
    expected = torch.tensor(
        [
            [0.5 + 2 * (1 - e(-2)), 0.5, 0.5],  # S(4, 2) = e^-2 -> S(L = 2) = 1; the EOS action gets 0
            [-0.5 + 2 * (e(-0.5) - 1), -0.5 + 2 * (e(-0.5) - 1), -0.5 + 2 * (e(-0.5) - e(-1))],  # Φ_3 = S(5, 4)
            [0.25, 0.0, 0.0],  # the EOS action of an empty completion gets 0; padding gets 0
        ]
    )
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=1e-6)


def test_lenvm_values_ignore_left_padding(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path)
    pad = tokenizer.pad_token_id
    prompts, completions = [[5, 6], [7, 8, 9, 10]], [[11, 12, 13], [14]]
    prompt_ids = torch.tensor([[pad, pad, 5, 6], [7, 8, 9, 10]])
    prompt_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[11, 12, 13], [14, pad, pad]])
    completion_mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    batched = trainer.lenvm_values(prompt_ids, prompt_mask, completion_ids, completion_mask)  # (2, 7)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([prompt + completion])
        alone = trainer.lenvm_values(
            ids[:, : len(prompt)],
            torch.ones(1, len(prompt), dtype=torch.long),
            ids[:, len(prompt) :],
            torch.ones(1, len(completion), dtype=torch.long),
        )[0]
        start = 4 - len(prompt)
        torch.testing.assert_close(batched[row, start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)


def test_lenvm_values_in_chunks_match_one_padded_forward(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """Scored in chunks of lenvm_batch_size, the values at every real position are those of one forward over the
    whole padded batch."""
    trainer = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, lenvm_batch_size=2
    )
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad, pad, 5, 6], [7, 8, 9, 10], [pad, 3, 4, 5]])
    prompt_mask = (prompt_ids != pad).long()
    completion_ids = torch.tensor([[11, pad, pad, pad, pad], [14, 15, 16, 17, 18], [19, 20, pad, pad, pad]])
    completion_mask = (completion_ids != pad).long()
    chunked = trainer.lenvm_values(prompt_ids, prompt_mask, completion_ids, completion_mask)  # (3, 9)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        whole = trainer.lenvm(
            input_ids=torch.cat([prompt_ids, completion_ids], 1),
            attention_mask=attention_mask,
            position_ids=(attention_mask.cumsum(1) - 1).clamp(min=0),
            use_cache=False,
        ).length_values
    real = attention_mask.bool()
    torch.testing.assert_close(chunked[real], whole[real], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ training

MODES = {
    "budget": dict(loss_type="dapo", gradient_accumulation_steps=2),
    "efficiency": dict(loss_type="grpo", num_iterations=2),
    "shaping": dict(loss_type="dr_grpo", steps_per_generation=2, whiten_length_advantage=True),
    "none": dict(),
}


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def check_trained(trainer, before, mode):
    after = snapshot(trainer.model)
    assert before.keys() == after.keys() and before
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters did not change: {unchanged}"
    logs = trainer.state.log_history
    assert all(math.isfinite(entry["loss"]) for entry in logs if "loss" in entry)
    batch = trainer._buffered_inputs[-1]
    advantages, mask = batch["advantages"], batch["completion_mask"]
    if mode == "none":
        assert advantages.dim() == 1  # TRL's own sequence advantages, untouched
    else:
        assert advantages.shape == batch["completion_ids"].shape
        assert (advantages[mask == 0] == 0).all() and advantages.abs().sum() > 0
        assert any("length/mean_abs_advantage" in entry for entry in logs)
    for name in ("length/online_mre", "length/budget_hit_rate", "length/scoring_time_share", "rewards/accuracy/mean"):
        assert any(name in entry for entry in logs), name


@pytest.mark.parametrize("mode", list(MODES))
def test_trains_in_every_mode(mode, tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, length_objective=mode, **MODES[mode]
    )
    before = snapshot(trainer.model)
    trainer.train()
    check_trained(trainer, before, mode)
    assert all(not p.requires_grad for p in trainer.lenvm.parameters()) and not trainer.lenvm.training


def test_trains_lora(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        peft_config=lora,
        lenvm_model_path=lenvm_path,
        beta=0.04,
        mask_truncated_completions=True,
    )
    before = snapshot(trainer.model)
    assert before and all("lora_" in name for name in before)
    trainer.train()
    check_trained(trainer, before, "budget")


def test_none_without_lenvm_is_plain_grpo(tiny_model_path, tokenizer, dataset, tmp_path):
    """length_objective none, no LenVM: the same seed gives exactly GRPOTrainer's parameters (budget metrics only)."""
    trainers = []
    for cls in (LenVMGRPOTrainer, GRPOTrainer):  # each constructor seeds the RNGs: build, then train, in turn
        trainers.append(
            make_trainer(
                tiny_model_path, tokenizer, dataset, tmp_path / cls.__name__, trainer_class=cls, length_objective="none"
            )
        )
        trainers[-1].train()
    ours, plain = trainers
    assert ours.lenvm is None and any("length/budget_hit_rate" in entry for entry in ours.state.log_history)
    trained, reference = snapshot(ours.model), snapshot(plain.model)
    assert all(torch.equal(trained[name], reference[name]) for name in reference)


# ------------------------------------------------------------------------------------------ refusals


def test_tokenizer_mismatch_refused(tiny_model_path, tokenizer, dataset, tmp_path):
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    path = tmp_path / "lenvm-other"
    LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=GAMMA).save_pretrained(path)
    other.save_pretrained(path)
    with pytest.raises(ConfigError, match="lenvm_model_path: .*-token vocabulary, not the policy"):
        make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=str(path))


def test_missing_lenvm_refused(tiny_model_path, tokenizer, dataset, tmp_path):
    with pytest.raises(ConfigError, match="lenvm_model_path"):
        make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="lenvm_model_path: length_objective 'budget' needs a LenVM"):
        config_for(tmp_path, length_objective="budget")


def test_budget_without_budget_columns_refused(tiny_model_path, tokenizer, lenvm_path, tmp_path):
    plain_data = load_prompts(DatasetArguments(num_prompts=4))
    with pytest.raises(ConfigError, match="length_objective: 'budget' needs the dataset columns budget_tokens"):
        make_trainer(tiny_model_path, tokenizer, plain_data, tmp_path, lenvm_model_path=lenvm_path)


def test_unknown_budget_kind_refused(tiny_model_path, tokenizer, lenvm_path, dataset, tmp_path):
    bad = dataset.map(lambda row, i: {"budget_kind": "roughly" if i == 0 else row["budget_kind"]}, with_indices=True)
    with pytest.raises(ConfigError, match=r"budget_kind: .*'roughly'"):
        make_trainer(tiny_model_path, tokenizer, bad, tmp_path, lenvm_model_path=lenvm_path)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(length_advantage_coef=-1.0), "length_advantage_coef"),
        (dict(length_advantage_coef=-1.0, length_objective="shaping"), "length_advantage_coef"),
        (dict(length_objective="shorter"), "length_objective"),
        (dict(length_score="l2"), "length_score"),
        (dict(length_lambda=1.5), "length_lambda"),
        (dict(length_discount=0.0), "length_discount"),
        (dict(length_gamma=1.0), "length_gamma"),
        (dict(length_baseline="mean"), "length_baseline"),
        (dict(length_baseline="group", num_generations=1, per_device_train_batch_size=1), "num_generations"),
        (dict(length_baseline="group", length_objective="efficiency"), "length_baseline"),
        (dict(length_potential="median"), "length_potential"),
        (dict(length_potential="expected", length_objective="shaping"), "length_potential"),
        (dict(lenvm_update="online"), "lenvm_update"),
        (dict(lenvm_learning_rate=0.0), "lenvm_learning_rate"),
        (dict(lenvm_epochs=0), "lenvm_epochs"),
        (dict(use_vllm=True, top_p=0.95), "top_p"),  # biases TRL's vLLM importance-sampling ratio (§6.5)
    ],
)
def test_bad_fields_refused(overrides, field, tmp_path):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        config_for(tmp_path, lenvm_model_path="lenvm", **overrides)


def test_top_p_with_vllm_needs_no_importance_correction(tmp_path):
    """The refusal is about TRL's vLLM importance-sampling ratio only: without it, or without vLLM, top_p < 1 runs."""
    kept = dict(length_objective="none", top_p=0.95)
    assert config_for(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False, **kept).top_p == 0.95
    assert config_for(tmp_path, use_vllm=False, **kept).top_p == 0.95


def test_efficiency_accepts_either_sign(tmp_path):
    """Efficiency is a direction, not a target: c < 0 asks for longer completions."""
    config = config_for(tmp_path, lenvm_model_path="lenvm", length_objective="efficiency", length_advantage_coef=-1.0)
    assert config.length_advantage_coef == -1.0


# ------------------------------------------------------------------------------------------ logging and entry point


def wandb_history_keys(run_file: Path) -> set[str]:
    """Keys of the history records in an offline run's `.wandb` file (a LevelDB-style log of protobuf Records)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    data, position, chunks, keys = run_file.read_bytes(), 7, [], set()  # 7: the ":W&B" file header
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is zero-filled
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # the writer is mid-record: read again later
            break
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            try:
                record = wandb_internal_pb2.Record.FromString(b"".join(chunks))
            except DecodeError:  # bytes not flushed yet: the caller reads the file again
                break
            chunks = []
            if record.WhichOneof("record_type") == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return keys


def test_metrics_reach_wandb(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    trainer = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path / "out", lenvm_model_path=lenvm_path, report_to=["wandb"]
    )
    trainer.train()
    wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    expected = {"train/length/mean_abs_advantage", "train/rewards/accuracy/mean", "train/length/online_mre"}
    deadline = time.monotonic() + 30
    while not expected <= (keys := wandb_history_keys(run_file)) and time.monotonic() < deadline:
        time.sleep(0.2)  # the wandb service may still be writing the file after `finish` returns
    assert expected <= keys


def test_main_trains_and_saves_lora(tiny_model_path, lenvm_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                use_peft=True,
                lora_r=4,
                lora_target_modules=["q_proj", "v_proj"],
                num_prompts=8,
                budgets=[3, 6],
                reward_funcs=["accuracy", "length_score"],
                lenvm_model_path=lenvm_path,
                num_generations=2,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=1,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                output_dir=str(tmp_path / "out"),
            )
        )
    )
    main(["--config", str(recipe)])
    saved = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= saved


def test_main_evaluates_held_out_prompts_and_saves_the_log(tiny_model_path, lenvm_path, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            dict(
                model_name_or_path=tiny_model_path,
                num_prompts=8,
                eval_num_prompts=4,
                budgets=[3, 6],
                reward_funcs=["accuracy"],
                lenvm_model_path=lenvm_path,
                num_generations=2,
                per_device_train_batch_size=4,
                per_device_eval_batch_size=4,
                eval_strategy="steps",
                eval_steps=1,
                max_completion_length=8,
                max_steps=2,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                save_strategy="no",
                disable_tqdm=True,
                output_dir=str(tmp_path / "out"),
            )
        )
    )
    main(["--config", str(recipe)])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    evals = [row for row in history if "eval_length/mean_length_score" in row]
    assert [row["step"] for row in evals] == [1, 2]
    for row in evals:
        assert 0.0 <= row["eval_length/mean_length_score"] <= 1.0 and math.isfinite(row["eval_length/online_mre"])
        assert 0.0 <= row["eval_rewards/accuracy/mean"] <= 1.0


def test_eval_strategy_without_held_out_prompts_is_refused(tiny_model_path, lenvm_path, tmp_path):
    with pytest.raises(ConfigError, match="eval_num_prompts"):
        main(
            [
                "--model_name_or_path",
                tiny_model_path,
                "--lenvm_model_path",
                lenvm_path,
                "--budgets",
                "3",
                "--num_prompts",
                "4",
                "--eval_strategy",
                "steps",
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--output_dir",
                str(tmp_path),
            ]
        )


def test_held_out_split_shares_no_text_with_training_prompts():
    args = DatasetArguments(num_prompts=40, skip_prompts=10, arithmetic_difficulty="easy", budgets=[8])
    train, held_out = load_prompt_splits(args, 30)
    question = lambda row: row["prompt"][0]["content"].splitlines()[0]  # noqa: E731 (the budget line differs)
    assert len(train) == 40 and len(held_out) == 30
    assert not {question(r) for r in train} & {question(r) for r in held_out}
    assert [question(r) for r in train] == [question(r) for r in load_prompts(args)]
    assert load_prompt_splits(args, 0)[1] is None


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_parses(path, tmp_path):
    # bf16 and vLLM need hardware this test may not have; both are only parsed here.
    overrides = ["--output_dir", str(tmp_path), "--bf16", "false", "--report_to", "none"]
    types = (GRPOScriptArguments, LenVMGRPOConfig, ModelConfig)
    script_args, config, model_args = parse_recipe(types, ["--config", str(path), *overrides])
    assert model_args.model_name_or_path and script_args.reward_funcs
    assert config.generation_batch_size % config.num_generations == 0


def test_recipes_twins_differ_only_in_the_length_signal():
    folders = {
        path.parent for path in RECIPES if path.name == "config_lenvm_budget.yaml"
    }  # the testbed has its own arms
    assert len(folders) >= 3
    for folder in folders:
        lenvm, baseline = (
            yaml.safe_load((folder / name).read_text())
            for name in ("config_lenvm_budget.yaml", "config_seq_length_score.yaml")
        )
        differing = {key for key in lenvm.keys() | baseline.keys() if lenvm.get(key) != baseline.get(key)}
        assert differing == {"length_objective", "reward_funcs", "output_dir"}, folder
        assert baseline["length_objective"] == "none" and baseline["reward_funcs"] == ["accuracy", "length_score"]


# ------------------------------------------------------------------------------------------ the length critic's options


def test_group_baseline_anchors_at_the_group_mean(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """length_baseline group, d = λ = 1, scale_rewards group, no whitening: the first action's A_len is
    (S(L, N) - group mean of S) / (group std + 1e-4): TRL's advantage of the length score, row by row."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_baseline="group",
        whiten_length_advantage=False,
        num_generations=4,
    )
    torch.manual_seed(0)
    # (an EOS-only completion, L = 0, would get 0: without eos_credit its only action leaves a terminal state)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]] * 2).bool()
    finished = torch.tensor([True, True, False, True, True, True, False, False])
    values_full = -torch.rand(8, 3 + 4) * 0.98 - 0.01
    budgets, kinds = torch.tensor([2.0] * 4 + [3.0] * 4), torch.tensor([0] * 4 + [1] * 4)
    _, length = assemble(trainer, torch.zeros(8), values_full, 3, mask, finished, budgets, kinds)
    lengths = mask.sum(1) - finished.long()
    scores = LENGTH_SCORES["lifebench"](lengths.float(), budgets, kinds).double().view(2, 4)
    expected = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-4)
    finished_rows = finished.view(2, 4)  # a truncated row bootstraps: its anchor cancels (tests/test_returns.py)
    torch.testing.assert_close(
        length[:, 0].double().view(2, 4)[finished_rows], expected[finished_rows], atol=1e-5, rtol=1e-5
    )


def test_whitened_group_baseline_is_not_divided_by_a_degenerate_group_std(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """Groups of 2 with equal realised scores have std 0: whitened, A_len is the whitened group-anchored advantage
    itself (no division by std + 1e-4, which made the LenVM's Φ_j - Φ_0 of those rows 10^4 times larger)."""
    from lenvm_rl.advantages import length_advantages, lenvm_state_values

    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_baseline="group",
        num_generations=2,
        per_device_train_batch_size=4,
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    finished = torch.tensor([True, True, True, True])  # group 1: L = 2 and 2 (std 0); group 2: L = 1 and 3
    values_full = -torch.rand(4, 3 + 4, generator=torch.Generator().manual_seed(0)) * 0.98 - 0.01
    budgets, kinds = torch.tensor([2.0, 2.0, 3.0, 3.0]), torch.tensor([0, 0, 0, 0])
    _, length = assemble(trainer, torch.zeros(4), values_full, 3, mask, finished, budgets, kinds)
    lengths = mask.sum(1) - 1
    scores = LENGTH_SCORES["lifebench"](lengths.float(), budgets, kinds).double()
    anchors = scores.view(2, 2).mean(1).repeat_interleave(2)
    raw = length_advantages(
        lenvm_state_values(values_full, 3, mask, finished),
        mask,
        finished,
        trainer.length_gamma,
        1.0,
        "budget",
        budgets,
        kinds,
        discount=1.0,
        anchors=anchors,
    )
    expected = (raw - raw[mask].mean()) / (raw[mask].std(correction=0) + 1e-8) * mask
    torch.testing.assert_close(length.double(), expected.double(), atol=1e-5, rtol=1e-5)
    assert length.abs().max() < 10


def test_first_batch_scale_is_kept_so_that_a_smaller_advantage_stays_smaller(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """length_advantage_scale first: the first training batch's A_len is divided by its own std (not centred); a
    later batch whose raw A_len is half as large comes out half as large, where per-batch whitening gives std 1."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_advantage_scale="first",
        per_device_train_batch_size=4,
    )
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * mask
    std = x[mask].std(correction=0).item()
    trainer.model.eval()  # eval_on_start: the batch's own std, not kept
    torch.testing.assert_close(x / trainer.first_batch_scale(x, mask), x / std)
    assert trainer.length_scale is None
    trainer.model.train()
    assert trainer.first_batch_scale(x, mask) == pytest.approx(std) and trainer.length_scale == pytest.approx(std)
    assert trainer.first_batch_scale(0.5 * x, mask) == pytest.approx(std)  # kept: the smaller batch stays smaller
    trainer.length_scale = None
    assert trainer.first_batch_scale(0 * x, mask) == 0 and trainer.length_scale is None  # nothing to measure yet


def test_first_batch_scale_survives_a_resume(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    from lenvm_rl.grpo import LENGTH_SCALE_FILE

    options = dict(lenvm_model_path=lenvm_path, length_advantage_scale="first", save_strategy="steps", save_steps=1)
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, max_steps=1, **options)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-1" / LENGTH_SCALE_FILE).read_text())["length_advantage_scale"]
    assert saved == trainer.length_scale > 0
    resumed = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, max_steps=2, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.length_scale == saved


def test_unknown_length_advantage_scale_is_one_clear_error(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    with pytest.raises(ConfigError, match="length_advantage_scale: 'median' is unknown"):
        make_trainer(
            tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, length_advantage_scale="median"
        )


@pytest.mark.parametrize(
    "options",
    [
        dict(length_baseline="group"),
        dict(length_potential="expected"),
        dict(eos_credit=True),
        dict(length_objective="efficiency", eos_credit=True),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_trains_with_each_length_option(options, tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, **options)
    before = snapshot(trainer.model)
    trainer.train()
    check_trained(trainer, before, options.get("length_objective", "budget"))


def critic_mse(trainer) -> list[float]:
    return [row["length/critic_mse"] for row in trainer.state.log_history if "length/critic_mse" in row]


def test_live_critic_learns_the_current_policy_and_a_frozen_one_does_not(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """The LenVM's value MSE on each new batch (before its update) falls over 8 steps when live, not when frozen.
    The policy's learning rate is tiny, so both critics face the same, almost fixed, policy."""
    runs = {}
    for update in ("frozen", "live"):
        runs[update] = make_trainer(
            tiny_model_path,
            tokenizer,
            dataset,
            tmp_path / update,
            lenvm_model_path=lenvm_path,
            lenvm_update=update,
            lenvm_learning_rate=3e-3,
            lenvm_epochs=2,
            learning_rate=1e-6,
            max_steps=8,
        )
        runs[update].train()
    frozen, live = critic_mse(runs["frozen"]), critic_mse(runs["live"])
    assert len(frozen) == len(live) == 8
    assert sum(live[-3:]) / 3 < 0.5 * live[0], live
    assert sum(frozen[-3:]) / 3 > 0.7 * frozen[0], frozen
    losses = [
        row["length/critic_update_loss"] for row in runs["live"].state.log_history if "length/critic_update_loss" in row
    ]
    assert len(losses) == 8 and all(math.isfinite(loss) for loss in losses)
    assert not any("length/critic_update_loss" in row for row in runs["frozen"].state.log_history)


def test_live_critic_is_saved_as_a_plain_lenvm_and_resumes_exactly(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """4 steps in one go, and 2 + 2 resumed from the step-2 checkpoint (weights and optimizer state): the final
    critics are equal; the one saved beside the policy loads with ``load_lenvm`` and shares the policy's tokenizer."""
    from lenvm_rl.modeling import check_lenvm_tokenizer, load_lenvm

    settings = dict(
        lenvm_model_path=lenvm_path,
        lenvm_update="live",
        lenvm_learning_rate=1e-2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
    )
    whole = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path / "whole", **settings)
    whole.train()
    whole.save_model(str(tmp_path / "whole"))
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "lenvm" / "model.safetensors").is_file() and (checkpoint / "lenvm_optimizer.pt").is_file()

    resumed = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    final, again = (t.accelerator.unwrap_model(t.lenvm).state_dict() for t in (whole, resumed))
    start = load_lenvm(lenvm_path).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start)
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)

    saved = load_lenvm(str(tmp_path / "whole" / "lenvm"))
    assert all(torch.equal(saved.state_dict()[k], final[k]) for k in final)
    check_lenvm_tokenizer(str(tmp_path / "whole" / "lenvm"), tokenizer)


def test_live_critic_resume_needs_its_checkpoint_files(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    frozen = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path / "frozen",
        lenvm_model_path=lenvm_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
    )
    frozen.train()
    live = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path / "live",
        lenvm_model_path=lenvm_path,
        lenvm_update="live",
        max_steps=4,
    )
    with pytest.raises(ConfigError, match="resume_from_checkpoint: .* has no lenvm/model.safetensors"):
        live.train(resume_from_checkpoint=str(tmp_path / "frozen" / "checkpoint-2"))


def test_a_live_checkpoint_resumed_with_another_lenvm_is_one_line(
    tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path
):
    """The checkpoint's critic (weights or optimizer state) does not fit the LenVM the resumed run was given."""
    from lenvm_rl.modeling import LenVMModel

    settings = dict(lenvm_update="live", max_steps=1, save_strategy="steps", save_steps=1)
    make_trainer(tiny_model_path, tokenizer, dataset, tmp_path / "run", lenvm_model_path=lenvm_path, **settings).train()
    wide = tmp_path / "wide_lenvm"
    LenVMModel.from_backbone(
        transformers.LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=48, intermediate_size=96)),
        gamma=0.9,
    ).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    resumed = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path / "again", lenvm_model_path=str(wide), **settings
    )
    with pytest.raises(ConfigError, match=r"^resume_from_checkpoint: .*checkpoint-1/lenvm does not fit the LenVM at"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
