"""LenVMTrainer on tiny rollouts: it trains, evaluates, normalises accumulated gradients by valid states,
and builds full, frozen-backbone and LoRA LenVMs from a model path."""

import math

import pytest
import torch
from conftest import write_rollout_shard
from trl import ModelConfig

from lenvm_rl.critic_metrics import collate_states, length_metrics, score_rollouts
from lenvm_rl.errors import ConfigError
from lenvm_rl.modeling import LenVMModel, load_lenvm
from lenvm_rl.rollout_data import load_rollouts
from lenvm_rl.train_lenvm import LenVMTrainer, LenVMTrainingConfig, build_lenvm, prepare_rollouts, split_by_prompt

TRAIN_LENGTHS = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)  # finished training lengths: the constants
GAMMA = 0.9
METRICS = [
    "value_mse",
    "boundary_mre",
    "boundary_value_mae",
    "constant_mre",
    "constant_value_mre",
    *(f"length_{kind}_p{q}" for kind in ("mae", "rel_err") for q in (0, 25, 50, 75)),
]


@pytest.fixture(scope="module")
def rollouts(rollouts_dir):
    return load_rollouts(rollouts_dir)


@pytest.fixture(scope="module")
def finished_rows(rollouts):
    return prepare_rollouts(rollouts, "drop", None, "rollouts_path")


def training_config(output_dir, **overrides) -> LenVMTrainingConfig:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        gamma=str(GAMMA),
        seed=0,
        disable_tqdm=True,
    )
    return LenVMTrainingConfig(**{**settings, **overrides})


