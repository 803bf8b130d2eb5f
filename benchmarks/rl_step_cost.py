"""What one GRPO step of a SmolLM2 recipe costs, part by part, against TRL's plain GRPOTrainer and the FLOP floor.

    python benchmarks/rl_step_cost.py --lenvm_model_path /work/studies/smollm2_rl/lenvm --steps 3

Two trainers live in one process, built from the same recipe (``--config``, default the shipped
``grpo/config_lenvm_budget.yaml``; extra ``--field value`` flags override it): the toolkit's
``LenVMGRPOTrainer`` and TRL's own ``GRPOTrainer`` with the same settings, the same reward functions and no LenVM.
Each runs its own ``train()`` in a thread; a baton passed at ``on_step_begin`` / ``on_step_end`` lets one step run
at a time and alternates them (toolkit, TRL, toolkit, ...), so drift in the load of a shared machine hits both.
The first step of each is a warm-up and is not counted; the figures are medians over the rest.

Parts of a step, timed by wrapping TRL's own methods in a subclass (nothing is reimplemented): ``generation``
(``_generate``: prompt tokenisation, sampling, decoding), ``reward_scoring`` (``_calculate_rewards``),
``lenvm_forward`` (``lenvm_values``) and ``length_scoring`` (the toolkit's whole addition after TRL's scoring:
LenVM forward, advantage assembly, length metrics; ``length/scoring_time_s``), ``trl_scoring_other`` (the rest of
``_generate_and_score_completions``: advantages, TRL's log-prob passes when it needs them, metrics),
``policy_forward`` (``compute_loss``), ``policy_backward`` (``accelerator.backward``), ``optimizer`` (gradient
clipping and ``optimizer.step``), ``other`` (the step's remainder).

The floor: the step's matmul FLOPs counted from the shapes of the batch it actually ran (real tokens, no padding:
prefill and one decode forward per sampled token, the policy's forward with logits on completion tokens, the
LoRA backward (input gradients down to the lowest adapted layer, adapter weight gradients), the LenVM forward),
divided by the GFLOP/s a large matmul reaches on this CPU in this process (float32, and bf16 where the recipe
autocasts to it). Writes ``--output`` (default docs/results/rl_step_cost.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import machine_record  # noqa: E402  (same folder)

DEFAULT_RECIPE = ROOT / "recipes" / "SmolLM2-135M-Instruct" / "grpo" / "config_lenvm_budget.yaml"


class TimedSteps:
    """Mixin for a GRPO trainer: seconds per part of every optimizer step, and the shapes each step ran."""

    def setup_timing(self) -> None:
        self.part_seconds = defaultdict(float)  # the current step's parts
        self.steps = []  # per finished step: {"parts": {...}, "shapes": {...}}
        self.shapes = {}
        backward = self.accelerator.backward

        def timed_backward(loss, **kwargs):
            with self.timed("policy_backward"):
                return backward(loss, **kwargs)

        self.accelerator.backward = timed_backward

    @contextmanager
    def timed(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.part_seconds[part] += time.perf_counter() - start

    def _generate(self, prompts):
        with self.timed("generation"):
            return super()._generate(prompts)

    def _calculate_rewards(self, *args):
        with self.timed("reward_scoring"):
            return super()._calculate_rewards(*args)

    def lenvm_values(self, *args):
        with self.timed("lenvm_forward"):
            return super().lenvm_values(*args)

    def _generate_and_score_completions(self, inputs):
        with self.timed("generate_and_score"):
            output = super()._generate_and_score_completions(inputs)
        metric = self._metrics["train"].get("length/scoring_time_s")
        self.part_seconds["length_scoring"] = metric[-1] if metric else 0.0
        self.shapes = {
            "prompt_tokens": output["prompt_mask"].sum(1).tolist(),
            "completion_tokens": output["completion_mask"].sum(1).tolist(),
            "padded_width": output["prompt_ids"].size(1) + output["completion_ids"].size(1),
        }
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.timed("policy_forward"):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _clip_grad_norm(self, model):
        with self.timed("optimizer"):
            return super()._clip_grad_norm(model)


class Baton(TrainerCallback):
    """Lets one trainer's step run at a time, in turn; records the step's wall time and parts."""

    def __init__(self, turns: list, condition: threading.Condition, me: int, trainer_ref: list):
        self.turns, self.condition, self.me, self.trainer_ref = turns, condition, me, trainer_ref

    def on_step_begin(self, args, state, control, **kwargs):
        with self.condition:
            self.condition.wait_for(lambda: self.turns[0] == self.me)
        trainer = self.trainer_ref[0]
        trainer.part_seconds.clear()
        trainer.step_start, trainer.step_cpu_start = time.perf_counter(), time.process_time()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer_ref[0].optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        trainer.part_seconds["optimizer"] += time.perf_counter() - trainer.optimizer_start

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref[0]
        parts = dict(trainer.part_seconds)
        parts["step"] = time.perf_counter() - trainer.step_start
        # The other trainer waits meanwhile, so the process's CPU time is this step's.
        parts["step_cpu"] = time.process_time() - trainer.step_cpu_start
        trainer.steps.append({"parts": parts, "shapes": trainer.shapes})
        with self.condition:
            self.turns[0] = 1 - self.me
            self.condition.notify_all()

    def on_train_end(self, args, state, control, **kwargs):
        with self.condition:  # the other trainer may have steps left
            self.turns[0] = 1 - self.me
            self.me = -1
            self.condition.notify_all()


def split_parts(parts: dict, has_lenvm: bool) -> dict:
    """The step's parts with the nested ones separated: each second is in exactly one part (they sum to step)."""
    out = {
        "generation": parts.get("generation", 0.0),
        "reward_scoring": parts.get("reward_scoring", 0.0),
        "lenvm_forward": parts.get("lenvm_forward", 0.0),
        "length_advantages_and_metrics": parts.get("length_scoring", 0.0) - parts.get("lenvm_forward", 0.0),
        "policy_forward": parts.get("policy_forward", 0.0),
        "policy_backward": parts.get("policy_backward", 0.0),
        "optimizer": parts.get("optimizer", 0.0),
    }
    if not has_lenvm:
        out["lenvm_forward"] = out["length_advantages_and_metrics"] = 0.0
    out["trl_scoring_other"] = (
        parts.get("generate_and_score", 0.0)
        - out["generation"]
        - out["reward_scoring"]
        - out["lenvm_forward"]
        - out["length_advantages_and_metrics"]
    )
    out["other"] = parts["step"] - sum(out.values())  # before the fields below, which are not parts
    out["step"] = parts["step"]
    out["step_cpu"] = parts["step_cpu"]
    return out


