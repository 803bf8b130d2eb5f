"""The frozen-layer cache of a top-layer LenVM: the same training as without it, refused where it cannot hold."""

import pytest
import torch
from test_train_lenvm import GAMMA, TRAIN_LENGTHS, snapshot, train_losses, training_config
from trl import ModelConfig

from lenvm_rl.critic_metrics import collate_states
from lenvm_rl.errors import ConfigError
from lenvm_rl.rollout_data import load_rollouts
from lenvm_rl.train_lenvm import LenVMTrainer, build_lenvm, prepare_rollouts
from lenvm_rl.trunk_cache import FrozenTrunkCache, attach_trunk_cache


@pytest.fixture(scope="module")
def finished_rows(rollouts_dir):
    return prepare_rollouts(load_rollouts(rollouts_dir), "drop", None, "rollouts_path")


def trainer_for(model_path, tokenizer, rows, output_dir, model_args=None, **overrides):
    settings = dict(max_steps=-1, num_train_epochs=3, trainable_top_layers=1, per_device_train_batch_size=3, bf16=False)
    config = training_config(output_dir, **{**settings, **overrides})
    model_args = model_args or ModelConfig(model_name_or_path=model_path)
    torch.manual_seed(0)  # the head's initialisation
    model = build_lenvm(model_args, config, GAMMA, TRAIN_LENGTHS)
    return LenVMTrainer(model, config, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer), model_args


def test_cached_epochs_train_as_the_full_forward_does(tiny_model_path, tokenizer, finished_rows, tmp_path):
    runs = {}
    for choice in ("false", "true"):
        trainer, model_args = trainer_for(
            tiny_model_path, tokenizer, finished_rows, tmp_path / choice, cache_frozen_layers=choice
        )
        tokens = sum(len(p) + len(c) for p, c in zip(finished_rows["prompt_ids"], finished_rows["completion_ids"]))
        cache = attach_trunk_cache(trainer, trainer.args, model_args, tokens)
        trainer.train()
        runs[choice] = (train_losses(trainer), snapshot(trainer.model), cache)
    (plain_losses, plain_weights, none), (losses, weights, cache) = runs["false"], runs["true"]
    assert none is None and cache.enabled and cache.verified
    steps_per_epoch = -(-len(finished_rows) // 3) // 2  # batches of 3, 2 accumulated per step
    assert cache.hits >= 2 * steps_per_epoch * 2  # epochs 2 and 3 skip the frozen layer in every micro-batch
    assert losses == pytest.approx(plain_losses, rel=1e-4, abs=1e-6)
    for name, value in weights.items():
        torch.testing.assert_close(value, plain_weights[name], rtol=1e-4, atol=1e-6, msg=name)
    changed = [n for n, p in weights.items() if not torch.equal(p, snapshot_of_start(tiny_model_path, n))]
    assert any(".layers.1." in n for n in changed) and not any(".layers.0." in n for n in changed)


def snapshot_of_start(model_path, name, cache={}):  # noqa: B006 - built once per test session
    if not cache:
        config = training_config("unused", trainable_top_layers=1)
        torch.manual_seed(0)
        cache.update(snapshot(build_lenvm(ModelConfig(model_name_or_path=model_path), config, GAMMA, TRAIN_LENGTHS)))
    return cache[name]


def test_a_shortcut_that_differs_turns_the_cache_off(tiny_model_path, tokenizer, finished_rows, tmp_path):
    trainer, _ = trainer_for(tiny_model_path, tokenizer, finished_rows, tmp_path)
    model = trainer.model.train()
    batch = collate_states([finished_rows[i] for i in range(3)], tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "state_positions")}
    full = model(**inputs).length_values.detach()  # no cache yet
    cache = FrozenTrunkCache(model, 1, 2**30)
    model(**inputs)  # records
    assert len(cache.rows) == 3 and cache.hits == 0
    torch.testing.assert_close(model(**inputs).length_values.detach(), full)  # replayed, checked once
    assert cache.enabled and cache.verified and cache.hits == 1
    cache.remove()
    broken = FrozenTrunkCache(model, 1, 2**30)
    model(**inputs)
    for key in broken.rows:
        broken.rows[key] += 1.0
    torch.testing.assert_close(model(**inputs).length_values.detach(), full)  # ran in full
    assert not broken.enabled and broken.hits == 0 and not broken.rows


def test_nothing_is_recorded_for_evaluation_or_left_padding(tiny_model_path, tokenizer, finished_rows, tmp_path):
    trainer, _ = trainer_for(tiny_model_path, tokenizer, finished_rows, tmp_path)
    model = trainer.model
    cache = FrozenTrunkCache(model, 1, 2**30)
    batch = collate_states([finished_rows[i] for i in range(2)], tokenizer.pad_token_id)
    with torch.no_grad():
        model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not cache.rows
    left = batch["attention_mask"].flip(1)
    if not torch.equal(left, batch["attention_mask"]):
        model.train()(input_ids=batch["input_ids"], attention_mask=left)
        assert not cache.rows
    tiny = FrozenTrunkCache(model, 1, max_bytes=1)  # no room: rows run in full
    model.train()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not tiny.rows


@pytest.mark.parametrize(
    "overrides, model_overrides, reason",
    [
        ({"trainable_top_layers": None}, {}, "trainable_top_layers"),
        ({"gradient_checkpointing": True}, {}, "gradient_checkpointing"),
        ({}, {"use_peft": True, "lora_target_modules": ["q_proj", "v_proj"]}, "LoRA"),
    ],
)
def test_true_is_refused_where_the_cache_cannot_hold(
    tiny_model_path, tokenizer, finished_rows, tmp_path, overrides, model_overrides, reason
):
    model_args = ModelConfig(model_name_or_path=tiny_model_path, **model_overrides)
    trainer, _ = trainer_for(tiny_model_path, tokenizer, finished_rows, tmp_path, model_args, **overrides)
    assert attach_trunk_cache(trainer, trainer.args, model_args, 100) is None  # auto: off, silently
    trainer.args.cache_frozen_layers = "true"
    with pytest.raises(ConfigError, match=f"cache_frozen_layers: .*{reason}"):
        attach_trunk_cache(trainer, trainer.args, model_args, 100)


def test_the_field_takes_auto_true_false(tmp_path):
    assert training_config(tmp_path, cache_frozen_layers=True).cache_frozen_layers == "true"
    with pytest.raises(ConfigError, match="cache_frozen_layers: must be auto, true or false"):
        training_config(tmp_path, cache_frozen_layers="sometimes")