def make_lenvm_trainer(model_path, tokenizer, rows, output_dir, model_args=None, **overrides):
    config = training_config(output_dir, **overrides)
    model_args = model_args or ModelConfig(model_name_or_path=model_path)
    model = build_lenvm(model_args, config, GAMMA, TRAIN_LENGTHS)
    return LenVMTrainer(model, config, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trains_and_evaluates(tiny_model_path, tokenizer, finished_rows, tmp_path):
    trainer = make_lenvm_trainer(tiny_model_path, tokenizer, finished_rows, tmp_path)
    before = snapshot(trainer.model)
    trainer.train()
    losses = train_losses(trainer)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    unchanged = [n for n, p in trainer.model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged
    metrics = trainer.evaluate()
    for name in METRICS:
        assert math.isfinite(metrics[f"eval_{name}"]), name
    assert metrics["eval_num_prompts"] == len(set(finished_rows["prompt_id"]))


def test_accumulated_gradient_equals_token_mean_of_concatenated_batch(
    tiny_model_path, tokenizer, finished_rows, tmp_path
):
    trainer = make_lenvm_trainer(tiny_model_path, tokenizer, finished_rows, tmp_path)
    model = trainer.model
    records = [finished_rows[i] for i in range(4)]
    micro_batches = [
        collate_states(records[:2], tokenizer.pad_token_id),
        collate_states(records[2:], tokenizer.pad_token_id),
    ]
    # Every state s_0 .. s_L of every (finished) row is labelled.
    num_items = trainer._get_num_items_in_batch(micro_batches, torch.device("cpu"))
    assert int(num_items) == sum(row["completion_tokens"] + 1 for row in records)

    def gradients():
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return grads

    model.zero_grad()
    for batch in micro_batches:
        trainer.training_step(model, batch, num_items)
    accumulated = gradients()
    model(**collate_states(records, tokenizer.pad_token_id)).loss.backward()
    whole = gradients()
    for batch in micro_batches:  # what an unnormalised accumulation would give: a mean of micro-batch means
        (model(**batch).loss / len(micro_batches)).backward()
    naive = gradients()

    assert accumulated.keys() == whole.keys() and len(whole) == len(list(model.parameters()))
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-4, atol=1e-7, msg=name)
    assert not torch.allclose(naive["head.out.weight"], whole["head.out.weight"], rtol=1e-3)


def test_prepare_rollouts(rollouts, tmp_path):
    finished = sum(rollouts["finished"])
    assert 0 < finished < len(rollouts)  # the fixture mixes both kinds
    dropped = prepare_rollouts(rollouts, "drop", None, "rollouts_path")
    assert len(dropped) == finished and all(dropped["finished"])
    assert len(prepare_rollouts(rollouts, "bootstrap", None, "rollouts_path")) == len(rollouts)
    lengths = [len(p) + len(c) for p, c in zip(rollouts["prompt_ids"], rollouts["completion_ids"])]
    limit = sorted(lengths)[len(lengths) // 2]
    short = prepare_rollouts(rollouts, "bootstrap", limit, "rollouts_path")
    expected = sum(length <= limit for length in lengths)
    assert 0 < len(short) == expected < len(rollouts)

    truncated = load_rollouts(
        write_rollout_shard(
            tmp_path,
            [
                {
                    "prompt_id": i,
                    "sample_index": 0,
                    "prompt_ids": [5, 6],
                    "completion_ids": [7] * 4,
                    "completion_tokens": 4,
                    "finished": False,
                }
                for i in range(3)
            ],
        )
    )
    for mode in ("drop", "bootstrap"):
        with pytest.raises(ConfigError, match="rollouts_path: none of its 3 rollouts finished"):
            prepare_rollouts(truncated, mode, None, "rollouts_path")
    with pytest.raises(ConfigError, match="not a rollout dataset"):
        prepare_rollouts(truncated.remove_columns("finished"), "drop", None, "rollouts_path")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_split_by_prompt_holds_out_whole_prompts(rollouts, fraction, seed):
    train, evaluation = split_by_prompt(rollouts, fraction, seed)
    train_prompts, eval_prompts = set(train["prompt_id"]), set(evaluation["prompt_id"])
    assert train_prompts and eval_prompts and not train_prompts & eval_prompts
    assert len(train) + len(evaluation) == len(rollouts)
    assert len(eval_prompts) == max(1, round(fraction * len(set(rollouts["prompt_id"]))))


def test_split_refuses_to_hold_out_every_prompt(rollouts):
    with pytest.raises(ConfigError, match="eval_prompt_fraction"):
        split_by_prompt(rollouts, 1.0, 0)


@pytest.mark.parametrize(
    "field, value", [("gamma", "1.5"), ("gamma", "0"), ("value_loss", "l2"), ("truncated_rollouts", "label")]
)
def test_config_refuses_bad_fields(field, value, tmp_path):
    with pytest.raises(ValueError, match=field):
        training_config(tmp_path, **{field: value})


def test_frozen_backbone_leaves_only_the_head_trainable(tiny_model_path, tmp_path):
    config = training_config(tmp_path, freeze_backbone=True)
    model = build_lenvm(ModelConfig(model_name_or_path=tiny_model_path), config, GAMMA, TRAIN_LENGTHS)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head"}


def test_lora_trains_adapters_and_head_only_and_merges(tiny_model_path, tokenizer, finished_rows, tmp_path):
    model_args = ModelConfig(
        model_name_or_path=tiny_model_path, use_peft=True, lora_target_modules=["q_proj", "v_proj"]
    )
    trainer = make_lenvm_trainer(tiny_model_path, tokenizer, finished_rows, tmp_path, model_args)
    before = snapshot(trainer.model)
    trainer.train()
    assert all(math.isfinite(loss) for loss in train_losses(trainer))
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("head.modules_to_save" in n for n in changed)
    assert not any("base_layer" in n or "original_module" in n for n in trainable)

    # What `train-lenvm` saves: the adapter merged into a plain LenVM that predicts the same values.
    peft_values = score_rollouts(trainer.model, finished_rows, tokenizer.pad_token_id)
    merged = trainer.model.merge_and_unload()
    assert isinstance(merged, LenVMModel)
    merged.save_pretrained(tmp_path / "merged")
    reloaded_values = score_rollouts(load_lenvm(str(tmp_path / "merged")), finished_rows, tokenizer.pad_token_id)
    for peft_v, reloaded_v in zip(peft_values, reloaded_values):
        torch.testing.assert_close(reloaded_v, peft_v, rtol=1e-4, atol=1e-6)


def test_missing_lora_target_module_is_a_config_error(tiny_model_path, tmp_path):
    model_args = ModelConfig(model_name_or_path=tiny_model_path, use_peft=True, lora_target_modules=["qkv_proj"])
    with pytest.raises(ConfigError, match=r"lora_target_modules: .*qkv_proj.*use some of: .*q_proj"):
        build_lenvm(model_args, training_config(tmp_path), GAMMA, TRAIN_LENGTHS)


def test_constant_baselines_against_hand_computation():
    """Two prompts, lengths {2, 4} and {6}; γ = 0.5. L_GT(p) = ln(1 - mean(1 - γ^L)) / ln γ."""
    rows = [
        {"prompt_id": 0, "completion_tokens": 2, "finished": True},
        {"prompt_id": 0, "completion_tokens": 4, "finished": True},
        {"prompt_id": 1, "completion_tokens": 6, "finished": True},
    ]
    values = [torch.zeros(row["completion_tokens"] + 1) for row in rows]
    truth = [math.log((0.25 + 0.0625) / 2) / math.log(0.5), 6.0]
    metrics = length_metrics(rows, values, 0.5, {"constant_mre": 4.0, "constant_value_mre": 3.0})
    assert metrics["constant_mre"] == pytest.approx(sum(abs(4.0 - t) / t for t in truth) / 2)
    assert metrics["constant_value_mre"] == pytest.approx(sum(abs(3.0 - t) / t for t in truth) / 2)
    assert metrics["boundary_mre"] == pytest.approx(1.0)  # V(s_0) = 0 predicts 0 tokens


def test_backbone_with_another_tokenizer_is_refused(rollouts_dir, tiny_model_path, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from lenvm_rl.rollout_data import check_rollout_tokenizer

    same_family = shutil.copytree(tiny_model_path, tmp_path / "same")
    check_rollout_tokenizer(str(rollouts_dir), str(same_family), AutoTokenizer.from_pretrained(same_family))
    other = shutil.copytree(tiny_model_path, tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<budget>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="model_name_or_path: .* another tokenizer"):
        check_rollout_tokenizer(str(rollouts_dir), str(other), AutoTokenizer.from_pretrained(other))
