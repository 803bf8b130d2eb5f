"""Guided exploration (docs/DESIGN.md §3.14): the importance weights against a plain-loop reference and hand cases,
the support floor (every token reachable, the weighted estimate unbiased; without the floor it is not), the guided
processor's μ, the folding of w into the advantages against TRL's own vLLM correction in ``_compute_loss``, GRPO and
PPO training with guided samples (which rows, log μ recorded, w = 1 when μ = π), a resume, and the refusals."""

import math

import pytest
import torch
from conftest import make_tiny_llama, make_trainer

from lenvm_rl.advantages import IMPORTANCE_MODES, floored_log_probs, importance_weights
from lenvm_rl.decoding import LenVMGuidedLogitsProcessor
from lenvm_rl.errors import ConfigError
from lenvm_rl.grpo import LenVMGRPOConfig
from lenvm_rl.modeling import LenVMModel

# ------------------------------------------------------------------------------------------ the math


def reference_weights(policy, sampling, mask, cap, mode, cap_min=0.0):
    """Plain loops over rows and tokens."""
    rows, tokens = len(mask), len(mask[0])
    out, acted = [], []
    for b in range(rows):
        diffs = []
        for t in range(tokens):
            d = policy[b][t] - sampling[b][t] if mask[b][t] else 0.0
            diffs.append(0.0 if math.isnan(d) else d)
        if mode.startswith("sequence"):
            ratio = math.exp(sum(diffs))
            hit = ratio > cap or ratio < cap_min
            out.append([min(max(ratio, cap_min), cap) if mode.endswith("truncate") else (0.0 if hit else ratio)])
            acted.append([hit])
            continue
        row, row_acted = [], []
        for t in range(tokens):
            ratio = math.exp(diffs[t])
            outside = ratio > cap or ratio < cap_min
            hit = outside and bool(mask[b][t])
            weight = min(max(ratio, cap_min), cap) if mode.endswith("truncate") else (0.0 if outside else ratio)
            row.append(weight if mask[b][t] else 0.0)
            row_acted.append(hit)
        out.append(row)
        acted.append(row_acted)
    return out, acted


@pytest.mark.parametrize("mode", IMPORTANCE_MODES)
def test_importance_weights_match_a_loop_reference(mode):
    torch.manual_seed(0)
    policy, sampling = -torch.rand(5, 7) * 3, -torch.rand(5, 7) * 3
    sampling[1] = math.nan  # a plain row: w = 1
    sampling[2, 3] = math.nan
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[3, 1:] = 0
    for cap_min in (0.0, 0.5):
        weights, acted = importance_weights(policy, sampling, mask, 2.0, mode, cap_min)
        expected, expected_acted = reference_weights(
            policy.tolist(), sampling.tolist(), mask.tolist(), 2.0, mode, cap_min
        )
        torch.testing.assert_close(weights, torch.tensor(expected), rtol=1e-6, atol=1e-6)
        assert acted.tolist() == expected_acted
        assert acted.any() and (~acted).any()


def test_importance_weights_hand_case():
    policy = torch.tensor([[math.log(0.5), math.log(0.4), 0.0]])
    sampling = torch.tensor([[math.log(0.25), math.log(0.8), 0.0]])  # ratios 2, 0.5, padding
    mask = torch.tensor([[1, 1, 0]])
    weights, acted = importance_weights(policy, sampling, mask, 1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert acted.tolist() == [[True, False, False]]
    weights, _ = importance_weights(policy, sampling, mask, 1.5, "sequence_truncate")  # 2 · 0.5 = 1
    torch.testing.assert_close(weights, torch.tensor([[1.0]]))
    weights, _ = importance_weights(policy, sampling, mask, 0.9, "sequence_mask")  # 1 > 0.9: masked
    torch.testing.assert_close(weights, torch.tensor([[0.0]]))
    weights, _ = importance_weights(policy, sampling, mask, 1.0, cap_min=1.0)  # C_min = C = 1: no correction
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0, 0.0]]))