# ----------------------------------------------------------------------------------------------- FLOPs


def linear_macs(model: torch.nn.Module) -> dict:
    """Multiply-accumulates per token of a decoder's matmuls: {"layers": [per decoder layer: (base, lora)],
    "head": the LM head's (0 for a LenVM, whose value head is counted in "extra"), "extra": the rest}."""
    layers = defaultdict(lambda: [0, 0])
    head = extra = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        macs = module.in_features * module.out_features
        parts = name.split(".")
        if "layers" in parts:
            index = int(parts[parts.index("layers") + 1])
            layers[index][1 if ("lora_A" in parts or "lora_B" in parts) else 0] += macs
        elif parts[-1] == "lm_head":
            head += macs
        else:
            extra += macs
    return {"layers": [tuple(layers[i]) for i in sorted(layers)], "head": head, "extra": extra}


def forward_flops(macs: dict, hidden: int, prompt: int, completion: int, logits: int) -> float:
    """One causal forward over prompt + completion tokens, logits on ``logits`` of them (2 FLOPs per MAC; attention
    QK^T and AV: 4 · hidden · context per token and layer)."""
    tokens = prompt + completion
    per_token = sum(base + lora for base, lora in macs["layers"]) + macs["extra"]
    attention = 4 * hidden * len(macs["layers"]) * tokens * (tokens + 1) / 2
    return 2 * per_token * tokens + attention + 2 * macs["head"] * logits


