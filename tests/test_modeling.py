"""LenVMModel: value range and dtypes, save/load, the token-mean loss against a hand computation, training."""

import copy
import math

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoModelForCausalLM

from lenvm_rl.critic_metrics import collate_states
from lenvm_rl.errors import ConfigError
from lenvm_rl.modeling import LenVMConfig, LenVMModel, load_lenvm

GAMMA = 0.9
VOCAB = 100
PAD = 1
# (completion length L, finished): two finished rows of different length and one truncated row.
ROWS = [(3, True), (1, True), (5, False), (0, True)]


def make_lenvm(dtype=torch.float32, **config_kwargs) -> LenVMModel:
    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).to(dtype)
    return LenVMModel.from_backbone(backbone, gamma=GAMMA, **config_kwargs)


def make_records(rows=ROWS, seed=1) -> list[dict]:
    """Rollout-like rows with random prompt and completion tokens."""
    generator = torch.Generator().manual_seed(seed)
    records = []
    for prompt_id, (length, finished) in enumerate(rows):
        prompt_ids = torch.randint(3, VOCAB, (2 + prompt_id,), generator=generator).tolist()
        completion_ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        records.append(
            {
                "prompt_ids": prompt_ids,
                "completion_ids": completion_ids,
                "completion_tokens": length,
                "finished": finished,
            }
        )
    return records


def make_batch(records=None) -> dict[str, torch.Tensor]:
    return collate_states(records or make_records(), pad_token_id=PAD)


def states_only(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "state_positions")}


def test_config_refuses_gamma_outside_unit_interval():
    with pytest.raises(ValueError, match="gamma"):
        LenVMConfig(backbone_config=tiny_llama_config(VOCAB).to_dict(), gamma=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_in_open_interval_and_logits_float32(dtype):
    model = make_lenvm(dtype).eval()
    assert model.backbone.dtype == dtype
    batch = make_batch()
    with torch.no_grad():
        out = model(**states_only(batch))
    assert out.logits.dtype == torch.float32 and out.length_values.dtype == torch.float32
    assert out.length_values.shape == batch["state_positions"].shape  # (B, S)
    assert ((out.length_values > -1) & (out.length_values < 0)).all()
    torch.testing.assert_close(out.length_values, -torch.sigmoid(out.logits))
    # Without state_positions: one value per input position.
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert full.length_values.shape == batch["input_ids"].shape


def test_save_and_load_round_trip(tmp_path):
    model = make_lenvm(head_hidden_size=16, train_length_mean=3.5).eval()
    with torch.no_grad():  # move the head off its initialisation so a re-init would show
        model.head.out.weight.normal_()
        model.head.out.bias.fill_(0.3)
    model.save_pretrained(tmp_path)
    batch = states_only(make_batch())
    with torch.no_grad():
        expected = model(**batch).length_values
        for loaded in (LenVMModel.from_pretrained(tmp_path), load_lenvm(str(tmp_path))):
            assert isinstance(loaded, LenVMModel)
            assert loaded.config.gamma == GAMMA and loaded.config.head_hidden_size == 16
            assert loaded.config.train_length_mean == 3.5
            assert torch.equal(loaded.eval()(**batch).length_values, expected)


def test_load_lenvm_refuses_a_plain_causal_lm(tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match="lenvm_model_path: .* not a LenVM"):
        load_lenvm(tiny_model_path)
    with pytest.raises(ConfigError, match="lenvm_model_path: .*no such folder"):
        load_lenvm(str(tmp_path / "missing"))


def hand_loss(values, logits, rows, gamma, kind="mse", bootstrap=False):
    """Summed per-state loss and state count, one plain loop over rows and states."""
    total, count = 0.0, 0
    for i, (length, finished) in enumerate(rows):
        if not finished and not bootstrap:
            continue
        for t in range(length + 1):
            target = -(1 - gamma ** (length - t))
            if not finished:  # G_t = r_t + ... + γ^(T-t) V(s_T)
                target += gamma ** (length - t) * float(values[i, length])
            if kind == "mse":
                total += (float(values[i, t]) - target) ** 2
            else:
                p, y = torch.sigmoid(logits[i, t]).item(), -target
                total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
            count += 1
    return total, count


@pytest.mark.parametrize(
    "kind, bootstrap", [("mse", False), ("mse", True), ("bce", False)], ids=["mse-drop", "mse-bootstrap", "bce-drop"]
)
def test_loss_is_token_mean_over_valid_states(kind, bootstrap):
    model = make_lenvm(value_loss=kind, bootstrap_truncated=bootstrap).eval()
    with torch.no_grad():
        model.head.out.weight.normal_()  # spread the values so the targets matter
    batch = make_batch()
    with torch.no_grad():
        out = model(**batch)
    total, count = hand_loss(out.length_values.double(), out.logits.double(), ROWS, GAMMA, kind, bootstrap)
    assert count == sum(length + 1 for length, finished in ROWS if finished or bootstrap)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)
    # With the accumulated batch's count given, the loss is this batch's sum over that count.
    with torch.no_grad():
        out = model(**batch, num_items_in_batch=torch.tensor(40))
    assert out.loss.item() == pytest.approx(total / 40, rel=1e-5)