def test_floor_keeps_every_token_reachable_and_the_estimate_unbiased():
    """The support rule: with μ = (1 - ε) q + ε π, Σ_x μ(x) w(x) f(x) = Σ_x π(x) f(x) for any f when C >= 1 / ε.
    A guide that keeps the top k alone (ε -> 0) loses the mass π puts outside them."""
    torch.manual_seed(0)
    policy = torch.randn(3, 12).log_softmax(-1)  # (R, V)
    top = policy.topk(4, dim=-1).indices
    guided = torch.full_like(policy, -math.inf).scatter(1, top, torch.randn(3, 4).log_softmax(-1))  # q on the top 4
    f = torch.randn(3, 12)
    truth = (policy.exp() * f).sum(-1)
    for floor in (0.05, 0.3, 1.0):
        mixed = floored_log_probs(guided, policy, floor)
        torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(3), rtol=1e-6, atol=1e-6)
        assert (mixed.exp() >= floor * policy.exp() - 1e-7).all()  # every token π can emit, μ can emit
        weights, acted = importance_weights(policy, mixed, torch.ones_like(policy), 1.0 / floor + 1e-4)
        assert not acted.any() and weights.max() <= 1.0 / floor + 1e-4
        torch.testing.assert_close((mixed.exp() * weights * f).sum(-1), truth, rtol=1e-5, atol=1e-5)
    # Without the floor, tokens outside the top 4 are never drawn: the weighted estimate misses their mass.
    weights, _ = importance_weights(policy, guided, torch.ones_like(policy), 1e9)
    estimate = torch.where(guided.isinf(), 0.0, guided.exp() * weights * f).sum(-1)
    outside = torch.ones_like(policy, dtype=torch.bool).scatter(1, top, False)
    torch.testing.assert_close(estimate, truth - (policy.exp() * f * outside).sum(-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(estimate, truth, atol=1e-3)


def test_processor_output_is_the_floored_guided_distribution(tokenizer):
    """μ from the processor: normalised, >= ε π on the whole vocabulary, and equal to (1 - ε) q + ε π with q the
    score-tilted policy on the top-k candidates."""
    torch.manual_seed(1)
    lenvm = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=0.9).eval()
    prompts = torch.randint(3, 20, (2, 5))
    eos = tokenizer.eos_token_id
    scores = torch.randn(2, lenvm.config.backbone_config.vocab_size)
    policy = scores.log_softmax(-1)
    processor = LenVMGuidedLogitsProcessor(
        lenvm, [4, 8], ["exact", "at_most"], [5, 5], {eos}, mode="score", top_k=4, beta=3.0, floor=0.2
    )
    mu = processor(prompts, scores).exp()
    torch.testing.assert_close(mu.sum(-1), torch.ones(2), rtol=1e-5, atol=1e-5)
    assert (mu >= 0.2 * policy.exp() - 1e-7).all()
    top = policy.topk(4, -1).indices
    guide = (mu - 0.2 * policy.exp()) / 0.8  # q
    outside = torch.ones_like(mu, dtype=torch.bool).scatter(1, top, False)
    assert guide[outside].abs().max() < 1e-6 and processor.scored_tokens > 0
    unguided = LenVMGuidedLogitsProcessor(lenvm, [4, 8], ["exact", "at_most"], [5, 5], {eos}, mode="score", top_k=4)
    assert unguided(prompts, scores).exp()[outside].max() == 0  # no floor: outside the candidates, never


# ------------------------------------------------------------------------------------------ the trainers

GUIDED = dict(guided_generations=2, guidance_beta=3.0)


def test_folded_weights_equal_trls_own_importance_correction(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """w · A in the advantages gives the loss TRL computes with its vLLM ratio in ``_compute_loss``."""
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, max_steps=1)
    trainer.train()
    inputs = dict(trainer._buffered_inputs[-1])
    torch.manual_seed(0)
    weights = torch.rand(inputs["completion_mask"].shape) * 3
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    trls = trainer._compute_loss(trainer.model, {**inputs, "importance_sampling_ratio": weights})
    trainer.use_vllm = False
    folded = trainer._compute_loss(trainer.model, {**inputs, "advantages": inputs["advantages"] * weights})
    torch.testing.assert_close(folded, trls, rtol=1e-6, atol=1e-7)


def test_grpo_trains_with_guided_samples(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    trainer = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, lenvm_model_path=lenvm_path, **GUIDED)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    batch = trainer._buffered_inputs[-1]
    logged = {key for entry in trainer.state.log_history for key in entry}
    for name in ("weight_mean", "weight_max", "clipped_share", "hit_rate", "plain_hit_rate", "length_score"):
        assert f"guided/{name}" in logged, name
    assert {"guided/lenvm_forward_time_s", "guided/lenvm_scored_tokens", "guided/plain_length_score"} <= logged
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    # TRL shuffles the batch: the guided rows are the ones with a recorded log μ, 2 of each group of 4.
    sampling, mask = batch["sampling_per_token_logps"], batch["completion_mask"].bool()
    guided = ~sampling[:, 0].isnan()
    assert guided.sum() == 4 and (sampling[guided][mask[guided]] <= 0).all()
    assert sampling[~guided][mask[~guided]].isnan().all()
    assert trainer.guided_rows(8).tolist() == [False, False, True, True] * 2


def test_guided_rows_weigh_one_when_the_guide_is_the_policy(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    """guidance_floor 1: μ = π_T, so the recorded log μ is log π_old and every weight is 1 (at temperature 0.7)."""
    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        lenvm_model_path=lenvm_path,
        max_steps=1,
        temperature=0.7,
        **{**GUIDED, "guidance_floor": 1.0},
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "guided/weight_mean" in e)
    assert entry["guided/weight_mean"] == pytest.approx(1.0, abs=1e-4)
    assert entry["guided/weight_max"] == pytest.approx(1.0, abs=1e-4) and entry["guided/clipped_share"] == 0


def test_ppo_trains_with_guided_samples(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    from lenvm_rl.ppo import LenVMPPOConfig, LenVMPPOTrainer

    trainer = make_trainer(
        tiny_model_path,
        tokenizer,
        dataset,
        tmp_path,
        trainer_class=LenVMPPOTrainer,
        config_class=LenVMPPOConfig,
        lenvm_model_path=lenvm_path,
        max_steps=1,
        **GUIDED,
    )
    trainer.train()
    assert any("guided/weight_mean" in e and "ppo/value_loss" in e for e in trainer.state.log_history)


def test_guided_run_resumes(tiny_model_path, tokenizer, dataset, lenvm_path, tmp_path):
    options = dict(lenvm_model_path=lenvm_path, save_strategy="steps", save_steps=1, **GUIDED)
    make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, max_steps=1, **options).train()
    resumed = make_trainer(tiny_model_path, tokenizer, dataset, tmp_path, max_steps=2, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.state.global_step == 2
    steps = [e["step"] for e in resumed.state.log_history if "guided/weight_mean" in e]
    assert steps == [1, 2]  # step 1 from the checkpoint's log, step 2 trained after the resume


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(guided_generations=5), "guided_generations"),
        (dict(guided_generations=1, lenvm_model_path=None, length_objective="none"), "guided_generations"),
        (dict(guided_generations=1, use_vllm=True), "guided_generations"),
        (dict(guided_generations=1, guidance_floor=0.0), "guidance_floor"),
        (dict(guided_generations=1, guidance_mode="argmax"), "guidance_mode"),
        (dict(guided_generations=1, guided_importance_mode="sequence"), "guided_importance_mode"),
        (dict(guided_generations=1, guided_importance_cap=0.5), "guided_importance_cap"),
        (dict(guided_generations=1, guided_importance_min=2.0), "guided_importance_min"),
    ],
)
def test_bad_guided_fields_refused(overrides, field, tmp_path):
    fields = dict(output_dir=str(tmp_path), use_cpu=True, num_generations=4, lenvm_model_path=str(tmp_path))
    with pytest.raises(ConfigError, match=f"^{field}:"):
        LenVMGRPOConfig(**{**fields, **overrides})


