"""LenVMPPOTrainer on a tiny random Llama and a tiny LenVM: task GAE (reward placement, KL penalty) against a loop
reference, whitening and the total advantage, a few PPO steps (full and LoRA, one completion per prompt and groups,
gradient accumulation), the value loss falling on a fixed batch, saving and resuming the value head, refusals."""

import math
import warnings

import conftest
import pytest
import torch
import yaml
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lenvm_rl.advantages import clipped_value_loss, task_advantages
from lenvm_rl.cli import main as cli_main
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo import LenVMGRPOConfig
from lenvm_rl.ppo import VALUE_HEAD_FILE, LenVMPPOConfig, LenVMPPOTrainer, main

LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_trainer(model_path, tokenizer, dataset, output_dir, peft_config=None, **overrides):
    return conftest.make_trainer(
        model_path, tokenizer, dataset, output_dir, peft_config, LenVMPPOTrainer, LenVMPPOConfig, **overrides
    )


def generation_batch(trainer, dataset, prompts=2):
    trainer.model.train()  # TRL picks train or eval settings from the model's mode
    inputs = [dataset[i] for i in range(prompts) for _ in range(trainer.num_generations)]
    return trainer._generate_and_score_completions(inputs)


# ------------------------------------------------------------------------------------------ math


def reference_task_advantages(scores, values, mask, gamma, lam, kl, kl_coef):
    """Plain loops: reward -kl_coef · kl_j per token plus the score on the last valid one; V after it is 0."""
    advantages, returns = torch.zeros(mask.shape, dtype=torch.float64), torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        rewards = [-kl_coef * float(kl[b, j]) + (float(scores[b]) if j == n - 1 else 0.0) for j in range(n)]
        state_values = [float(values[b, j]) for j in range(n)] + [0.0]
        running = 0.0
        for j in reversed(range(n)):
            running = rewards[j] + gamma * state_values[j + 1] - state_values[j] + gamma * lam * running
            advantages[b, j], returns[b, j] = running, running + state_values[j]
    return advantages, returns


@pytest.mark.parametrize("gamma, lam, kl_coef", [(1.0, 0.95, 0.0), (0.9, 0.8, 0.3), (1.0, 1.0, 0.1)])
def test_task_advantages_match_loop_reference(gamma, lam, kl_coef):
    torch.manual_seed(0)
    lengths = torch.tensor([7, 3, 1, 0, 5])  # a full row, short rows, an EOS-only row, an emptied (masked) row
    mask = (torch.arange(7) < lengths[:, None]).long()  # (B, T)
    scores, values, kl = torch.randn(5), torch.randn(5, 7), torch.randn(5, 7)
    values[mask == 0] = float("nan")  # padding must never be read
    kl[mask == 0] = float("nan")
    advantages, returns = task_advantages(scores, values, mask, gamma, lam, kl=kl, kl_coef=kl_coef)
    expected_advantages, expected_returns = reference_task_advantages(scores, values, mask, gamma, lam, kl, kl_coef)
    torch.testing.assert_close(advantages.double(), expected_advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns.double(), expected_returns, atol=1e-5, rtol=1e-5)


