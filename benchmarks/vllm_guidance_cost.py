"""LenVM guidance inside vLLM (``lenvm_rl.vllm_guidance``): its cost per generated token against vLLM without it,
beside the same ratio for ``model.generate`` with ``LenVMGuidedLogitsProcessor``.

    .cache/venv-vllm/bin/python benchmarks/vllm_guidance_cost.py      # after `make test-vllm`

Writes docs/results/vllm_guidance_cost.json and prints the table of docs/BENCHMARKS.md "LenVM guidance in vLLM".
Policy SmolLM2-135M-Instruct; LenVM: SmolLM2-135M-Instruct's trunk with a fresh head (the size of the LenVMs the
SmolLM2 recipes train; its weights do not change its cost). Evaluate shape: 16 GSM8K questions (``--dataset``),
greedy, ``--max_tokens`` new tokens, select mode at exactly 64 tokens, each ``--top_k`` in turn. Every measurement is its own subprocess (one
engine at a time, vLLM's engine inside it: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) at ``--threads`` threads, in the
precision ``dtype: auto`` picks on this CPU (policy and LenVM alike); generation is timed on the second of two
identical batches (the first warms caches), and cost is seconds per generated token (EOS included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vllm_vs_hf import cpu_kind, peak_rss_gib  # noqa: E402

PROMPTS, BUDGET = 16, 64
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def prompts(count: int, dataset: str) -> list[list[int]]:
    """The first ``count`` GSM8K test questions, SmolLM2's chat template applied: answers run past ``--max_tokens``, so
    every row of both arms decodes to the limit and a token costs the same batch in both."""
    from lenvm_rl.data import DatasetArguments, load_prompts
    from lenvm_rl.generation import tokenize_prompts
    from lenvm_rl.loading import load_tokenizer

    rows = load_prompts(DatasetArguments(dataset_name=dataset, prompt_column="question", num_prompts=count))
    return tokenize_prompts(load_tokenizer("smollm2-135m-instruct"), rows["prompt"])


def make_lenvm(folder: Path) -> None:
    """SmolLM2-135M-Instruct's trunk with a fresh value head, saved with its tokenizer as `train-lenvm` saves one."""
    from lenvm_rl.loading import load_causal_lm, load_tokenizer
    from lenvm_rl.modeling import LenVMModel

    LenVMModel.from_backbone(load_causal_lm("smollm2-135m-instruct", dtype="float32"), gamma=0.997).save_pretrained(
        folder
    )
    load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)


def sample(generator: str, top_k: int, lenvm_path: str, max_tokens: int, dataset: str) -> dict:
    """Two identical batches (guided when ``top_k`` > 0); seconds and generated tokens of the second."""
    from lenvm_rl.loading import inference_device, load_causal_lm, load_tokenizer, resolve_model_path
    from lenvm_rl.precision import resolve_dtype

    ids = prompts(PROMPTS, dataset)
    dtype = resolve_dtype("auto", "cpu")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    began = time.perf_counter()
    if generator == "vllm":
        from lenvm_rl.vllm_guidance import guidance_args
        from lenvm_rl.vllm_sampling import generation_eos_ids, make_vllm_generate

        path = resolve_model_path("smollm2-135m-instruct")
        eos_ids = generation_eos_ids(path, tokenizer)
        engine = make_vllm_generate(
            path,
            num_samples=1,
            temperature=0.0,
            top_p=1.0,
            eos_ids=eos_ids,
            dtype=dtype,
            lenvm_model_path=lenvm_path if top_k else None,
        )
        extra = [guidance_args(BUDGET, "exact", mode="select", top_k=top_k)] * len(ids) if top_k else None
        run = lambda: engine(ids, list(range(len(ids))), max_tokens, None, extra)
    else:
        import torch
        from transformers import LogitsProcessorList

        from lenvm_rl.decoding import LenVMGuidedLogitsProcessor
        from lenvm_rl.generation import eos_token_ids, generate_hf
        from lenvm_rl.modeling import load_lenvm

        model = load_causal_lm("smollm2-135m-instruct", dtype=dtype).to(inference_device()).eval()
        lenvm = load_lenvm(lenvm_path, dtype=getattr(torch, dtype)).eval() if top_k else None
        eos_ids = eos_token_ids(tokenizer, model.generation_config)

        def run():
            guide = None
            if top_k:
                lengths = [len(p) for p in ids]
                processor = LenVMGuidedLogitsProcessor(
                    lenvm, [BUDGET] * len(ids), ["exact"] * len(ids), lengths, eos_ids, mode="select", top_k=top_k
                )
                guide = LogitsProcessorList([processor])
            return generate_hf(model, tokenizer, ids, 1, max_tokens, 0.0, 1.0, logits_processor=guide)

    start_seconds = time.perf_counter() - began
    run()
    began = time.perf_counter()
    groups = run()
    seconds = time.perf_counter() - began
    tokens = sum(len(c) + finished for group in groups for c, finished in group)
    return {
        "seconds": seconds,
        "tokens": tokens,
        "ms_per_token": 1000 * seconds / tokens,
        "start_seconds": start_seconds,
        "dtype": dtype,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--top_k", type=int, nargs="+", default=[8, 2])
    parser.add_argument("--generators", nargs="+", default=["vllm", "hf"])
    parser.add_argument("--dataset", default=str(GSM8K), help="GSM8K's test.jsonl (question / answer)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "vllm_guidance_cost.json"))
    parser.add_argument("--worker", nargs=3, metavar=("GENERATOR", "TOP_K", "LENVM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        generator, top_k, lenvm_path = args.worker
        result = sample(generator, int(top_k), lenvm_path, args.max_tokens, args.dataset)
        print("RESULT " + json.dumps({**result, "peak_rss_gib": peak_rss_gib()}), flush=True)
        return

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    results, loads = {}, [os.getloadavg()]
    with tempfile.TemporaryDirectory() as folder:
        make_lenvm(Path(folder))
        for generator in args.generators:
            for top_k in [0, *args.top_k]:
                command = [sys.executable, __file__, "--worker", generator, str(top_k), folder]
                command += [
                    "--threads",
                    str(args.threads),
                    "--max_tokens",
                    str(args.max_tokens),
                    "--dataset",
                    args.dataset,
                ]
                done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{generator} at top_k {top_k} failed:\n{done.stderr[-3000:]}")
                line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
                name = f"{generator}/" + (f"guided_top_k_{top_k}" if top_k else "plain")
                results[name] = json.loads(line.removeprefix("RESULT "))
                loads.append(os.getloadavg())
                print(name, results[name], flush=True)

    import torch
    import transformers
    import vllm

    ratios = {
        f"{generator}/top_k_{top_k}": results[f"{generator}/guided_top_k_{top_k}"]["ms_per_token"]
        / results[f"{generator}/plain"]["ms_per_token"]
        for generator in args.generators
        for top_k in args.top_k
    }
    record = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/vllm_guidance_cost.py", *sys.argv[1:]]),
        "machine": cpu_kind(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "python": platform.python_version(),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "shape": f"{PROMPTS} GSM8K questions, greedy, select mode at exactly {BUDGET} tokens",
        "loadavg_before_and_after_each_run": loads,
        "note": "machine shared with other work while measured (see loadavg)",
        "results": results,
        "guided_over_plain_per_token": ratios,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