def step_flops(shapes: dict, policy: dict, hidden: int, lenvm: dict | None) -> dict:
    """The step's matmul FLOPs over its real tokens: generation, policy forward, LoRA backward, LenVM forward."""
    flops = defaultdict(float)
    adapted = [i for i, (_, lora) in enumerate(policy["layers"]) if lora]
    lowest = adapted[0] if adapted else len(policy["layers"])
    for prompt, completion in zip(shapes["prompt_tokens"], shapes["completion_tokens"]):
        # Sampling: prefill with logits at its last token, then one forward per sampled token but the last.
        flops["generation"] += forward_flops(policy, hidden, prompt, completion - 1, completion)
        flops["policy_forward"] += forward_flops(policy, hidden, prompt, completion, completion)
        # LoRA backward: input gradients of every matmul from the head down to the lowest adapted layer
        # (attention: twice its forward), plus the adapters' weight gradients.
        tokens = prompt + completion
        above = policy["layers"][lowest:]
        flops["policy_backward"] += (
            2 * sum(base + 2 * lora for base, lora in above) * tokens
            + 8 * hidden * len(above) * tokens * (tokens + 1) / 2
            + 2 * policy["head"] * completion
        )
        if lenvm is not None:
            flops["lenvm_forward"] += forward_flops(lenvm, hidden, prompt, completion, 0)
    flops["total"] = sum(flops.values())
    return dict(flops)