def test_loss_is_not_a_mean_over_sequences():
    # Token mean weights a row by its length: two halves summed with the total count give the whole.
    model = make_lenvm().eval()
    records = make_records()[:2]
    batch, first, second = make_batch(records), make_batch(records[:1]), make_batch(records[1:])
    total = sum(length + 1 for length, _ in ROWS[:2])
    with torch.no_grad():
        whole = model(**batch).loss
        halves = model(**first, num_items_in_batch=total).loss + model(**second, num_items_in_batch=total).loss
        mean_of_means = (model(**first).loss + model(**second).loss) / 2
    torch.testing.assert_close(halves, whole)
    assert not torch.isclose(mean_of_means, whole)


def train_steps(model, batch, steps=5, lr=1e-2):
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_reduces_loss_and_changes_every_parameter():
    model = make_lenvm().train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_steps(model, make_batch())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert not unchanged


def test_frozen_backbone_trains_the_head_only():
    model = make_lenvm().train()
    model.backbone.requires_grad_(False)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = train_steps(model, make_batch())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("backbone."), name


def test_head_weights_stay_float32_with_a_bf16_backbone(tmp_path):
    model = make_lenvm(torch.bfloat16).eval()
    assert model.head.dense.weight.dtype == torch.float32
    model.save_pretrained(tmp_path)
    reloaded = LenVMModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert reloaded.head.dense.weight.dtype == torch.float32 and reloaded.backbone.dtype == torch.bfloat16
    with torch.no_grad():  # same weights; bf16 kernels may differ in the last bits between two model objects
        torch.testing.assert_close(
            model(**states_only(make_batch())).length_values,
            reloaded(**states_only(make_batch())).length_values,
            atol=1e-5,
            rtol=0,
        )


def test_head_computes_in_float32_whatever_dtype_its_weights_are_stored_in():
    """DeepSpeed's bf16 engine (trl.models.prepare_deepspeed, ZeRO-3) and FSDP's mixed precision hand the head bf16
    weights: it still computes in float32, so its z equals a float32 head's with the same (bf16-valued) weights."""
    stored_bf16 = make_lenvm(torch.bfloat16).to(torch.bfloat16).eval()  # the whole model cast, as DeepSpeed does
    with torch.no_grad():
        stored_bf16.head.out.bias.fill_(6.0)  # |z| where a bf16 z is 0.03 coarse
    assert stored_bf16.head.dense.weight.dtype == torch.bfloat16
    upcast = copy.deepcopy(stored_bf16)
    upcast.head.float()  # the same weights, stored in float32 (as under DDP)
    with torch.no_grad():
        z = stored_bf16(**states_only(make_batch())).logits
        expected = upcast(**states_only(make_batch())).logits
        hidden = torch.randn(3, 5, 32, dtype=torch.bfloat16)
        torch.testing.assert_close(stored_bf16.head(hidden), upcast.head(hidden.float()), rtol=0, atol=0)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-6)


def test_head_shares_the_backbone_dtype_under_zero3():
    """ZeRO-3 parameters share one dtype: the head is stored in the backbone's, elsewhere float32."""
    pytest.importorskip("deepspeed")
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    backbone = AutoModelForCausalLM.from_config(tiny_llama_config(VOCAB)).to(torch.bfloat16)  # built outside zero.Init
    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "train_batch_size": 1})
    try:
        model = LenVMModel.from_backbone(backbone, gamma=GAMMA)
    finally:
        unset_hf_deepspeed_config()
    assert zero3.is_zero3() and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert LenVMModel.from_backbone(backbone, gamma=GAMMA).head.dense.weight.dtype == torch.float32  # DDP, FSDP, ZeRO-2