def test_task_advantages_hand_example():
    """γ = λ = 1, no KL: A_j = R - V_j and the return is R at every token."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    advantages, returns = task_advantages(
        torch.tensor([1.0, 2.0]), torch.tensor([[0.1, 0.2, 0.3], [0.5, 9, 9]]), mask, 1.0, 1.0
    )
    torch.testing.assert_close(advantages, torch.tensor([[0.9, 0.8, 0.7], [1.5, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]))


def test_decoupled_lambda_changes_only_the_returns():
    """value_lam: the advantages keep λ, the returns are those of GAE(γ, value_lam) (VC-PPO's decoupled GAE)."""
    torch.manual_seed(1)
    mask = (torch.arange(6) < torch.tensor([6, 2, 4])[:, None]).long()
    scores, values = torch.randn(3), torch.randn(3, 6)
    advantages, returns = task_advantages(scores, values, mask, 1.0, 0.9, value_lam=1.0)
    torch.testing.assert_close(advantages, task_advantages(scores, values, mask, 1.0, 0.9)[0])
    torch.testing.assert_close(returns, task_advantages(scores, values, mask, 1.0, 1.0)[1])
    torch.testing.assert_close(returns, scores[:, None] * mask)  # γ = λ = 1, no KL: the return is R at every token


def test_lambda_below_one_with_a_cold_critic_favours_short_completions():
    """Why task_lambda defaults to 1: with V = 0, equal rewards, λ = 0.95, a short completion's tokens get more
    advantage than a long one's on average; with λ = 1 every token of both gets R."""
    mask = (torch.arange(40) < torch.tensor([40, 4])[:, None]).long()
    scores, values = torch.ones(2), torch.zeros(2, 40)
    advantages, _ = task_advantages(scores, values, mask, 1.0, 0.95)
    long_mean, short_mean = advantages[0, :40].mean(), advantages[1, :4].mean()
    assert short_mean > 0.9 and long_mean < 0.5
    advantages, _ = task_advantages(scores, values, mask, 1.0, 1.0)
    torch.testing.assert_close(advantages, mask.float())


def test_lambdas_default_to_one():
    """The actor's and the critic's λ both default to 1 (a cold critic with λ < 1 pushes towards short answers)."""
    config = LenVMPPOConfig(
        output_dir="unused",
        report_to="none",
        use_cpu=True,
        num_generations=1,
        per_device_train_batch_size=2,
        length_objective="none",
    )
    assert (config.task_lambda, config.task_value_lambda) == (1.0, 1.0)


def test_clipped_value_loss():
    values, old, returns = torch.tensor([1.0, 0.1, -1.0]), torch.zeros(3), torch.tensor([2.0, 2.0, 0.0])
    loss, clipped = clipped_value_loss(values, old, returns, 0.2)
    # V_clip = 0.2, 0.1, -0.2: the clip binds where it keeps V from moving towards R (row 0), not where V moved away.
    torch.testing.assert_close(loss, torch.tensor([0.5 * 1.8**2, 0.5 * 1.9**2, 0.5]))
    assert clipped.tolist() == [True, False, False]


def test_total_advantage_is_whitened_task_gae(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """length_objective none: A = whiten(GAE of the raw weighted reward on the old values), on valid tokens only;
    the returns use task_value_lambda (1 by default), not task_lambda."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_objective="none",
        task_gamma=0.9,
        task_lambda=0.8,
    )
    batch = generation_batch(trainer, dataset)
    mask = batch["completion_mask"].bool()
    scores = (trainer.batch_rewards * trainer.reward_weights).nansum(1)  # one process: no slicing
    expected, returns = task_advantages(scores, batch["old_values"], mask, 0.9, 0.8, value_lam=1.0)  # critic: λ 1
    valid = expected[mask]
    expected = (expected - valid.mean()) / (valid.std(unbiased=False) + 1e-8) * mask
    torch.testing.assert_close(batch["advantages"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["returns"], returns)
    assert batch["advantages"].shape == batch["completion_ids"].shape and (batch["advantages"][~mask] == 0).all()


def test_budget_objective_adds_the_length_term(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """A - whiten(A_task) = c · A_len: the parent's assembly with a zero task advantage."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        length_advantage_coef=0.5,
        whiten_task_advantage=False,
    )
    batch = generation_batch(trainer, dataset)
    mask = batch["completion_mask"].bool()
    scores = (trainer.batch_rewards * trainer.reward_weights).nansum(1)
    task, _ = task_advantages(scores, batch["old_values"], mask, 1.0, 1.0)
    length = batch["advantages"] - task * mask
    assert length.abs().sum() > 0 and (length[~mask] == 0).all()
    logged = trainer._metrics["train"]["length/mean_abs_advantage"][-1]
    assert math.isclose(length.abs()[mask].mean().item(), logged, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------ training


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


CASES = {
    "full-G1-accum2-kl": dict(num_generations=1, gradient_accumulation_steps=2, kl_coef=0.1),
    "lora-G4-accum2-kl": dict(peft_config=LORA, gradient_accumulation_steps=2, kl_coef=0.1),
    "lora-G1-iterations2": dict(peft_config=LORA, num_generations=1, num_iterations=2, steps_per_generation=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trains(case, tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, **CASES[case])
    before = snapshot(trainer.model)
    heads = {name for name in before if name.startswith("task_value_head.")}
    assert len(heads) == 4 and (before.keys() - heads)
    if "lora" in case:
        assert all("lora_" in name for name in before.keys() - heads)
    trainer.train()

    after = snapshot(trainer.model)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters did not change: {unchanged}"
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 2 and all(math.isfinite(row["loss"]) for row in logs)
    for name in ("ppo/value_loss", "ppo/value_clipfrac", "clip_ratio/region_mean"):  # every optimizer step
        assert all(math.isfinite(row[name]) for row in logs), name
    per_generation = [
        "ppo/explained_variance",
        "length/mean_abs_advantage",
        "length/budget_hit_rate",
        "rewards/accuracy/mean",
    ] + ["ppo/kl"] * ("kl_coef" in CASES[case])
    for name in per_generation:  # logged with each generation batch (once for num_iterations 2)
        values = [row[name] for row in logs if name in row]
        assert values and all(math.isfinite(value) for value in values), name
    batch = trainer._buffered_inputs[-1]
    mask = batch["completion_mask"] == 0
    assert batch["advantages"].shape == batch["returns"].shape == batch["old_values"].shape == mask.shape
    assert (batch["advantages"][mask] == 0).all() and batch["advantages"].abs().sum() > 0


def test_value_loss_falls_on_a_fixed_batch(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    # A wide value clip: the clip is a trust region around V_old, and this test is about the fit.
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        learning_rate=1e-5,
        value_head_learning_rate=3e-3,
        cliprange_value=100.0,
        vf_coef=1.0,
    )
    batch = generation_batch(trainer, dataset)
    optimizer = trainer.create_optimizer()
    assert optimizer.param_groups[-1]["lr"] == 3e-3 and len(optimizer.param_groups[-1]["params"]) == 4
    trainer.current_gradient_accumulation_steps = 1
    for _ in range(12):
        optimizer.zero_grad()
        trainer.compute_loss(trainer.model, batch).backward()
        optimizer.step()
    losses = trainer._metrics["train"]["ppo/value_loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_main_saves_the_head_and_resume_loads_it(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
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
                num_generations=1,
                per_device_train_batch_size=4,
                max_completion_length=8,
                max_steps=1,
                use_cpu=True,
                bf16=False,
                activation_checkpointing=False,
                report_to="none",
                save_strategy="steps",
                save_steps=1,
                disable_tqdm=True,
                output_dir=str(tmp_path / "out"),
            )
        )
    )
    main(["--config", str(recipe)])
    out = tmp_path / "out"
    saved = {str(path.relative_to(out)) for path in out.rglob("*")}
    assert {"adapter_model.safetensors", VALUE_HEAD_FILE, "lenvm_rl_run.json"} <= saved
    assert not [
        name
        for name in saved
        if name.endswith(".safetensors") and "/" not in name and name != "adapter_model.safetensors"
    ]
    head = load_file(out / VALUE_HEAD_FILE)
    assert head["out.weight"].abs().sum() > 0  # trained away from its zero init
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / VALUE_HEAD_FILE).is_file()

    trainer = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path / "resumed", peft_config=LORA, lenvm_model_path=lenvm_path
    )
    trainer._load_from_checkpoint(str(checkpoint))
    for name, tensor in load_file(checkpoint / VALUE_HEAD_FILE).items():
        torch.testing.assert_close(trainer.task_value_head.state_dict()[name], tensor)