def test_guided_without_budget_columns_refused(tiny_model_path, tokenizer, lenvm_path, tmp_path):
    from lenvm_rl.data import DatasetArguments, load_prompts

    plain = load_prompts(DatasetArguments(num_prompts=8))
    with pytest.raises(ConfigError, match="^guided_generations:"):
        make_trainer(
            tiny_model_path, tokenizer, plain, tmp_path, lenvm_model_path=lenvm_path, length_objective="none", **GUIDED
        )


def launch_guided_probe(tmp_path, tiny_model_path, lenvm_path, **fields):
    """tests/mp_guided_probe.py under a 2-process launch: 2 rows per rank, groups of 4, 1 guided per group; its
    per-call dumps (rank{r}_{call}.pt) are in the returned folder, the run in ``tmp_path / "out"``."""
    import yaml
    from test_multiprocess import ROOT, launch

    recipe = tmp_path / "grpo.yaml"
    settings = dict(
        model_name_or_path=tiny_model_path,
        num_prompts=8,
        budgets=[3, 6],
        reward_funcs=["accuracy", "length_score"],
        lenvm_model_path=lenvm_path,
        num_generations=4,
        per_device_train_batch_size=2,
        max_completion_length=8,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        output_dir=str(tmp_path / "out"),
        seed=0,
        guided_generations=1,
    )
    recipe.write_text(yaml.safe_dump({**settings, **fields}))
    dumps = tmp_path / "dumps"
    launch([str(ROOT / "tests" / "mp_guided_probe.py"), str(dumps), "--config", str(recipe)], 2, tmp_path)
    return dumps


def test_two_processes_guide_the_last_rows_of_each_global_group(tiny_model_path, lenvm_path, tmp_path):
    """2 CPU processes, 2 rows each, groups of 4, k = 1: the guided row is global row 3 of each group, so rank 0
    samples none and rank 1 one; plain rows keep their advantages, the guided one is reweighted."""
    dumps = launch_guided_probe(tmp_path, tiny_model_path, lenvm_path, budget_kinds=["exact", "at_most"], max_steps=1)
    ranks = [torch.load(dumps / f"rank{r}_0.pt") for r in range(2)]
    assert all(d["world_size"] == 2 for d in ranks)
    assert ranks[0]["guided"].tolist() == [False, False] and ranks[1]["guided"].tolist() == [False, True]
    for d in ranks:
        guided, mask = d["guided"], d["mask"].bool()
        assert d["sampling"][~guided][mask[~guided]].isnan().all()  # TRL pads with 0
        assert d["sampling"][guided][mask[guided]].isfinite().all()
        before = d["before"][:, None] if d["before"].dim() == 1 else d["before"]
        torch.testing.assert_close(d["after"][~guided], (before * mask)[~guided].float())
    row = ranks[1]["mask"][1].bool()
    assert not torch.allclose(ranks[1]["after"][1][row], ranks[1]["before"][1][row].float())
    state = (tmp_path / "out" / "trainer_state.json").read_text()
    assert "guided/weight_mean" in state and "guided/plain_hit_rate" in state