def matmul_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """GFLOP/s of a size x size matmul in ``dtype`` on this CPU, per second of wall time and per second of process
    CPU time (the best of repeated runs over ``seconds``; on a loaded machine the CPU-time rate is the one that
    holds, as the CPU-time step figures do)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best, best_cpu, deadline = float("inf"), float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start, start_cpu = time.perf_counter(), time.process_time()
        a @ b
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - start_cpu)
    return 2 * size**3 / best / 1e9, 2 * size**3 / best_cpu / 1e9


# ------------------------------------------------------------------------------------------------ main


def build_trainers(argv: list[str]):
    """The toolkit's trainer and TRL's plain one, from the same recipe, each with a ``TimedSteps`` mixin."""
    from trl import GRPOTrainer, ModelConfig, get_peft_config

    from lenvm_rl.data import load_prompt_splits
    from lenvm_rl.grpo import LenVMGRPOConfig, LenVMGRPOTrainer
    from lenvm_rl.loading import load_causal_lm, load_tokenizer
    from lenvm_rl.precision import resolve_dtype, training_device
    from lenvm_rl.recipe import parse_recipe
    from lenvm_rl.train_policy import GRPOScriptArguments, build_reward_funcs

    class TimedToolkit(TimedSteps, LenVMGRPOTrainer):
        pass

    class TimedTRL(TimedSteps, GRPOTrainer):
        pass

    script_args, config, model_args = parse_recipe((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig), argv)
    dataset = load_prompt_splits(script_args, 0)[0]
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    dtype = resolve_dtype(model_args.dtype, training_device(config.use_cpu))
    turns, condition = [0], threading.Condition()
    trainers = []
    for me, (trainer_class, lenvm) in enumerate([(TimedToolkit, True), (TimedTRL, False)]):
        ref = []
        args = parse_recipe((GRPOScriptArguments, LenVMGRPOConfig, ModelConfig), argv)[1]
        args.output_dir = str(Path(config.output_dir) / ("toolkit" if lenvm else "trl"))
        if not lenvm:  # TRL's plain trainer: no LenVM, TRL's advantages
            args.lenvm_model_path, args.length_objective = None, "none"
        model = load_causal_lm(model_args.model_name_or_path, dtype=dtype)
        trainer = trainer_class(
            model=model,
            reward_funcs=build_reward_funcs(script_args.reward_funcs, tokenizer, model, args),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[Baton(turns, condition, me, ref)],
        )
        ref.append(trainer)
        trainer.setup_timing()
        trainers.append(trainer)
    return config, trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per trainer, after one warm-up step")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "rl_step_cost.json")
    parser.add_argument("--table", action="store_true", help="print the table of an existing --output and stop")
    options, overrides = parser.parse_known_args()
    if options.table:
        print(table(json.loads(options.output.read_text())))
        return
    torch.set_num_threads(options.threads)
    argv = [
        "--config",
        str(options.config),
        "--output_dir",
        str(ROOT / "runs" / "rl_step_cost"),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *overrides,
        "--max_steps",
        str(options.steps + 1),
    ]
    config, trainers = build_trainers(argv)
    rates = {"float32": dict(zip(("per_wall_s", "per_cpu_s"), matmul_gflops(torch.float32)))}
    if config.bf16:
        rates["bfloat16"] = dict(zip(("per_wall_s", "per_cpu_s"), matmul_gflops(torch.bfloat16)))
    load_before = os.getloadavg()
    threads = [threading.Thread(target=trainer.train) for trainer in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load_after = os.getloadavg()

    toolkit, trl = trainers
    policy = linear_macs(toolkit.model)
    hidden = toolkit.model.config.hidden_size
    lenvm = linear_macs(toolkit.accelerator.unwrap_model(toolkit.lenvm)) if toolkit.lenvm is not None else None
    rate, cpu_rate = (r * 1e9 for r in rates.get("bfloat16", rates["float32"]).values())

    def summarise(trainer, with_lenvm):
        timed = trainer.steps[1:]  # the first step warms up
        parts = [split_parts(s["parts"], with_lenvm) for s in timed]
        flops = [step_flops(s["shapes"], policy, hidden, lenvm if with_lenvm else None) for s in timed]
        return {
            "step_s": [p["step"] for p in parts],
            "step_cpu_s": [p["step_cpu"] for p in parts],
            "parts_s": {name: statistics.median(p[name] for p in parts) for name in parts[0]},
            "floor_s": statistics.median(f["total"] / rate for f in flops),
            "floor_cpu_s": statistics.median(f["total"] / cpu_rate for f in flops),
            "tflop": {name: statistics.median(f[name] for f in flops) / 1e12 for name in flops[0]},
            "completion_tokens_mean": statistics.fmean(
                statistics.fmean(s["shapes"]["completion_tokens"]) for s in timed
            ),
            "padded_width": [s["shapes"]["padded_width"] for s in timed],
        }

    ours, theirs = summarise(toolkit, True), summarise(trl, False)
    result = {
        "command": " ".join(["python", "benchmarks/rl_step_cost.py", *sys.argv[1:]]),
        "machine": machine_record(),
        "threads": options.threads,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "recipe": str(options.config.relative_to(ROOT) if options.config.is_relative_to(ROOT) else options.config),
        "lenvm_model_path": config.lenvm_model_path,
        "bf16": config.bf16,
        "steps_timed": options.steps,
        "matmul_gflops": rates,
        "toolkit_step_s": statistics.median(ours["step_s"]),
        "trl_step_s": statistics.median(theirs["step_s"]),
        "floor_s": ours["floor_s"],
        "parts_s": ours["parts_s"],
        "toolkit_over_trl": statistics.median(ours["step_s"]) / statistics.median(theirs["step_s"]),
        "toolkit_over_floor": statistics.median(ours["step_s"]) / ours["floor_s"],
        # Per second of process CPU time: what a loaded machine distorts least.
        "toolkit_step_cpu_s": statistics.median(ours["step_cpu_s"]),
        "trl_step_cpu_s": statistics.median(theirs["step_cpu_s"]),
        "floor_cpu_s": ours["floor_cpu_s"],
        "toolkit_over_trl_cpu": statistics.median(ours["step_cpu_s"]) / statistics.median(theirs["step_cpu_s"]),
        "toolkit_over_floor_cpu": statistics.median(ours["step_cpu_s"]) / ours["floor_cpu_s"],
        "toolkit": ours,
        "trl": theirs,
    }
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("toolkit", "trl")}, indent=2))
    print(table(result))


def table(result: dict) -> str:
    """The docs/BENCHMARKS.md table of a result: medians per part (s), toolkit against TRL, TFLOP of each part."""
    ours, theirs = result["toolkit"], result["trl"]
    lines = ["| part | toolkit (s) | TRL GRPOTrainer (s) | TFLOP (toolkit) |", "|---|---:|---:|---:|"]
    for name, seconds in ours["parts_s"].items():
        if name in ("step", "step_cpu", "lenvm_forward_padded_before"):  # the last: results before the revert
            continue
        tflop = f"{ours['tflop'][name]:.3f}" if name in ours["tflop"] else ""
        lines.append(f"| {name} | {seconds:.2f} | {theirs['parts_s'][name]:.2f} | {tflop} |")
    lines += [
        f"| **step (wall)** | **{result['toolkit_step_s']:.1f}** | **{result['trl_step_s']:.1f}** | "
        f"{ours['tflop']['total']:.3f} |",
        f"| step (process CPU time) | {result['toolkit_step_cpu_s']:.1f} | {result['trl_step_cpu_s']:.1f} | |",
        f"| FLOP floor (wall rate / CPU-time rate) | {result['floor_s']:.1f} / {result['floor_cpu_s']:.1f} | "
        f"{theirs['floor_s']:.1f} / {theirs['floor_cpu_s']:.1f} | |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