# ------------------------------------------------------------------------------------------ refusals


def test_unknown_recipe_field_fails_clearly(tiny_model_path, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    fields = dict(
        model_name_or_path=tiny_model_path,
        length_objective="none",
        vf_coeff=0.5,
        use_cpu=True,
        bf16=False,
        output_dir=str(tmp_path),
    )  # valid but for the misspelt vf_coef: TRL checks the others first
    recipe.write_text(yaml.safe_dump(fields))
    with pytest.raises(SystemExit) as exit_info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's FutureWarnings are not the program's message
        cli_main(["ppo", "--config", str(recipe)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lenvm-rl ppo: error: recipe: unknown field(s) vf_coeff")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(vf_coef=0.0), "vf_coef"),
        (dict(cliprange_value=0.0), "cliprange_value"),
        (dict(task_gamma=0.0), "task_gamma"),
        (dict(task_lambda=1.5), "task_lambda"),
        (dict(task_value_lambda=-0.1), "task_value_lambda"),
        (dict(kl_coef=-0.1), "kl_coef"),
        (dict(value_head_learning_rate=0.0), "value_head_learning_rate"),
        (dict(num_generations=3, per_device_train_batch_size=8), "num_generations"),
    ],
)
def test_bad_fields_refused(overrides, field, tmp_path):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        LenVMPPOConfig(output_dir=str(tmp_path), use_cpu=True, lenvm_model_path="lenvm", **overrides)


def test_one_generation_is_ppo_only(tmp_path):
    assert LenVMPPOConfig(output_dir=str(tmp_path), use_cpu=True, lenvm_model_path="lenvm", num_generations=1)
    with pytest.raises(ConfigError, match="^num_generations: 1 completions per prompt must be >= 2"):
        LenVMGRPOConfig(output_dir=str(tmp_path), use_cpu=True, lenvm_model_path="lenvm", num_generations=1)


@pytest.mark.parametrize("lora", [False, True])
def test_vllm_weight_sync_gets_the_policy_without_the_task_head(
    lora, tiny_model_path, tokenizer, dataset, tmp_path, lenvm_path
):
    """TRL's own parameter walk of its vLLM weight sync (``VLLMGeneration._iter_named_params``), on this trainer's
    policy: what reaches vLLM's ``load_weights`` is exactly the plain causal LM's parameter names, no head."""
    import types
    from contextlib import nullcontext

    from trl.generation.vllm_generation import VLLMGeneration

    peft_config = (
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") if lora else None
    )
    trainer = make_trainer(
        tiny_model_path, tokenizer, dataset, tmp_path, peft_config=peft_config, lenvm_model_path=lenvm_path
    )
    generation = types.SimpleNamespace(
        model=trainer.model, _dist=types.SimpleNamespace(is_fsdp=False, gather_params=lambda params: nullcontext())
    )
    for method in ("_iter_named_params", "_fix_param_name_to_vllm"):
        setattr(generation, method, types.MethodType(getattr(VLLMGeneration, method), generation))
    assert any(name.startswith("task_value_head.") for name, _ in generation._iter_named_params())  # TRL's walk alone
    trainer.keep_heads_out_of_vllm(generation)
    received = [name for name, _ in generation._iter_named_params()]  # what load_weights would be given
    expected = [name for name, _ in AutoModelForCausalLM.from_pretrained(tiny_model_path).named_parameters()]
    assert sorted(received) == sorted(expected)
