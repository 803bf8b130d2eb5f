"""GRPO and PPO with thinking budgets and a two-value LenVM (issue 29, part 4): the per-segment advantages in the
trainer against an independent recomputation (the LenVM run by hand, the segments found by hand, the loop reference
of test_segment_advantages), a few training steps with the per-segment metrics logged, and the refusals.

The tiny model thinks from the first token (the recorder starts inside the thinking, as a Qwen3 template does) and
closes it with "]", which it writes with probability about 0.25 at every step, so a batch mixes closed and unclosed
thinking, finished and truncated rows."""

import math

import pytest
import torch
from conftest import make_tiny_llama, make_trainer
from test_segment_advantages import ref_segment_advantages

from lenvm_rl.data import DatasetArguments, load_prompts
from lenvm_rl.errors import ConfigError
from lenvm_rl.modeling import LenVMModel, load_lenvm
from lenvm_rl.ppo import LenVMPPOConfig, LenVMPPOTrainer
from lenvm_rl.thinking import SegmentRecorder
from rewards import Accuracy, AnswerLengthScore, ThinkingLengthScore

MARKERS = ("[", "]")
GAMMA = 0.9


@pytest.fixture(scope="module")
def thinking_model_path(tmp_path_factory, tokenizer) -> str:
    """The conftest's tiny model, made to write "]" with probability about 0.25 at every step."""
    model = make_tiny_llama(tokenizer)
    with torch.no_grad():
        hidden = model.config.hidden_size
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("]"), 0] = math.log(40.0) / math.sqrt(hidden)
    path = tmp_path_factory.mktemp("thinking-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def saved_lenvm(tmp_path_factory, tokenizer, segment_values: bool) -> str:
    path = tmp_path_factory.mktemp("lenvm-two" if segment_values else "lenvm-one")
    torch.manual_seed(1)
    lenvm = LenVMModel.from_backbone(make_tiny_llama(tokenizer), gamma=GAMMA, segment_values=segment_values)
    with torch.no_grad():  # values that differ from state to state (the conftest's tiny model varies little)
        lenvm.head.out.weight.normal_(std=1.0)
    lenvm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def two_value_lenvm(tmp_path_factory, tokenizer) -> str:
    return saved_lenvm(tmp_path_factory, tokenizer, True)


def prompts_with_two_budgets(answer_kinds):
    kinds = ["exact", "at_most", "at_least"]
    args = DatasetArguments(
        num_prompts=16, budgets=[2, 4], budget_kinds=answer_kinds, thinking_budgets=[2, 4], thinking_budget_kinds=kinds
    )
    return load_prompts(args)


@pytest.fixture(scope="module")
def thinking_prompts():
    return prompts_with_two_budgets(["exact", "at_most", "at_least"])


def thinking_trainer(model_path, tokenizer, dataset, output_dir, trainer_class=None, config_class=None, **overrides):
    """conftest.make_trainer with the per-segment length scores as rewards and the thinking markers' recorder."""
    rewards = [
        Accuracy(),
        ThinkingLengthScore(tokenizer, MARKERS, True, tokenizer.eos_token_id),
        AnswerLengthScore(tokenizer, MARKERS, True, tokenizer.eos_token_id),
    ]
    segments = SegmentRecorder(tokenizer, MARKERS, starts_inside=True)
    return make_trainer(
        model_path,
        tokenizer,
        dataset,
        output_dir,
        trainer_class=trainer_class,
        config_class=config_class,
        rewards=rewards,
        segments=segments,
        **overrides,
    )


def test_each_token_is_credited_against_its_own_segments_budget(
    thinking_model_path, tokenizer, two_value_lenvm, tmp_path
):
    """One generation batch: the trainer's c · A_len equals the loop reference on values and segments found
    independently, and the task advantage is added whole to every token."""
    trainer = thinking_trainer(
        thinking_model_path,
        tokenizer,
        prompts_with_two_budgets(["exact"]),  # exact answer budgets: an answer score that is never saturated
        tmp_path,
        max_steps=1,
        lenvm_model_path=two_value_lenvm,
        length_advantage_coef=0.7,
        whiten_length_advantage=False,
    )
    seen = {}
    hook = trainer.length_advantages

    def spy(output, batch):
        seen.update(output=output, batch=batch, length=hook(output, batch))
        return seen["length"]

    trainer.length_advantages = spy
    trainer.train()
    output, length = seen["output"], seen["length"].double()
    prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"].bool()
    completion_ids, mask = output["completion_ids"], output["completion_mask"].bool()
    lenvm = load_lenvm(two_value_lenvm, two_values=True).eval()
    rows, values = [], torch.zeros(mask.size(0), mask.size(1) + 1, 2, dtype=torch.float64)
    for b in range(mask.size(0)):
        n = int(mask[b].sum())
        finished = n > 0 and int(completion_ids[b, n - 1]) == tokenizer.eos_token_id
        length_b = n - int(finished)
        pieces = [tokenizer.decode([int(i)]) for i in completion_ids[b, :length_b]]
        close = pieces.index("]") if "]" in pieces else None
        rows.append((n, finished, length_b if close is None else close + 1, close is not None))
        prompt = prompt_ids[b][prompt_mask[b]]
        with torch.no_grad():
            full = lenvm(input_ids=torch.cat([prompt, completion_ids[b, :n]])[None]).length_values[0]  # (S, 2)
        values[b, : n + 1] = full[len(prompt) - 1 : len(prompt) + n].double()
    closed = [row[3] for row in rows]
    assert any(closed) and not all(closed), "the batch should mix closed and unclosed thinking"
    inputs = seen["batch"]
    expected = ref_segment_advantages(
        values,
        rows,
        GAMMA,
        1.0,
        "budget",
        inputs["segment_budgets"],
        inputs["segment_kinds"],
        1.0,
        False,
        "point",
        8,
        None,
    ).sum(-1)
    torch.testing.assert_close(length, 0.7 * expected, atol=1e-4, rtol=1e-4)
    assert inputs["segment_advantages"][..., 0].any() and inputs["segment_advantages"][..., 1].any()
    # the total is the task advantage on every valid token plus c · A_len
    task = output["advantages"].double() - length
    for b in range(mask.size(0)):
        assert torch.allclose(task[b][mask[b]], task[b][mask[b]][:1].expand(int(mask[b].sum())), atol=1e-5)
        assert not output["advantages"][b][~mask[b]].any()


@pytest.mark.parametrize(
    "options",
    [{}, {"length_baseline": "group", "length_potential": "expected", "eos_credit": True}],
    ids=["default", "group-expected-eos"],
)
def test_grpo_trains_with_per_segment_advantages(
    options, thinking_model_path, tokenizer, thinking_prompts, two_value_lenvm, tmp_path
):
    trainer = thinking_trainer(
        thinking_model_path, tokenizer, thinking_prompts, tmp_path, lenvm_model_path=two_value_lenvm, **options
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = [entry for entry in trainer.state.log_history if "length/thinking_mean_tokens" in entry]
    assert len(logged) == 2
    for name in ("thinking", "answer"):
        for metric in ("mean_tokens", "mean_length_score", "budget_hit_rate", "lenvm_boundary_pred_tokens"):
            assert all(math.isfinite(entry[f"length/{name}_{metric}"]) for entry in logged), (name, metric)
        assert all(entry[f"length/{name}_mean_abs_advantage"] > 0 for entry in logged), name
    assert all(0 < entry["length/thinking_closed_rate"] < 1 for entry in logged)
    assert all(math.isfinite(entry["length/critic_mse"]) for entry in logged)
    assert "length/budget_hit_rate" not in logged[0]  # no whole-completion score against the answer's budget


def test_ppo_trains_with_per_segment_advantages(
    thinking_model_path, tokenizer, thinking_prompts, two_value_lenvm, tmp_path
):
    trainer = thinking_trainer(
        thinking_model_path,
        tokenizer,
        thinking_prompts,
        tmp_path,
        trainer_class=LenVMPPOTrainer,
        config_class=LenVMPPOConfig,
        lenvm_model_path=two_value_lenvm,
        num_generations=2,
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "length/answer_mean_abs_advantage" in entry]
    assert len(logged) == 2
    assert all(
        math.isfinite(entry["ppo/value_loss"]) for entry in trainer.state.log_history if "ppo/value_loss" in entry
    )
    assert all(entry["length/thinking_mean_abs_advantage"] > 0 for entry in logged)


def test_sequence_level_twin_logs_the_same_segment_curves(thinking_model_path, tokenizer, thinking_prompts, tmp_path):
    trainer = thinking_trainer(thinking_model_path, tokenizer, thinking_prompts, tmp_path, length_objective="none")
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "length/answer_mean_length_score" in entry]
    assert len(logged) == 2 and "length/thinking_mean_abs_advantage" not in logged[0]


def test_refusals(thinking_model_path, tokenizer, thinking_prompts, two_value_lenvm, tmp_path_factory, tmp_path):
    one_value = saved_lenvm(tmp_path_factory, tokenizer, False)
    with pytest.raises(ConfigError, match=r"^lenvm_model_path: .* is a one-value LenVM .* segment_values: true"):
        thinking_trainer(thinking_model_path, tokenizer, thinking_prompts, tmp_path, lenvm_model_path=one_value)
    plain = load_prompts(DatasetArguments(num_prompts=8, budgets=[3]))
    with pytest.raises(ConfigError, match=r"^lenvm_model_path: .* is a two-value LenVM .* add thinking_budgets"):
        thinking_trainer(thinking_model_path, tokenizer, plain, tmp_path, lenvm_model_path=two_value_lenvm)
    for field, value in (("guided_generations", 1), ("lenvm_update", "live")):
        with pytest.raises(ConfigError, match=rf"^{field}: .* thinking budgets"):
            thinking_trainer(
                thinking_model_path,
                tokenizer,
                thinking_prompts,
                tmp_path,
                lenvm_model_path=two_value_lenvm,
                **{field: value},
            )
    answerless = load_prompts(DatasetArguments(num_prompts=8, thinking_budgets=[3]))
    with pytest.raises(ConfigError, match=r"^budgets: these prompts carry thinking budgets but no answer budget"):
        thinking_trainer(
            thinking_model_path,
            tokenizer,
            answerless,
            tmp_path,
            length_objective="none",
            lenvm_model_path=two_value_lenvm,
        )


def test_markers_the_tokenizer_cannot_write_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "think": 1, "4": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    with pytest.raises(
        ConfigError, match=r"^thinking_budgets: the tokenizer cannot write the thinking marker '<think>'"
    ):
        SegmentRecorder(words, ("<think>", "</think>"), False, "thinking_budgets")


def test_thinking_recipe_twins_differ_only_in_the_length_signal():
    import yaml
    from conftest import ROOT

    folder = ROOT / "recipes" / "SmolLM2-135M-Instruct" / "grpo"
    lenvm, sequence = (
        yaml.safe_load((folder / name).read_text())
        for name in ("config_thinking_lenvm.yaml", "config_thinking_seq.yaml")
    )
    differing = {key for key in lenvm.keys() | sequence.keys() if lenvm.get(key) != sequence.get(key)}
    assert differing == {"length_objective", "reward_funcs", "output_dir"}
    assert sequence["reward_funcs"] == ["accuracy", "thinking_length_score", "answer_length_score"]
    assert lenvm["length_objective"] == "budget" and lenvm["reward_funcs"] == ["accuracy"]


def test_a_plain_model_as_the_lenvm_is_named_as_such(thinking_model_path, tokenizer, thinking_prompts, tmp_path):
    with pytest.raises(ConfigError, match=r"^lenvm_model_path: .* holds a 'llama' model, not a LenVM"):
        thinking_trainer(
            thinking_model_path, tokenizer, thinking_prompts, tmp_path, lenvm_model_path=thinking_model_path
        )
